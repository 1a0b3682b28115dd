"""Issue 10 end to end, through the real ``hd distill``: bad input, crashes and preemption never lose work.

The unit-level proofs live with their modules (tests/test_data.py: corrupt JPEG in a shard, truncated
tar, empty dir, brace pattern, missing path; tests/test_engine.py: NaN skip and tolerance, SIGTERM and
exact resume, crash while saving, checkpoint mismatch; tests/test_config.py: unknown keys, impossible
numbers; tests/test_method.py: head mismatch, out-of-range blocks; tests/test_teachers.py: unknown
teacher). Here each fault goes through the command line a user types: one red line and exit 2, or a
warning and a count, with the run dir left as the issue promises. docs/troubleshooting.md points here.

Faults are made for real where possible: corrupt and truncated JPEG bytes and cut weight files written by
the test, a real ``kill -TERM`` of the process group of a running ``hd distill`` (data worker included),
a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG as on a full disk), a learning rate that
overflows the weights, a file where the run dir should be. Only the free-space check uses a test hook
(``HD_FAULT_INJECT=free_bytes=N``: the disk check sees N bytes free).
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import REPO, tiny_vit
from PIL import Image

from hdcli.config import OptimConfig, TrainConfig
from hdcli.errors import HDError
from hdcli.train import checkpoints, engine

RECIPE = ["distill", "--recipe", str(REPO / "recipes/distill/tiny-cpu.toml"), "-b", "8"]
TINY = [*RECIPE, "--num-workers", "0"]
STEPS = 36  # 6 epochs of the 48-image folder (6 batches of 8): long enough to be killed mid-run
LOG = 4


def jpeg_bytes(seed: int) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def hd_main(*args: str) -> int:
    """The real CLI entry point in-process (cheap for runs that fail before training): the exit code."""
    from hdcli.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def step_dirs(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# ---------------------------------------------------------------- one uninterrupted run, one killed run

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ROOT/train/c{0,1,2}/: 47 readable JPEGs and one truncated (c0/bad.jpg, the first half of a JPEG)."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(47):
        d = root / "train" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.jpg").write_bytes(jpeg_bytes(i))
    whole = jpeg_bytes(99)
    (root / "train" / "c0" / "bad.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def folder_args(folder: Path, out: Path, workers: int = 0) -> list[str]:
    return [*RECIPE, "--num-workers", str(workers), "--data", str(folder), "--steps", str(STEPS),
            "--log-every", str(LOG), "--save-every", "12", "--max-bad-fraction", "0.05",
            "--set", "optim.warmup_steps=4", "--out", str(out)]


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory) -> dict:
    """``full``: uninterrupted; ``cut``: the same run with a DataLoader worker, its whole process group sent
    SIGTERM once it has logged a step (as SLURM preemption and Ctrl-C signal every process of the job,
    data workers included). Both start together (the second costs little extra wall time on 2 cores)."""
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "COLUMNS": "200"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "hdcli", *folder_args(folder, root / name, workers)],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
             for name, workers in (("full", 0), ("cut", 1))}
    log = root / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().strip()) and procs["cut"].poll() is None:
        assert time.monotonic() < deadline, "the run logged no step in 300 s"
        time.sleep(0.01)
    os.killpg(procs["cut"].pid, signal.SIGTERM)  # kill -TERM -- -PGID: the main process and its data worker
    out = {"root": root}
    for name, p in procs.items():
        _, stderr = p.communicate(timeout=600)
        out[name] = {"dir": root / name, "rc": p.returncode, "stderr": stderr}
    return out


@pytest.mark.slow
def test_kill_term_then_resume_auto_equals_an_uninterrupted_run(runs, capfd):
    full, cut = runs["full"], runs["cut"]
    assert full["rc"] == 0, full["stderr"][-3000:]
    assert cut["rc"] == 143, cut["stderr"][-3000:]  # 128 + SIGTERM: a scheduler sees the stop
    stop = json.loads((sorted((cut["dir"] / "checkpoints").glob("step_*"))[-1] / "state.json").read_text())["step"]
    assert 0 < stop < STEPS and not (cut["dir"] / "student").exists()
    assert f"SIGTERM received: stopped at step {stop}/{STEPS}" in cut["stderr"]
    assert f"Resume with: hd distill --out {cut['dir']} --resume auto" in cut["stderr"]

    capfd.readouterr()
    code = hd_main("distill", "--out", str(cut["dir"]), "--resume", "auto")  # the printed command, as is
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    assert f"step_{stop:07d} (step {stop}/{STEPS})" in err  # the newest complete checkpoint
    a = safetensors(full["dir"] / "student" / "model.safetensors")
    b = safetensors(cut["dir"] / "student" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # logged losses average the steps since the previous record: compare windows wholly after the stop
    after = [(x["step"], x["loss"]) for x in metrics(full["dir"]) if x["step"] - LOG >= stop]
    resumed = [(x["step"], x["loss"]) for x in metrics(cut["dir"]) if x["step"] - LOG >= stop]
    assert after and [s for s, _ in after] == [s for s, _ in resumed]
    assert [v for _, v in after] == pytest.approx([v for _, v in resumed], abs=1e-6)


@pytest.mark.slow
def test_a_truncated_image_is_skipped_named_and_counted_in_metrics(runs):
    full = runs["full"]
    assert full["rc"] == 0, full["stderr"][-3000:]
    assert "skipping unreadable image" in full["stderr"] and "bad.jpg" in full["stderr"]
    recs = metrics(full["dir"])
    assert recs[-1]["step"] == STEPS and recs[-1]["bad_images"] == STEPS // 6  # once per epoch of 6 batches
    assert all(x["bad_images"] >= 1 for x in recs[1:])  # the count is logged as it grows


def copy_newest_checkpoint(src: Path, run: Path) -> Path:
    """A run dir holding only ``src``'s config.toml and newest checkpoint (copied by hand); returns that checkpoint."""
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "config.toml", run / "config.toml")
    newest = sorted((src / "checkpoints").glob("step_*"))[-1]
    shutil.copytree(newest, run / "checkpoints" / newest.name)
    return newest


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_lists_the_keys(runs, tmp_path, capfd):
    run = tmp_path / "run"
    newest = copy_newest_checkpoint(runs["full"]["dir"], run)
    other = ["distill", "--out", str(run), "--resume", "auto", "--set",
             "student.kwargs={embed_dim = 48, depth = 11, num_heads = 3}"]
    code = hd_main(*other)  # the config says so first: a changed student is refused with the keys listed
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert "would change what it trains (student.kwargs: {embed_dim = 48, depth = 12" in err
    code = hd_main(*other, "--allow-config-change")  # and the checkpoint itself cannot be loaded into it
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert "was written for another model" in err and "unexpected: student.blocks.11." in err
    assert step_dirs(run) == [newest.name]  # nothing written over it


@pytest.mark.slow
def test_a_cut_checkpoint_file_is_a_one_line_error(runs, tmp_path, capfd):
    run = tmp_path / "run"
    newest = copy_newest_checkpoint(runs["full"]["dir"], run)
    weights = run / "checkpoints" / newest.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])  # copied by hand, and the copy was cut
    code = hd_main("distill", "--out", str(run), "--resume", "auto")
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert f"checkpoint {run.resolve() / 'checkpoints' / newest.name} is damaged (model.safetensors" in err


# ---------------------------------------------------------------- data faults

def write_shard(path: Path, n: int, bad: dict[int, bytes]) -> None:
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            w.write({"__key__": f"sample{i:03d}", "jpg": bad.get(i, jpeg_bytes(i)), "cls": str(i % 2).encode()})


def test_unreadable_images_beyond_max_bad_fraction_stop_the_run(tmp_path, capfd):
    cut = jpeg_bytes(7)[:300]  # a truncated JPEG
    bad = {3: b"\xff\xd8\xff\xe0 not a jpeg", **{i: cut for i in (5, 9, 11, 15, 17, 21)}}  # 7: over the floor of 5
    write_shard(tmp_path / "train-000000.tar", 24, bad)
    out = tmp_path / "run"
    code = hd_main(*TINY, "--data", str(tmp_path), "--steps", "6", "--out", str(out))  # default: 0.1%
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    line = error_lines(err)[0]
    assert "unreadable images out of" in line and "more than the 5 allowed per epoch (0.10% of " in line
    assert "the first was sample0" in err and str(tmp_path / "train-000000.tar") in err
    assert not (out / "student").exists()


@pytest.mark.parametrize("fault", ["truncated tar", "brace pattern matching nothing", "empty dir", "missing path"])
def test_data_path_faults_fail_before_any_model_is_built(fault, tmp_path, capfd):
    shard = tmp_path / "shards" / "train-000000.tar"
    shard.parent.mkdir()
    if fault == "truncated tar":
        write_shard(shard, 8, {})
        shard.write_bytes(shard.read_bytes()[:5000])  # an interrupted copy
        source, named = str(shard.parent), str(shard)
    elif fault == "brace pattern matching nothing":
        source = named = str(tmp_path / "shards" / "val-{000000..000003}.tar")
    elif fault == "empty dir":
        source = named = str(shard.parent)
    else:
        source = named = str(tmp_path / "nowhere")
    out = tmp_path / "run"
    # teachers that cannot be resolved: the data error coming first shows the data was checked before
    # any teacher or student was looked at, let alone built
    code = hd_main(*TINY, "--data", source, "--teachers", f"local-dir:{tmp_path}/no-a,local-dir:{tmp_path}/no-b",
                   "--out", str(out))
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert named in error_lines(err)[0] and "no-a" not in err
    assert not out.exists()


# ---------------------------------------------------------------- model faults

@pytest.mark.parametrize(("flags", "words"), [
    (["--teachers", "mea,clip"], ["'mea'", "mae"]),
    (["--relation-blocks", "9,12"], ["12 blocks"]),
    (["--set", "distill.teacher_kwargs={patch_size = 4, embed_dim = 48, depth = 12, num_heads = 4}"],
     ["relation_heads='mean'"]),
], ids=["unknown teacher", "block out of range", "head mismatch"])
def test_model_faults_are_one_line_before_any_run_dir_exists(flags, words, tmp_path, capfd):
    out = tmp_path / "run"
    code = hd_main(*TINY, *flags, "--out", str(out))
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert all(w in error_lines(err)[0] for w in words), err
    assert not out.exists()  # no data loaded, no accelerator, nothing written


def test_cut_teacher_weights_are_a_one_line_error(tmp_path, capfd):
    from timm.models import save_for_hf

    teacher = tmp_path / "teacher"  # a run's student/ reused as a teacher, copied with an interrupted scp
    save_for_hf(tiny_vit("vit_base_patch16_224.mae"), str(teacher), safe_serialization=True)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "run"
    code = hd_main(*TINY, "--teachers", f"local-dir:{teacher},random:vit_base_patch16_clip_quickgelu_224.openai",
                   "--out", str(out))
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert f"cannot read the weights of teacher 'local-dir:{teacher}'" in err and "truncated or corrupt" in err
    assert not out.exists()


# ---------------------------------------------------------------- numerical faults

def test_a_non_finite_loss_stops_after_nan_tolerance_keeping_the_last_good_checkpoint(tmp_path, capfd):
    # lr 1e30: step 1 is finite and blows the weights up to ~1e30; from step 2 on the loss overflows
    out = tmp_path / "run"
    code = hd_main(*TINY, "--lr", "1e30", "--set", "optim.warmup_steps=0", "--steps", "12", "--nan-tolerance", "2",
                   "--save-every", "2", "--keep-checkpoints", "20", "--log-every", "1", "--out", str(out))
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert "the loss was not finite for 3 consecutive steps (up to step 4)" in err
    assert "last good checkpoint" in err and "--nan-tolerance" in err
    recs = metrics(out)
    assert [x["skipped_steps"] for x in recs] == [0, 1, 2, 3]
    ckpts = step_dirs(out)  # step 2 (after one skipped step) and step 4 (the third)
    assert ckpts == ["step_0000002", "step_0000004"] and ckpts[-1] in error_lines(err)[0]
    good = safetensors(out / "checkpoints" / "step_0000002" / "model.safetensors")
    for name in ckpts:  # every checkpoint loads; the skipped steps never touched the weights
        w = safetensors(out / "checkpoints" / name / "model.safetensors")
        assert all(w[k].isfinite().all() and (w[k] == good[k]).all() for k in good), name
    assert not (out / "student").exists()


# ---------------------------------------------------------------- disk faults

def test_free_space_is_checked_before_the_first_save(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HD_FAULT_INJECT", "free_bytes=1000000")  # the disk check sees 1 MB free
    out = tmp_path / "run"
    code = hd_main(*TINY, "--steps", "4", "--out", str(out))
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert f"only 976.6 KB free under {out.resolve()}" in err and "--keep-checkpoints" in err
    assert not (out / "metrics.jsonl").exists() and step_dirs(out) == []  # not one step was trained


@dataclass
class SmallConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=4, steps=2, save_every=2))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=0))


class SmallTask(engine.Task):
    """A 5-parameter model: its checkpoints fit under the file-size limit below, its 1.2 MB export does not."""

    def __init__(self):
        self.model = torch.nn.Linear(4, 1)

    def train_loader(self, *, rank, world_size, seed):
        return [(torch.ones(4, 4), torch.ones(4, 1))] * 2

    def loss(self, model, batch, *, detail=False):
        return {"loss": ((model(batch[0]) - batch[1]) ** 2).mean()}

    def export(self, model, out_dir):
        torch.save({"big": torch.zeros(300_000)}, out_dir / "weights.pt")


def test_a_failed_export_is_an_error_and_keeps_the_checkpoints(tmp_path):
    # the student export fails on a "full disk" (file-size limit; torch.save reports it as a RuntimeError)
    run = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, hard))
    try:
        with pytest.raises(HDError, match=f"could not write {run.resolve() / 'student'}: "):
            engine.train(SmallTask, SmallConfig(), run)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["step_0000002"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.toml", "metrics.jsonl"]


def test_an_unwritable_run_dir_is_a_one_line_error(tmp_path, capfd):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "run"  # permissions would not stop root; a file in the path stops everyone
    code = hd_main(*TINY, "--steps", "2", "--out", str(out))
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert f"cannot write to the run dir {out.resolve()}: Not a directory" in err


def test_a_failed_save_is_an_error_not_a_silent_skip(tmp_path, capfd):
    # a file-size limit: every write past 400 kB fails with EFBIG, as writes fail on a full disk (Python
    # ignores SIGXFSZ). The checkpoint's model.safetensors (~1.4 MB) is the first file that large.
    out = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, hard))
    try:
        code = hd_main(*TINY, "--steps", "4", "--save-every", "2", "--out", str(out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capfd.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err[-3000:]
    assert f"could not write checkpoint {out.resolve() / 'checkpoints' / 'step_0000002'}: " in err
    assert "File too large" in err and "done:" not in err
    assert step_dirs(out) == []  # neither a half-written step_* nor a temp dir is left
    assert not (out / "student").exists()
