"""The teacher-target cache (hdcli.cache, `hd cache-targets`, `hd distill --targets-cache`): its losses against the
online teacher pass, the smoke chain of writing, training and resuming both, and its bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, run_hd
from PIL import Image

from hdcli.errors import HDError
from hdcli.seeding import seed_all

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = REPO / "recipes/distill/tiny-cpu.toml"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of 24 JPEGs (2 classes) of sizes the crops must handle (40x32 .. 63x48)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(24):
        d = root / f"c{i % 2}"
        d.mkdir(exist_ok=True)
        w, h = 40 + i, 32 + i % 17
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def cfg_of(folder, **overrides):
    from hdcli.config import DistillConfig, load_config

    return load_config(DistillConfig, recipe=TINY, overrides={"data.source": str(folder), "data.num_workers": 0,
                                                              "train.batch_size": 8, **overrides})


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-6), ("fp16", 2e-3)])
def test_cached_targets_give_the_online_losses(folder, tmp_path, dtype, tolerance):
    from hdcli.cache import write
    from hdcli.tasks.distill import DistillTask

    cache = tmp_path / "cache"
    write.write(cfg_of(folder), cache, views=1, dtype=dtype, per_shard=10)
    seed_all(0)
    cached = DistillTask(cfg_of(folder, **{"distill.targets_cache": str(cache)}))
    assert all(p.is_meta for m in cached.model.teachers.values() for p in m.parameters())  # no teacher weights
    seed_all(0)
    online = DistillTask(cfg_of(folder))
    batch = next(iter(cached.train_loader(rank=0, world_size=1, seed=0)))
    seed_all(3)
    a = cached.loss(cached.model, batch)
    seed_all(3)
    b = online.loss(online.model, batch[:2])  # the same crops, the teachers run
    for k in ("loss", "loss_feat", "loss_rel", "part/mae/relations", "part/clip/features"):
        assert abs(float(a[k]) - float(b[k])) <= tolerance * abs(float(b[k])), (k, float(a[k]), float(b[k]))


def test_a_cache_of_another_recipe_or_gone_data_is_one_line(folder, tmp_path):
    from hdcli.cache import write
    from hdcli.tasks.distill import DistillTask

    cache = tmp_path / "cache"
    write.write(cfg_of(folder), cache, views=2, per_shard=10)
    with pytest.raises(HDError, match=r"written for another run \(masking.drop_ratio: 0.3 -> 0.5\)"):
        DistillTask(cfg_of(folder, **{"distill.targets_cache": str(cache), "distill.drop_ratio": 0.5}))
    with pytest.raises(HDError, match=r"holds a cache of another recipe or data \(views: 2 -> 3\)"):
        write.write(cfg_of(folder), cache, views=3, per_shard=10)
    moved = tmp_path / "moved"
    folder.rename(moved)
    try:
        with pytest.raises(HDError, match="data path not found"):
            DistillTask(cfg_of(folder, **{"distill.targets_cache": str(cache)}))
    finally:
        moved.rename(folder)


def test_a_full_disk_keeps_the_complete_shards_and_the_same_command_finishes(folder, tmp_path, monkeypatch):
    from hdcli.cache import layout, write

    cache = tmp_path / "cache"
    monkeypatch.setenv("HD_FAULT_INJECT", "cache_enospc_after=13")  # the second shard fails while it is written
    with pytest.raises(HDError, match=r"could not write .*targets-000001.tar: No space left on device"):
        write.write(cfg_of(folder), cache, views=1, per_shard=10)
    assert sorted(p.name for p in cache.iterdir()) == [layout.HEADER, layout.index_name(0), layout.shard_name(0)]
    first = (cache / layout.shard_name(0)).read_bytes()
    monkeypatch.delenv("HD_FAULT_INJECT")
    write.write(cfg_of(folder), cache, views=1, per_shard=10)
    assert (cache / layout.shard_name(0)).read_bytes() == first  # kept, not rewritten
    assert all((cache / layout.shard_name(s)).exists() for s in range(3))


def test_a_truncated_shard_is_skipped_and_counted_under_the_budget(folder, tmp_path):
    from hdcli.cache import layout, write
    from hdcli.tasks.distill import DistillTask

    cache = tmp_path / "cache"
    write.write(cfg_of(folder), cache, views=1, per_shard=10)
    shard = cache / layout.shard_name(2)  # 4 images
    shard.write_bytes(shard.read_bytes()[:2000])
    task = DistillTask(cfg_of(folder, **{"distill.targets_cache": str(cache), "data.max_bad_fraction": 0.5,
                                         "train.batch_size": 4}))
    loader = task.train_loader(rank=0, world_size=1, seed=0)
    batches = list(loader)
    assert loader.bad_samples >= 3 and sum(len(b[0]) for b in batches if b is not None) <= 24 - 3
    strict = DistillTask(cfg_of(folder, **{"distill.targets_cache": str(cache), "data.max_bad_fraction": 0.0,
                                           "train.batch_size": 4}))
    with pytest.raises(HDError, match="unreadable images"):
        list(strict.train_loader(rank=0, world_size=1, seed=0))


def _wait_for(path, proc, seconds=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        assert time.time() - t0 < seconds
        time.sleep(0.2)


@pytest.mark.slow
def test_the_smoke_chain_caches_the_demo_trains_from_it_and_resumes_both(tmp_path):
    """Cache the tiny recipe's targets on the demo digits (K = 2), killed once and completed by the same command;
    train from it, killed once and resumed; the student exports and loads in timm."""
    import timm

    from hdcli.cache import layout

    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "hdcli", "cache-targets", "--recipe", str(TINY), "--views", "2", "--maxcount",
            "400", "--out", str(cache)]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(cache / layout.shard_name(0), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not all((cache / layout.shard_name(s)).exists() for s in range(4))  # killed before the end
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    header = json.loads((cache / layout.HEADER).read_text())
    assert header["shards"] == 4 and all((cache / layout.shard_name(s)).exists() for s in range(4))
    assert not list(cache.glob(".tmp-*"))

    run = tmp_path / "run"
    train = ["distill", "--recipe", str(TINY), "--targets-cache", str(cache), "--steps", "12", "--save-every", "4",
             "--log-every", "4", "--num-workers", "0", "--no-plot", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "hdcli", *train], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(run / "checkpoints" / "step_0000004" / "state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run_hd(*train, "--resume", "auto")
    assert r.returncode == 0 and "resuming from" in r.stderr and "no teacher is loaded" in r.stderr, r.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == [4, 8, 12]
    student = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True)
    assert student.embed_dim == 48 and torch.isfinite(next(student.parameters())).all()


def test_the_estimate_names_bytes_per_view_epoch_and_all(folder):
    r = run_hd("cache-targets", "--recipe", str(TINY), "--data", str(folder), "--views", "3", "--estimate",
               "--out", "/nonexistent/cache")
    assert r.returncode == 0, r.stderr
    assert "per view" in r.stderr and "per epoch (24 images" in r.stderr and "(3 views per image" in r.stderr
