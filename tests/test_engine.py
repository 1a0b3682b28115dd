"""hdcli.train.engine on a toy task (an MLP regression, in-process): schedule, weight decay groups, the loop,
exact resume, accumulation, non-finite steps, SIGTERM, atomic checkpoints, refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from hdcli.config import OptimConfig, TrainConfig
from hdcli.errors import HDError
from hdcli.seeding import mix_seed
from hdcli.train import checkpoints, engine, optim, setup


@dataclass
class ToyConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def toy_cfg(**train) -> ToyConfig:
    c = ToyConfig()
    c.train.batch_size, c.train.steps, c.train.log_every, c.train.save_every = 8, 12, 4, 6
    c.optim.blr, c.optim.warmup_steps = 3.0, 2
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


class ToyLoader:
    """100 fixed samples; per (seed, epoch) permutation; global batch i sliced by rank (like hdcli.data)."""

    def __init__(self, x, y, batch_size, rank, world_size, seed):
        self.x, self.y, self.b, self.rank, self.world, self.seed = x, y, batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x) // (self.b * self.world)

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 997 + self.epoch))
        g = self.b * self.world
        for i in range(len(self)):
            idx = perm[i * g + self.rank * self.b:i * g + (self.rank + 1) * self.b]
            yield self.x[idx], self.y[idx]


class ToyNet(nn.Module):
    def __init__(self, width, dropout, teacher=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Dropout(dropout), nn.GELU(), nn.Linear(width, 1))
        self.teacher = nn.Linear(4, 1).requires_grad_(False) if teacher else None

    def forward(self, x):
        y = self.net(x)
        return y if self.teacher is None else y + self.teacher(x)


class Toy(engine.Task):
    """y = sum(x); dropout makes the model-side RNG matter for resume checks."""

    def __init__(self, cfg, width=16, nan_at=(), sigterm_at=None, frozen=False, dropout=0.2):
        self.model = ToyNet(width, dropout, teacher=frozen)
        if frozen:  # a frozen submodule (a teacher registered inside the trainable module)
            self.frozen = [self.model.teacher]
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(100, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)
        self.cfg, self.nan_at, self.sigterm_at, self.calls = cfg, set(nan_at), sigterm_at, 0

    def train_loader(self, *, rank, world_size, seed):
        return ToyLoader(self.x, self.y, self.cfg.train.batch_size, rank, world_size, seed)

    def loss(self, model, batch, *, detail=False):
        step = self.calls // self.cfg.train.accum_steps
        self.calls += 1
        if self.sigterm_at is not None and step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "mse_half": loss / 2}

    def export(self, model, out_dir):
        torch.save({k: v for k, v in model.state_dict().items()}, out_dir / "weights.pt")


def run(tmp, cfg, name="run", **kw):
    resume = kw.pop("resume", None)
    return engine.train(lambda: Toy(cfg, **kw), cfg, tmp / name, resume=resume)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "student" / "weights.pt")


def same(a: dict, b: dict, tol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max().item() <= tol for k in a)


# ---------------------------------------------------------------- pure pieces

def test_lr_warms_up_linearly_then_follows_a_half_cosine():
    f = dict(total=110, warmup=10, peak=1.0, min_lr=0.1)
    assert optim.lr_at(0, **f) == 0.0 and optim.lr_at(5, **f) == pytest.approx(0.5)
    assert optim.lr_at(10, **f) == pytest.approx(1.0)
    assert optim.lr_at(60, **f) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert optim.lr_at(110, **f) == pytest.approx(0.1)


def test_lr_scales_with_the_global_batch():
    assert optim.scaled_lr(1.5e-4, 1024) == pytest.approx(6e-4)
    assert optim.scaled_lr(1.5e-4, 1024, lr=1e-3) == 1e-3


def test_total_steps_from_epochs_and_accumulation():
    assert optim.total_steps(epochs=3, steps=None, batches_per_epoch=10, accum_steps=2) == 15
    assert optim.total_steps(epochs=3, steps=7, batches_per_epoch=10, accum_steps=2) == 7


def test_no_weight_decay_for_norms_biases_pos_embed_and_cls_token(make_tiny_vit):
    model = nn.ModuleDict({"student": make_tiny_vit(), "head": nn.Linear(48, 8)})
    no_decay, decay = optim.param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    dd = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert {"student.pos_embed", "student.cls_token", "student.norm.weight", "student.blocks.0.attn.qkv.bias",
            "head.bias"} <= nd
    assert {"student.blocks.0.attn.qkv.weight", "student.patch_embed.proj.weight", "head.weight"} <= dd
    assert nd.isdisjoint(dd) and len(nd) + len(dd) == len(names)


def test_step_seeds_differ_across_rank_and_step():
    seeds = {mix_seed(0, 2, r, s, 0) for r in range(4) for s in range(100)}
    assert len(seeds) == 400


def test_free_space_check_refuses_an_impossible_need(tmp_path):
    with pytest.raises(HDError, match="free under"):
        checkpoints.check_free_space(tmp_path, 1 << 62)


# ---------------------------------------------------------------- the loop

def test_toy_run_learns_and_writes_the_run_dir(tmp_path):
    cfg = toy_cfg(steps=24, keep_checkpoints=2)
    r = run(tmp_path, cfg)
    d = tmp_path / "run"
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [4, 8, 12, 16, 20, 24]
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"] and r["last_loss"] == recs[-1]["loss"]
    assert {"lr", "img_per_s", "grad_norm", "mse_half", "skipped_steps", "epoch"} <= recs[0].keys()
    assert [p.name for p in checkpoints.list_checkpoints(d)] == ["step_0000018", "step_0000024"]
    assert (d / "config.toml").is_file() and (d / "student" / "weights.pt").is_file()
    assert not list((d / "checkpoints").glob(".tmp-*"))


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    cfg = toy_cfg(steps=12, save_every=5)  # 12 batches per epoch: step 5 is mid-epoch, 12 crosses an epoch
    run(tmp_path, cfg, "full")
    half = tmp_path / "half" / "checkpoints"
    half.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000010", half / "step_0000010")
    run(tmp_path, cfg, "half", resume="auto")
    assert same(weights(tmp_path / "full"), weights(tmp_path / "half"))


def test_accumulation_of_two_half_batches_equals_one_full_batch(tmp_path):
    a = toy_cfg(batch_size=8, accum_steps=2, steps=6)
    b = toy_cfg(batch_size=16, accum_steps=1, steps=6)
    engine.train(lambda: Toy(a, dropout=0.0), a, tmp_path / "a")
    engine.train(lambda: Toy(b, dropout=0.0), b, tmp_path / "b")
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"), tol=1e-6)


def test_frozen_submodules_stay_fixed_and_out_of_checkpoints(tmp_path):
    cfg = toy_cfg(steps=6)
    task_box = {}

    def make():
        task_box["t"] = Toy(cfg, frozen=True)
        task_box["w0"] = task_box["t"].model.teacher.weight.detach().clone()
        return task_box["t"]

    engine.train(make, cfg, tmp_path / "run")
    assert torch.equal(task_box["t"].model.teacher.weight, task_box["w0"])
    from safetensors.torch import load_file

    keys = load_file(str(checkpoints.list_checkpoints(tmp_path / "run")[-1] / "model.safetensors")).keys()
    assert keys and not any(k.startswith("teacher.") for k in keys)


def test_non_finite_steps_are_skipped_without_touching_the_weights(tmp_path):
    from safetensors.torch import load_file

    cfg = toy_cfg(steps=6, save_every=5, keep_checkpoints=5, nan_tolerance=2)
    run(tmp_path, cfg, "nan", nan_at={5})  # the last step (0-based 5) has a NaN loss: skipped
    run(tmp_path, cfg, "ref")
    recs = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["skipped_steps"] == 1
    after_skip = load_file(str(tmp_path / "nan" / "checkpoints" / "step_0000006" / "model.safetensors"))
    before = load_file(str(tmp_path / "ref" / "checkpoints" / "step_0000005" / "model.safetensors"))
    assert same(after_skip, before)


def test_too_many_non_finite_steps_stop_with_an_error_and_keep_the_checkpoint(tmp_path):
    cfg = toy_cfg(steps=12, save_every=4, nan_tolerance=2)
    with pytest.raises(HDError, match="not finite for 3 consecutive steps"):
        run(tmp_path, cfg, nan_at={6, 7, 8, 9, 10, 11})
    ckpts = checkpoints.list_checkpoints(tmp_path / "run")  # steps 7-9 were skipped: step 8's weights are good
    assert [p.name for p in ckpts] == ["step_0000004", "step_0000008"]
    assert not (tmp_path / "run" / "student").exists()


def test_sigterm_saves_at_the_next_step_boundary_and_resume_continues_exactly(tmp_path):
    cfg = toy_cfg(steps=12, save_every=100)
    r = run(tmp_path, cfg, "cut", sigterm_at=4)
    assert r["interrupted"] == "SIGTERM" and r["student"] is None
    stop = checkpoints.list_checkpoints(tmp_path / "cut")[-1]
    assert 5 <= json.loads((stop / "state.json").read_text())["step"] <= 6
    run(tmp_path, cfg, "cut", resume="auto")
    run(tmp_path, cfg, "full")
    assert same(weights(tmp_path / "cut"), weights(tmp_path / "full"))


def test_a_crash_while_saving_leaves_the_previous_checkpoint_complete(tmp_path, monkeypatch):
    from accelerate import Accelerator

    cfg = toy_cfg(steps=12, save_every=4, keep_checkpoints=1)
    real = Accelerator.save_state
    calls = {"n": 0}

    def flaky(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save dies half-way
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", flaky)
    with pytest.raises(HDError, match="could not write checkpoint"):
        run(tmp_path, cfg)
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "run")] == ["step_0000004"]
    assert checkpoints.find_checkpoint("auto", tmp_path / "run").name == "step_0000004"
    r = run(tmp_path, cfg, resume="auto")  # the previous checkpoint loads and the run completes
    assert r["steps"] == 12


def test_a_run_dir_with_checkpoints_needs_resume(tmp_path):
    cfg = toy_cfg(steps=4)
    run(tmp_path, cfg)
    with pytest.raises(HDError, match="--resume auto"):
        run(tmp_path, cfg)


def test_a_checkpoint_of_another_model_lists_the_mismatch(tmp_path):
    cfg = toy_cfg(steps=4)
    run(tmp_path, cfg)
    with pytest.raises(HDError, match="shape mismatch: .*net.0.weight"):
        run(tmp_path, cfg, width=32, resume="auto")


def test_find_checkpoint_accepts_run_dirs_and_checkpoint_dirs(tmp_path):
    cfg = toy_cfg(steps=8, save_every=4)
    run(tmp_path, cfg)
    d = tmp_path / "run"
    newest = d / "checkpoints" / "step_0000008"
    assert checkpoints.find_checkpoint(str(d), tmp_path) == newest
    assert checkpoints.find_checkpoint(str(d / "checkpoints"), tmp_path) == newest
    assert checkpoints.find_checkpoint(str(d / "checkpoints" / "step_0000004"), tmp_path).name == "step_0000004"
    assert checkpoints.find_checkpoint("auto", tmp_path / "empty") is None
    with pytest.raises(HDError, match="no complete checkpoint"):
        checkpoints.find_checkpoint(str(tmp_path / "nothing"), tmp_path)


def test_lr_of_logged_steps_follows_the_schedule(tmp_path):
    cfg = toy_cfg(steps=8, log_every=1)
    run(tmp_path, cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    peak = 3.0 * 8 / 256
    want = [optim.lr_at(s, total=8, warmup=2, peak=peak) for s in range(8)]
    assert [r["lr"] for r in recs] == pytest.approx(want)
    assert math.isclose(max(r["lr"] for r in recs), peak)


class InfBias(Toy):
    """The last layer's bias turns infinite at step 3 while every gradient stays finite (no step is skipped)."""

    def loss(self, model, batch, *, detail=False):
        if self.calls == 3:
            with torch.no_grad():
                model.net[3].bias.fill_(float("inf"))
        self.calls += 1
        x, y = batch
        return {"loss": ((model.net[0](x)).sum(1, keepdim=True) - y).pow(2).mean()}


def test_non_finite_final_weights_are_never_exported(tmp_path):
    cfg = toy_cfg(steps=6, save_every=100)
    with pytest.raises(HDError, match=r"final weights are not finite \(1 tensor\(s\), e.g. net.3.bias\)"):
        engine.train(lambda: InfBias(cfg), cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "student").exists()


@dataclass
class IdConfig(ToyConfig):
    IDENTITY = ("optim.weight_decay",)  # stands for what defines a method (distill: student, distill, img size)


def test_a_resume_that_changes_the_identity_is_refused_or_recorded_as_a_new_segment(tmp_path):
    cfg = IdConfig()
    cfg.train.batch_size, cfg.train.steps, cfg.train.save_every, cfg.optim.warmup_steps = 8, 4, 4, 1
    engine.train(lambda: Toy(cfg), cfg, tmp_path / "run")
    before = (tmp_path / "run" / "config.toml").read_text()
    cfg.train.steps, cfg.optim.weight_decay = 8, 0.1
    with pytest.raises(HDError, match=r"would change what it trains \(optim.weight_decay: 0.05 -> 0.1\)"):
        engine.train(lambda: Toy(cfg), cfg, tmp_path / "run", resume="auto")
    assert (tmp_path / "run" / "config.toml").read_text() == before  # the record of the first segment is kept
    engine.train(lambda: Toy(cfg), cfg, tmp_path / "run", resume="auto", allow_config_change=True)
    assert (tmp_path / "run" / "config-history" / "until_step_0000004.toml").read_text() == before
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    change = next(r for r in recs if "config_change" in r)
    assert change["step"] == 4 and change["config_change"] == {"optim.weight_decay": ["0.05", "0.1"]}
    assert "weight_decay = 0.1" in (tmp_path / "run" / "config.toml").read_text()


class TermDuringExport(Toy):
    """SIGTERM (a real signal, to this process) arrives while the final export is being written."""

    def export(self, model, out_dir):
        torch.save({k: v for k, v in model.state_dict().items()}, out_dir / "part1.pt")
        os.kill(os.getpid(), signal.SIGTERM)
        torch.save({k: v for k, v in model.state_dict().items()}, out_dir / "weights.pt")


def test_sigterm_during_the_export_lets_it_finish_and_says_so(tmp_path, capfd):
    cfg = toy_cfg(steps=4, save_every=4)
    result = engine.train(lambda: TermDuringExport(cfg), cfg, tmp_path / "run")
    assert result["interrupted"] == "SIGTERM" and result["steps"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "student").iterdir()) == ["part1.pt", "weights.pt"]
    assert not list((tmp_path / "run").glob(".tmp-*")) and not list((tmp_path / "run").glob(".old-*"))
    assert "SIGTERM received while finishing: the run is complete" in capfd.readouterr().err


class InterruptDuringExport(Toy):
    def export(self, model, out_dir):
        (out_dir / "half.pt").write_bytes(b"x")
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of writing


def test_an_export_cut_by_a_second_ctrl_c_is_rolled_back(tmp_path):
    cfg = toy_cfg(steps=4, save_every=4)
    engine.train(lambda: Toy(cfg), cfg, tmp_path / "run")
    before = weights(tmp_path / "run")
    cfg.train.steps = 8
    with pytest.raises(KeyboardInterrupt):
        engine.train(lambda: InterruptDuringExport(cfg), cfg, tmp_path / "run", resume="auto")
    assert same(weights(tmp_path / "run"), before)  # the previous export is where it was
    assert not list((tmp_path / "run").glob(".tmp-*")) and not list((tmp_path / "run").glob(".old-*"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capfd):
    cfg = toy_cfg(steps=4, save_every=2, keep_checkpoints=3)
    engine.train(lambda: Toy(cfg), cfg, tmp_path / "run")
    full = engine.train(lambda: Toy(toy_cfg(steps=6, save_every=2)), toy_cfg(steps=6, save_every=2), tmp_path / "ref")
    ck4 = tmp_path / "run" / "checkpoints" / "step_0000004"
    os.truncate(ck4 / "optimizer.bin", 1000)  # truncate -s 1000 .../optimizer.bin
    cfg.train.steps = 6
    engine.train(lambda: Toy(cfg), cfg, tmp_path / "run", resume="auto")
    err = capfd.readouterr().err
    assert "checkpoint step_0000004 is damaged (optimizer.bin: " in err and "resuming from step_0000002" in err
    assert same(weights(tmp_path / "run"), weights(tmp_path / "ref"))  # steps 3..6 trained again, exactly
    assert full["steps"] == 6


def test_damaged_checkpoints_are_named_when_none_is_left_or_one_is_asked_for(tmp_path):
    cfg = toy_cfg(steps=2, save_every=2)
    engine.train(lambda: Toy(cfg), cfg, tmp_path / "run")
    ck2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    (ck2 / "model.safetensors").unlink()
    cfg.train.steps = 4
    with pytest.raises(HDError, match=r"step_0000002 is damaged \(model.safetensors is missing\), and no older "
                                      r"checkpoint of the run is intact"):
        engine.train(lambda: Toy(cfg), cfg, tmp_path / "run", resume="auto")
    with pytest.raises(HDError, match=r"checkpoint .*step_0000002 is damaged \(model.safetensors is missing\)"):
        engine.train(lambda: Toy(cfg), cfg, tmp_path / "run", resume=str(ck2))


class CountingLoader(ToyLoader):
    """Reports one unreadable image per batch it yields (as hdcli.data loaders count skipped images)."""

    bad_samples, start = 0, 0

    def set_epoch(self, epoch, start_batch=0):  # a resume skips batches without reading them (as hdcli.data)
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i >= self.start:
                self.bad_samples += 1
                yield batch
        self.start = 0


class BadImages(Toy):
    def train_loader(self, *, rank, world_size, seed):
        return CountingLoader(self.x, self.y, self.cfg.train.batch_size, rank, world_size, seed)


def test_the_bad_image_count_goes_on_after_a_resume(tmp_path):
    cfg = toy_cfg(steps=3, save_every=3, log_every=1)
    engine.train(lambda: BadImages(cfg), cfg, tmp_path / "run")
    cfg.train.steps = 5
    engine.train(lambda: BadImages(cfg), cfg, tmp_path / "run", resume="auto")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_images"] for r in recs] == [1, 2, 3, 4, 5]


def test_a_finished_run_that_only_re_exports_needs_only_the_exports_space(tmp_path, monkeypatch):
    cfg = toy_cfg(steps=2, save_every=2)
    engine.train(lambda: Toy(cfg), cfg, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "student")
    monkeypatch.setenv("HD_FAULT_INJECT", f"free_bytes={(64 << 20) + 2000}")  # the export fits, checkpoints do not
    engine.train(lambda: Toy(cfg), cfg, tmp_path / "run", resume="auto")
    assert (tmp_path / "run" / "student" / "weights.pt").is_file()
    with pytest.raises(HDError, match="checkpoints and the export need about"):
        engine.train(lambda: Toy(cfg), cfg, tmp_path / "fresh")


def test_a_second_config_change_from_the_same_step_keeps_both_histories(tmp_path):
    kept = tmp_path / "config-history" / "until_step_0000004.toml"
    assert setup.history_name(tmp_path, 4) == kept
    kept.parent.mkdir()
    kept.write_text("first")
    assert setup.history_name(tmp_path, 4) == tmp_path / "config-history" / "until_step_0000004.2.toml"
