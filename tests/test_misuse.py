"""Issue 18 end to end, through the real ``hd`` commands: misuse gets a one-line error or an honest warning,
and never mixes, loses or silently corrupts a run (real processes for the concurrent and signal cases)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

TINY = ["distill", "--recipe", str(REPO / "recipes/distill/tiny-cpu.toml"), "-b", "8", "--num-workers", "0"]


def hd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hdcli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def start_distill(out: Path, *args: str) -> subprocess.Popen:
    """A 400-step tiny ``hd distill`` in its own process group, logging every step (killed by the test)."""
    return subprocess.Popen([sys.executable, "-m", "hdcli", *TINY, "--steps", "400", "--log-every", "1", *args,
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(cond, what: str, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} in {limit} s"
        time.sleep(0.05)


def test_one_run_per_dir_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = start_distill(out, "--save-every", "1000")
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and len(steps_logged(out)) >= 2, "logged step", first)
        second = hd(*TINY, "--steps", "4", "--out", str(out), "--resume", "auto")
        assert second.returncode == 2
        (line,) = error_lines(second.stderr)
        assert f"is in use by another run (pid {first.pid} on " in line and "distill" in line
        assert steps_logged(out)[:2] == [1, 2]  # the first run's log is untouched
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock: the kernel frees it, the file stays
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    third = hd(*TINY, "--steps", "2", "--out", str(out), "--resume", "auto")  # no checkpoint yet: a fresh start
    assert third.returncode == 0, third.stderr
    assert f"took over a lock its earlier holder no longer holds (pid {first.pid} on " in third.stderr


# ---------------------------------------------------------------- clear errors instead of tracebacks

def hd_main(*args: str) -> int:
    from hdcli.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return e.code
    return 0


def one_error(capfd) -> str:
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    (line,) = error_lines(err)
    return line


def test_a_truncated_config_json_is_one_line(tmp_path, capfd):
    from conftest import tiny_vit
    from timm.models import save_for_hf

    save_for_hf(tiny_vit(), str(tmp_path / "t"), safe_serialization=True)
    text = (tmp_path / "t" / "config.json").read_text()
    (tmp_path / "t" / "config.json").write_text(text[: len(text) // 2])
    assert hd_main(*TINY, "--teachers", f"local-dir:{tmp_path / 't'},random:vit_base_patch16_224",
                   "--out", str(tmp_path / "run")) == 2
    assert f"{tmp_path / 't' / 'config.json'} is not valid JSON" in one_error(capfd)
    assert hd_main("export", str(tmp_path / "t"), "--format", "timm", "--out", str(tmp_path / "e")) == 2
    assert "is not valid JSON" in one_error(capfd)
    assert not (tmp_path / "run").exists()


def test_a_non_vit_architecture_is_one_line(tmp_path, capfd):
    assert hd_main(*TINY, "--student", "resnet18", "--out", str(tmp_path / "run")) == 2
    assert "resnet18 is not a Vision Transformer" in one_error(capfd)
    import timm
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("resnet18", num_classes=0), str(tmp_path / "r"), safe_serialization=True)
    assert hd_main("finetune", "demo", "--student", str(tmp_path / "r"), "--img-size", "32",
                   "--out", str(tmp_path / "ft")) == 2  # a resnet config.json: timm's ResNet takes no img_size
    assert "is not a Vision Transformer (timm's model takes no img_size)" in one_error(capfd)


def test_an_image_size_below_the_patch_size_is_one_line(tmp_path, capfd):
    assert hd_main(*TINY, "--img-size", "2", "--out", str(tmp_path / "run")) == 2
    assert "--img-size 2 is not a positive multiple of the student's patch size 4" in one_error(capfd)


def test_a_student_that_drops_patches_itself_is_refused(tmp_path, capfd):
    assert hd_main(*TINY, "--set", "student.kwargs={embed_dim = 48, depth = 6, num_heads = 3, patch_drop_rate = 0.25}",
                   "--out", str(tmp_path / "run")) == 2
    assert "drops 25% of its patches at random (patch_drop_rate=0.25)" in one_error(capfd)


def test_a_failed_export_on_a_full_disk_is_one_line_and_leaves_no_temp(tmp_path, capfd):
    import resource

    from conftest import tiny_vit
    from timm.models import save_for_hf

    save_for_hf(tiny_vit(), str(tmp_path / "s"), safe_serialization=True)
    for fmt, out in (("timm", tmp_path / "t"), ("detectron2", tmp_path / "d2" / "m.pth")):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # writes past 100 kB fail as on a full disk
        try:
            code = hd_main("export", str(tmp_path / "s"), "--format", fmt, "--out", str(out), "--force")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert code == 2
        assert f"could not write {out}: " in one_error(capfd)
        assert not out.exists() and sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_a_batch_larger_than_the_data_is_refused_before_any_model(tmp_path, capfd):
    for batch in ("100000", "2000"):  # the demo set has 1,437 training images
        assert hd_main(*TINY, "-b", batch, "--out", str(tmp_path / "run")) == 2
        line = one_error(capfd)
        assert f"a batch of {batch} images is more than the 1437 images of demo (train)" in line
        assert "at most 1437" in line
    assert hd_main("pretrain", "mae", "-b", "5000", "--out", str(tmp_path / "mae")) == 2
    assert "more than the 1437 images of demo" in one_error(capfd)
    assert not (tmp_path / "run").exists()


def test_two_ctrl_c_in_a_row_exit_130_saying_what_is_on_disk(tmp_path):
    out = tmp_path / "run"
    proc = start_distill(out, "--save-every", "3")
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and len(steps_logged(out)) >= 4, "4 logged steps", proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted at once (a second Ctrl-C): this step was not saved; the newest complete checkpoint is " \
           f"{out / 'checkpoints'}/step_" in err or "checkpoint saved in" in err, err[-2000:]


def test_a_teacher_with_other_input_statistics_is_named_in_one_info_line(tmp_path, capfd):
    from conftest import tiny_vit
    from timm.models import save_for_hf

    # vit_base_patch16_224's default tag (augreg) carries mean = std = 0.5 into config.json
    save_for_hf(tiny_vit(depth=12), str(tmp_path / "t"), safe_serialization=True)
    assert hd_main(*TINY, "--teachers", f"local-dir:{tmp_path / 't'},random:vit_base_patch16_224", "--steps", "1",
                   "--out", str(tmp_path / "run")) == 0
    err = capfd.readouterr().err
    assert "expects inputs normalised with mean (0.5, 0.5, 0.5) and std (0.5, 0.5, 0.5)" in err


def test_a_misspelt_model_argument_is_named_as_such(tmp_path, capfd):
    assert hd_main(*TINY, "--set", "student.kwargs={embed_dims = 48}", "--out", str(tmp_path / "run")) == 2
    line = one_error(capfd)
    assert "takes no argument 'embed_dims'" in line and "student.kwargs" in line and "not a Vision" not in line
