"""Several students from one teacher pass (hdcli.method.students, `hd distill --students`): each student learns
exactly what its own single-student run would, the teachers run once per batch, and each student gets the
layout, records and export of a run of its own."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, one_and_two_ranks, run_hd

from hdcli.config import DistillConfig, load_config
from hdcli.seeding import seed_all

pytestmark = pytest.mark.usefixtures("one_thread")

WIDE = {"embed_dim": 96, "depth": 12, "num_heads": 3}  # twice the tiny teachers' width: the heads adapt
STUDENTS = [{"name": "small", "arch": "vit_small_patch16_224", "blr": 1e-3},
            {"name": "wide", "arch": "vit_base_patch16_224", "kwargs": WIDE, "drop_ratio": 0.5, "relation_blocks": [8, 10]}]
SINGLE = {"small": {"student.arch": "vit_small_patch16_224", "optim.blr": 1e-3},
          "wide": {"student.kwargs": WIDE, "distill.drop_ratio": 0.5, "distill.student_relation_blocks": [8, 10]}}


def tiny_cfg(**overrides):
    return load_config(DistillConfig, recipe=REPO / "recipes/distill/tiny-cpu.toml",
                       overrides={"train.batch_size": 4, "data.num_workers": 0, **overrides})


def test_each_student_gets_the_losses_and_signals_of_its_own_run_bitwise():
    from hdcli.tasks.distill import DistillTask

    seed_all(0)
    task = DistillTask(tiny_cfg(**{"distill.students": STUDENTS}))
    assert [m.name for m in task.members] == ["small", "wide"] and len(task.model.passes) == 2  # drop ratios differ
    batch = next(iter(task.train_loader(rank=0, world_size=1, seed=0)))
    ran = []
    hooks = [blk.register_forward_hook(lambda *a, n=n: ran.append(n)) for n, m in task.model.teachers.items()
             for blk in m.blocks[:1]]
    seed_all(5)  # what the engine does before a step
    out = task.loss(task.model, batch, detail=True)
    for h in hooks:
        h.remove()
    assert sorted(ran) == ["clip", "mae"]  # each teacher ran once for both students
    assert float(out["loss"]) == pytest.approx(float(out["small/loss"] + out["wide/loss"]))
    out["loss"].backward()  # one backward of the sum: each student's gradients are its own loss's
    for name, overrides in SINGLE.items():
        seed_all(0)
        single = DistillTask(tiny_cfg(**overrides))
        seed_all(5)
        own = single.loss(single.model, batch, detail=True)
        assert own.keys() == {k[len(name) + 1:] for k in out if k.startswith(f"{name}/")}
        assert all(torch.equal(own[k], out[f"{name}/{k}"]) for k in own), name
        own["loss"].backward()
        want = {n: p.grad for n, p in single.model.named_parameters() if p.grad is not None}
        got = {n: p.grad for n, p in task.model.members[name].named_parameters() if p.grad is not None}
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_students_with_the_same_teacher_side_share_one_teacher_pass():
    from hdcli.tasks.distill import DistillTask

    task = DistillTask(tiny_cfg(**{"distill.students": ["vit_small_patch16_224", "vit_base_patch16_224"]}))
    assert len(task.model.passes) == 1
    assert all(m.teacher_pass is task.model.passes[0] for m in task.model.members.values())
    assert not any(k.startswith("members.") and ".teacher_pass." in k for k in task.model.state_dict())


@pytest.mark.parametrize("value, message", [
    ("vit_smal_patch16_224", "vit_smal_patch16_224"),
    ("vit_small_patch16_224,vit_small_patch16_224", "two students are named 'vit_small_patch16_224'"),
    ("", "distill.students is empty"),
])
def test_bad_students_are_one_line_and_write_nothing(tmp_path, value, message):
    out = tmp_path / "run"
    r = run_hd("distill", "--recipe", str(REPO / "recipes/distill/tiny-cpu.toml"), "--students", value, "--steps", "2",
               "--out", str(out))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists()


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_students_train_as_their_own_runs_resume_and_load_in_timm(tmp_path):
    import timm
    from safetensors.torch import load_file

    students = "distill.students=[" + ", ".join(
        "{" + ", ".join(f"{k} = {json.dumps(v) if not isinstance(v, dict) else '{' + ', '.join(f'{a} = {b}' for a, b in v.items()) + '}'}"
                        for k, v in s.items()) + "}" for s in STUDENTS) + "]"
    common = ("--recipe", str(REPO / "recipes/distill/tiny-cpu.toml"), "--steps", "6", "-b", "8", "--log-every", "2",
              "--save-every", "2", "--num-workers", "0", "--no-plot")
    run = tmp_path / "two"
    r = run_hd("distill", *common, "--set", students, "--out", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("small", "wide"):
        own = run / "students" / name
        model = timm.create_model(f"local-dir:{own / 'student'}", pretrained=True)
        assert model.embed_dim == (96 if name == "wide" else 48)
        # its config.toml is the config of the single run it equals: that run logs the same losses, bit for bit
        single = tmp_path / f"single-{name}"
        r = run_hd("distill", "--recipe", str(own / "config.toml"), "--out", str(single))
        assert r.returncode == 0, r.stderr[-3000:]
        mine, theirs = _metrics(own), _metrics(single)
        assert [x["step"] for x in mine] == [x["step"] for x in theirs] == [2, 4, 6]
        assert [sorted(x) for x in mine] == [sorted(x) for x in theirs]
        for k in ("loss", "loss_feat", "loss_rel", "grad_norm", "lr", "part/mae/relations", "share/clip/features"):
            assert [x[k] for x in mine] == [x[k] for x in theirs], (name, k)
        a, b = load_file(own / "student" / "model.safetensors"), load_file(single / "student" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # resumed from its step-4 checkpoint, the run ends where the uninterrupted one did
    half = tmp_path / "half"
    (half / "checkpoints").mkdir(parents=True)
    (half / "config.toml").write_text((run / "config.toml").read_text())
    import shutil

    shutil.copytree(run / "checkpoints" / "step_0000004", half / "checkpoints" / "step_0000004")
    r = run_hd("distill", "--out", str(half), "--resume", "auto")
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-3000:]
    for name in ("small", "wide"):
        a = load_file(run / "students" / name / "student" / "model.safetensors")
        b = load_file(half / "students" / name / "student" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert [x["loss"] for x in _metrics(half / "students" / name) if "loss" in x] == \
            [x["loss"] for x in _metrics(run / "students" / name) if x.get("step", 0) > 4 and "loss" in x]


@pytest.mark.slow
def test_two_students_on_two_ranks_match_one_process(tmp_path):
    common = ("distill", "--recipe", str(REPO / "recipes/distill/tiny-cpu.toml"), "--students",
              "vit_small_patch16_224,vit_base_patch16_224", "--steps", "4", "--log-every", "1", "--drop-path", "0",
              "--num-workers", "0", "--no-plot")
    one, two = one_and_two_ranks(common, tmp_path, 29519)
    for name in ("vit_small_patch16_224", "vit_base_patch16_224"):
        l1 = [x["loss"] for x in _metrics(one / "students" / name) if "loss" in x]
        l2 = [x["loss"] for x in _metrics(two / "students" / name) if "loss" in x]
        assert len(l1) == len(l2) == 4 and max(abs(a - b) for a, b in zip(l1, l2, strict=True)) <= 1e-4


def test_teachers_run_at_their_own_precision():
    from hdcli.errors import HDError
    from hdcli.method.hybrid import teacher_dtype
    from hdcli.tasks.distill import DistillTask

    assert teacher_dtype("auto", "cpu") == torch.float32 and teacher_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(HDError, match="fp16 teachers need a CUDA GPU"):
        teacher_dtype("fp16", "cpu")
    fp32 = DistillTask(tiny_cfg())
    bf16 = DistillTask(tiny_cfg(**{"distill.teacher_dtype": "bf16"}))

    def teacher_bytes(task):
        return sum(p.numel() * p.element_size() for m in task.model.teachers.values() for p in m.parameters())

    assert teacher_bytes(bf16) * 2 == teacher_bytes(fp32)
    assert all(p.dtype == torch.bfloat16 for m in bf16.model.teachers.values() for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in bf16.model.student.parameters())
    batch = next(iter(bf16.train_loader(rank=0, world_size=1, seed=0)))
    out = bf16.loss(bf16.model, batch)
    ref = fp32.loss(fp32.model, batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert float(out["loss"]) == pytest.approx(float(ref["loss"]), rel=0.05)  # bf16 targets: about 3 digits
