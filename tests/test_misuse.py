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


def wait_for(cond, what: str, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} in {limit} s"
        time.sleep(0.05)


def test_one_run_per_dir_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "hdcli", *TINY, "--steps", "400", "--log-every", "1",
                              "--save-every", "1000", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
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
    assert f"took over the lock of a run that no longer runs (pid {first.pid} on " in third.stderr
