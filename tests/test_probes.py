"""What a hostile new user found (issue 24, items 6, 7, 10, 11, 13): each probe is now a one-line error naming the
problem and the fix, or an honest warning, and leaves nothing half-written behind."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
from conftest import REPO

TINY = ["distill", "--recipe", str(REPO / "recipes/distill/tiny-cpu.toml"), "-b", "8", "--num-workers", "0",
        "--no-plot"]


def hd_main(*args: str) -> int:
    from hdcli.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def one_error(capfd) -> str:
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


class FileSizeLimit:
    """Writes past ``size`` bytes fail with EFBIG, as writes fail on a full disk (Python ignores SIGXFSZ)."""

    def __init__(self, size: int):
        self.size = size

    def __enter__(self):
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, self.hard))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.soft, self.hard))


# ------------------------------------------------------------------ configs (items 6, 7)

def test_recipes_given_twice_are_layered_in_order(tmp_path):
    from hdcli.config import DistillConfig
    from hdcli.config.loading import load_config

    second = tmp_path / "second.toml"
    second.write_text('[train]\nsteps = 7\n[distill]\nalpha = 0.5\n')
    tiny = REPO / "recipes/distill/tiny-cpu.toml"
    cfg = load_config(DistillConfig, [tiny, second])
    first = load_config(DistillConfig, tiny)
    assert cfg.distill.teachers == first.distill.teachers  # the first recipe's teachers stay
    assert cfg.train.steps == 7 and cfg.distill.alpha == 0.5  # the second's keys win
    assert cfg.student.kwargs == first.student.kwargs


def test_recipe_flag_is_repeatable_on_the_command_line(tmp_path, capfd):
    second = tmp_path / "second.toml"
    second.write_text('[train]\nsteps = 7\n')
    code = hd_main(*TINY, "--recipe", str(second), "--print-config")
    out = capfd.readouterr().out
    assert code in (0, None) and "steps = 7" in out and "random:vit_base_patch16_224.mae" in out


@pytest.mark.parametrize("cmd", ["distill", "finetune", "pretrain"])
def test_min_lr_above_the_peak_lr_is_refused(cmd, capfd):
    args = {"distill": ["distill"], "finetune": ["finetune", "demo", "--student", "x"],
            "pretrain": ["pretrain", "mae"]}[cmd]
    code = hd_main(*args, "--lr", "1e-5", "--set", "optim.min_lr=1e-2", "--print-config")
    assert code == 2
    assert "optim.min_lr 0.01 is above the peak lr 1e-05: the schedule would climb" in one_error(capfd)


# ------------------------------------------------------------------ teachers (items 11, 13)

def test_one_teacher_directory_under_two_spellings_is_refused(tmp_path, capfd):
    from conftest import tiny_vit
    from timm.models import save_for_hf

    save_for_hf(tiny_vit(), str(tmp_path / "clip"), safe_serialization=True)
    spellings = f"local-dir:{tmp_path / 'clip'},{tmp_path / 'clip'}/"
    assert hd_main(*TINY, "--teachers", spellings, "--out", str(tmp_path / "run")) == 2
    assert "are one teacher" in one_error(capfd) and not (tmp_path / "run").exists()


def test_a_teacher_listed_twice_is_one_short_line(tmp_path, capfd):
    name = "random:vit_base_patch16_224.mae"
    assert hd_main(*TINY, "--teachers", ",".join([name] * 1000), "--out", str(tmp_path / "run")) == 2
    line = one_error(capfd)
    assert f"teacher {name!r} is listed twice" in line and len(line) < 300 and "name=" not in line


def test_two_random_teachers_of_one_architecture_need_seeds(tmp_path, capfd):
    """random:ARCH twice is one teacher listed twice (refused, the hint says how to make two); with a seed the second
    is a teacher of its own, with other weights and its own label (benchmarks use this: hd bench distill
    --teachers vit_small_patch16_224,vit_small_patch16_224 times two teachers, not one)."""
    from hdcli.config import DistillConfig
    from hdcli.config.loading import load_config
    from hdcli.method.models import build_teacher
    from hdcli.teachers.registry import labels

    arch = "random:vit_base_patch16_224.mae"
    assert hd_main(*TINY, "--teachers", f"{arch},{arch}", "--out", str(tmp_path / "run")) == 2
    assert "need seeds: random:ARCH@1" in one_error(capfd)
    assert labels([arch, f"{arch}@1"]) == ["mae", "mae-seed1"]
    cfg = load_config(DistillConfig, REPO / "recipes/distill/tiny-cpu.toml",
                      overrides={"distill.teachers": [arch, f"{arch}@1"]})
    a, b, c = (build_teacher(n, cfg, i) for i, n in enumerate([arch, f"{arch}@1", f"{arch}@1"]))
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert torch.equal(b.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)  # the seed, not the position
    assert hd_main(*TINY, "--teachers", f"{arch},{arch}@x", "--out", str(tmp_path / "run")) == 2
    assert "the seed after @ must be a non-negative integer" in one_error(capfd)


def test_the_benchmark_of_two_teachers_of_one_architecture_runs_two(tmp_path):
    from hdcli.bench.distill import DistillBench, _config

    arch = "vit_small_patch16_224"
    b = DistillBench(student=arch, teachers=(arch, arch), cpu=True, steps=1, warmup=0, dtype="fp32", batch_size=8,
                     teacher_dtype="fp32")
    cfg = _config(b, arch, arch)
    assert cfg.distill.teachers == [f"random:{arch}", f"random:{arch}@1"]


def test_errors_name_teachers_as_the_user_gave_them(tmp_path, capfd):
    assert hd_main(*TINY, "--relation-blocks", "15", "--out", str(tmp_path / "run")) == 2
    line = one_error(capfd)
    assert "teacher 'random:vit_base_patch16_224.mae'" in line and "teacher 'mae'" not in line


def test_an_empty_wandb_mode_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "")
    assert hd_main(*TINY, "--steps", "1", "--tracker", "wandb", "--out", str(tmp_path / "run")) == 2
    assert "WANDB_MODE is set but empty" in one_error(capfd)


def test_an_unreadable_image_in_a_folder_is_named_by_its_file(tmp_path, capfd):
    from hdcli import data

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(30):
            _png(tmp_path / f"c{c}" / f"{i}.png")
    (tmp_path / "c0" / "broken.png").write_bytes(b"\x89PNG not really")
    from hdcli.data.decode import augment

    tf = augment(8, scale=(0.35, 1.0), hflip=True, decode="cpu")  # the cpu decode path reads the file's bytes
    loader = data.build_loader(tmp_path, img_size=8, batch_size=8, num_workers=0, transform=tf, max_bad_fraction=0.5)
    for _ in loader:
        pass
    err = capfd.readouterr().err
    assert "broken.png" in err and "BytesIO" not in err


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (12, 12), (40, 90, 200)).save(path)


# ------------------------------------------------------------------ nothing half-written (item 10)

def test_resuming_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, capfd):
    run = tmp_path / "run"
    assert hd_main(*TINY, "--steps", "2", "--out", str(run)) in (0, None)
    capfd.readouterr()
    (run / ".lock").unlink()
    (run / ".lock").mkdir()  # the lock cannot be opened for writing, as on a read-only mount (EROFS)
    before = sorted(p.name for p in run.rglob("*"))
    assert hd_main(*TINY, "--steps", "4", "--resume", "auto", "--out", str(run)) == 2
    assert f"cannot write to the run dir {run.resolve()}" in one_error(capfd)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_shards_on_a_full_disk_leave_complete_shards_and_no_temp_file(tmp_path, capfd):
    out = tmp_path / "wds"
    with FileSizeLimit(60_000):  # a demo shard of 100 PNG digits is about 100 kB
        code = hd_main("data", "shards", "demo", str(out), "--maxcount", "100", "--splits", "train")
    assert code == 2
    line = one_error(capfd)
    assert "could not write" in line and "complete train shards are in" in line and "--force" in line
    assert not list(out.glob("*.tmp")) and not (out / "_info.json").exists()


def test_plots_on_a_full_disk_or_unwritable_dir_are_one_line_and_leave_no_empty_png(tmp_path, capfd):
    run = tmp_path / "run"
    assert hd_main(*TINY, "--steps", "2", "--log-every", "1", "--out", str(run)) in (0, None)
    capfd.readouterr()
    with FileSizeLimit(2_000):
        assert hd_main("plot", str(run), "--out", str(tmp_path / "full")) == 2
    assert "could not write" in one_error(capfd)
    assert not [p for p in (tmp_path / "full").iterdir() if p.stat().st_size == 0 or p.suffix != ".png"]
    (tmp_path / "file").write_text("not a directory")
    assert hd_main("plot", str(run), "--out", str(tmp_path / "file" / "plots")) == 2
    assert "cannot write plots to" in one_error(capfd)


def test_plot_reads_a_metrics_file_that_is_not_utf8(tmp_path, capfd):
    run = tmp_path / "run"
    assert hd_main(*TINY, "--steps", "2", "--log-every", "1", "--out", str(run)) in (0, None)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": \xff\xfe}\n')
    capfd.readouterr()
    assert hd_main("plot", str(run)) in (0, None)
    assert (run / "plots" / "loss.png").stat().st_size > 0



def test_allow_config_change_says_which_changes_it_can_take(tmp_path, capfd):
    """--allow-config-change loads a checkpoint tensor by tensor: a change that adds, removes or reshapes a trained
    tensor is refused naming the change and what the flag allows (docs/distill.md says the same)."""
    run = tmp_path / "run"
    assert hd_main(*TINY, "--steps", "2", "--out", str(run)) in (0, None)
    for flags, key in ((["--target-norm", "standardize"], "distill.target_norm"), (["--img-size", "48"], "data.img_size")):
        capfd.readouterr()
        assert hd_main(*TINY, "--steps", "4", "--resume", "auto", "--allow-config-change", *flags, "--out", str(run)) == 2
        line = one_error(capfd)
        assert f"after changing {key}" in line and "--allow-config-change: changes that keep every trained tensor" in line
    capfd.readouterr()  # a change that keeps every tensor is a new segment
    assert hd_main(*TINY, "--steps", "4", "--resume", "auto", "--allow-config-change", "--alpha", "0.5",
                   "--out", str(run)) in (0, None)
    assert (run / "config-history").is_dir()
