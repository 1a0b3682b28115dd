"""``hd distill`` end to end on the CPU: tiny ViTs (img 32, patch 4, depth 12, dim 48, 3 heads), the demo
digits, tiny MAE- and CLIP-architecture teachers written by the test in timm's save_for_hf layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_hd, tiny_vit

TINY_STUDENT = ["--student", "vit_base_patch16_224", "--img-size", "32", "--patch-size", "4",
                "--set", "student.kwargs={embed_dim = 48, depth = 12, num_heads = 3}"]


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory) -> list[str]:
    """A tiny MAE-architecture and a tiny CLIP-architecture teacher (random weights), as local dirs."""
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("teachers")
    out = []
    for i, arch in enumerate(("vit_base_patch16_224.mae", "vit_base_patch16_clip_quickgelu_224.openai")):
        d = root / arch.split(".")[-1]
        save_for_hf(tiny_vit(arch, seed=10 + i), str(d), safe_serialization=True)
        out.append(f"local-dir:{d}")
    return out


def distill_args(teachers: list[str], out: Path, *extra: str) -> list[str]:
    return ["distill", "--teachers", ",".join(teachers), *TINY_STUDENT, "--num-workers", "0",
            "--set", "optim.warmup_steps=5", "--blr", "8e-3", "--out", str(out), *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------- fast: config and errors

def test_print_config_applies_recipe_then_flags_then_set():
    r = run_hd("distill", "--recipe", "recipes/distill/tiny-cpu.toml", "--steps", "7", "--set", "optim.min_lr=1e-6",
               "--print-config")
    assert r.returncode == 0, r.stderr
    import tomllib

    cfg = tomllib.loads(r.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["train"]["batch_size"] == 32 and cfg["optim"]["min_lr"] == 1e-6
    assert cfg["distill"]["teachers"][0].startswith("random:") and cfg["data"]["img_size"] == 32


def test_unknown_recipe_key_is_a_one_line_error_with_the_closest_key(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[distill]\ndrop_ration = 0.5\n")
    r = run_hd("distill", "--recipe", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "distill.drop_ratio" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_impossible_numbers_fail_before_any_work(tmp_path):
    r = run_hd("distill", "--drop-ratio", "1.0", "--batch-size", "0", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "must be" in r.stderr and not (tmp_path / "run").exists()


def test_unknown_teacher_names_the_closest_registry_names():
    from hdcli.errors import HDError
    from hdcli.tasks.distill import DistillTask

    with pytest.raises(HDError) as e:  # raised by the task before any model is built
        DistillTask(tiny_cfg(**{"distill.teachers": ["mea", "clip"]}))
    assert "mea" in e.value.problem and "mae" in str(e.value)


# ---------------------------------------------------------------- slow: real runs

@pytest.mark.slow
def test_tiny_distill_on_demo_learns_and_the_student_loads_with_timm(tmp_path, teacher_dirs):
    import timm
    import torch

    out = tmp_path / "run"
    r = run_hd(*distill_args(teacher_dirs, out, "--steps", "50", "-b", "16", "--log-every", "10",
                             "--save-every", "25"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"config.toml", "metrics.jsonl", "checkpoints", "student"}
    recs = metrics(out)
    assert [x["step"] for x in recs] == [10, 20, 30, 40, 50]
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"], [x["loss"] for x in recs]
    assert "step 50/50" in r.stderr and "loss" in r.stderr  # plain log lines when not a terminal

    student = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True).eval()
    saved = load_safetensors(out / "student" / "model.safetensors")
    assert student.state_dict().keys() == saved.keys() and not any("head" in k for k in saved if k != "head")
    assert all(torch.equal(student.state_dict()[k], v) for k, v in saved.items())
    with torch.no_grad():
        assert student.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 65, 48)


@pytest.mark.slow
def test_resume_n_plus_n_equals_2n(tmp_path, teacher_dirs):
    full, half = tmp_path / "full", tmp_path / "half"
    r = run_hd(*distill_args(teacher_dirs, full, "--steps", "8", "-b", "8", "--save-every", "4",
                             "--log-every", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    (half / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.toml", half / "config.toml")
    shutil.copytree(full / "checkpoints" / "step_0000004", half / "checkpoints" / "step_0000004")
    r = run_hd("distill", "--out", str(half), "--resume", "auto")  # everything else from <run>/config.toml
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    a = load_safetensors(full / "student" / "model.safetensors")
    b = load_safetensors(half / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max().item() <= 1e-6 for k in a)
    after = [x["loss"] for x in metrics(full) if x["step"] > 4]
    assert after == pytest.approx([x["loss"] for x in metrics(half)], abs=1e-6)


@pytest.mark.slow
def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(tmp_path, teacher_dirs):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--steps", "6", "--log-every", "1", "--drop-path", "0", "--eval-every", "6", "--eval-samples", "101,51")
    r1 = run_hd(*distill_args(teacher_dirs, one, "-b", "16", *common))
    assert r1.returncode == 0, r1.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "hdcli", *distill_args(teacher_dirs, two, "-b", "8", *common)]
    r2 = subprocess.run(torchrun, capture_output=True, text=True, cwd=REPO, timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 process(es), global batch 16" in r2.stderr and r2.stderr.count("done: 6 steps") == 1
    l1, l2 = [x["loss"] for x in metrics(one) if "loss" in x], [x["loss"] for x in metrics(two) if "loss" in x]
    assert len(l1) == len(l2) == 6 and max(abs(a - b) for a, b in zip(l1, l2, strict=True)) <= 1e-4
    # the k-NN evaluation, sharded over the ranks (101 bank and 51 query images: uneven shares) and gathered,
    # gives the 1-process numbers: at step 0 (the same weights) exactly, for the student and both teachers
    k1, k2 = ({k: v for k, v in metrics(run)[0].items() if k.startswith("knn/")} for run in (one, two))
    assert len(k1) == 6 and k1 == k2

    # and the two ranks read different samples: their batches split the single process's batch
    import torch

    from hdcli import data

    def first(rank, world, b):
        return next(iter(data.build_loader("demo", img_size=32, batch_size=b, num_workers=0, rank=rank,
                                           world_size=world, seed=0)))[0]

    r0, r1_, whole = first(0, 2, 8), first(1, 2, 8), first(0, 1, 16)
    assert not torch.equal(r0, r1_) and torch.equal(torch.cat([r0, r1_]), whole)


# ---------------------------------------------------------------- the task, in-process

def tiny_cfg(**overrides):
    from hdcli.config import DistillConfig, load_config

    return load_config(DistillConfig, recipe=REPO / "recipes/distill/tiny-cpu.toml",
                       overrides={"train.batch_size": 4, "data.num_workers": 0, **overrides})


def test_tiny_recipe_builds_the_hybrid_with_progressive_masking():
    import torch

    from hdcli.method import Target
    from hdcli.tasks.distill import DistillTask

    task = DistillTask(tiny_cfg())
    # the paper's two targets, named by the teachers' labels (random:<registry tag> -> the registry name)
    assert task.model.targets == (Target("mae", "relations", (9, 10)), Target("clip", "features"))
    assert task.model.teacher_pass.mask_teacher == "mae" and task.model.n_keep == 22  # 64 -> 45 -> 32 -> 22
    assert sorted(task.model.teachers) == ["clip", "mae"] and not task.find_unused_parameters
    assert all(not p.requires_grad for m in task.model.teachers.values() for p in m.parameters())
    batch = next(iter(task.train_loader(rank=0, world_size=1, seed=0)))
    out = task.loss(task.model, batch)
    assert {"loss", "loss_feat", "loss_rel"} <= out.keys() and torch.isfinite(out["loss"])


def test_general_targets_build_a_single_teacher_baseline():
    from hdcli.tasks.distill import DistillTask

    clip = "random:vit_base_patch16_clip_quickgelu_224.openai"
    task = DistillTask(tiny_cfg(**{"distill.teachers": [clip], "distill.masking": "none",
                                   "distill.targets": [{"teacher": clip, "kind": "features"}]}))
    assert task.model.n_keep == 64 and task.model.teacher_pass.mask_teacher is None
    assert [t.name for t in task.model.targets] == ["clip/features"]


def test_the_hybrid_by_flags_and_as_explicit_targets_logs_the_same_names_and_losses():
    """One naming scheme whatever the spelling (docs/distill.md "Metric names"): the tiny recipe's two teachers as
    the hybrid default, and the same two targets written as [[distill.targets]], in the other order."""
    import torch

    from hdcli.seeding import seed_all
    from hdcli.tasks.distill import DistillTask

    mae, clip = tiny_cfg().distill.teachers
    spelled = {"distill.targets": [{"teacher": clip, "kind": "features"},
                                   {"teacher": mae, "kind": "relations", "blocks": [9, 10]}],
               "distill.mask_teacher": mae}
    outs = []
    for overrides in ({}, spelled):
        seed_all(0)
        task = DistillTask(tiny_cfg(**overrides))
        batch = next(iter(task.train_loader(rank=0, world_size=1, seed=0)))
        seed_all(1)
        outs.append(task.loss(task.model, batch, detail=True))
    by_flags, by_targets = outs
    assert sorted(by_flags) == sorted(by_targets)
    assert {"part/mae/relations", "part/clip/features", "share/mae/relations", "cos/clip/features",
            "attn/mae/relations/9"} <= by_flags.keys()
    assert all(torch.equal(by_flags[k], by_targets[k]) for k in by_flags), \
        {k: (float(by_flags[k]), float(by_targets[k])) for k in by_flags}


def test_export_writes_the_student_alone_with_imagenet_statistics(tmp_path):
    import timm
    import torch

    from hdcli.data import IMAGENET_MEAN, IMAGENET_STD
    from hdcli.tasks.distill import DistillTask

    task = DistillTask(tiny_cfg())
    task.export(task.model, tmp_path)
    student = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert tuple(student.pretrained_cfg["mean"]) == IMAGENET_MEAN and tuple(student.pretrained_cfg["std"]) == IMAGENET_STD
    saved = load_safetensors(tmp_path / "model.safetensors")
    assert saved.keys() == task.model.student.state_dict().keys()  # no heads, no teachers
    assert all(torch.equal(saved[k], v) for k, v in task.model.student.state_dict().items())
