"""Showing and running a reproduction plan (:mod:`hdcli.paper.reproduce` builds it): ``format_plan`` (``DRY_RUN=1``)
and ``execute`` (every stage neither done nor skipped, in order, resumable)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from hdcli import ui
from hdcli.errors import HDError
from hdcli.paper import report
from hdcli.paper.reproduce import DATA, SMOKE_STEPS, Plan
from hdcli.rundir import atomic_write

# ---------------------------------------------------------------- printing

def _h(v: float) -> str:
    if v == 0:
        return "~0"
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"


def format_plan(p: Plan) -> str:
    """The whole plan as text: a header, every command with its state and GPU-hours, totals."""
    smoke = p.scale == "smoke"
    where = "the CPU, in-process" if smoke else f"{p.gpus} GPU(s) x {p.nodes} node(s)"
    lines = [f"# hd reproduce {p.target}: scale {p.scale}, on {where}, out {p.out}",
             f"# GPU-hours: model FLOPs (hdcli.tools.flops) / {p.tflops_source}" if not smoke else
             "# SCALE=smoke: tiny models, random teachers, demo digits, "
             f"{SMOKE_STEPS} steps per stage (numbers are not comparable to the paper)",
             "# a stage whose result exists is skipped; training stages resume from their newest checkpoint", ""]
    cur = None
    totals: dict[str, float] = {}
    for s in p.steps:
        if s.run != cur:
            cur = s.run
            head = f"## {s.run}" if s.run else f"## {s.stage}"
            if s.run and p.labels.get(s.run):
                head += f"  ({'; '.join(p.labels[s.run])})"
            lines.append(head)
        state = "done, skipped" if s.is_done else (s.skip or "runs")
        cost = "CPU" if s.gpu_hours is None else f"{_h(s.gpu_hours)} GPU-h"
        lines.append(f"[{s.stage}] {cost} | {state}" + (f" | {s.estimate}" if s.estimate else ""))
        lines.append(f"  {s.command()}")
        if s.gpu_hours and not s.is_done:
            group = s.stage.split(":")[0]
            totals[group] = totals.get(group, 0.0) + s.gpu_hours
    lines.append("")
    if not smoke:
        total = sum(totals.values())
        parts = ", ".join(f"{k} {'≥' if k in ('coco', 'ade20k') else ''}{_h(v)}" for k, v in totals.items())
        days = total / p.world / 24
        lines.append(f"# remaining: {_h(total)} GPU-hours ({parts}) = about {days:,.1f} days on {p.world} GPU(s)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- running

def check_out(p: Plan) -> None:
    """OUT holds runs of one scale only (a smoke student must never be fine-tuned as a real one)."""
    state = report.read_json(p.out / report.STATE)
    if state and state.get("scale") not in (None, p.scale):
        raise HDError(f"{p.out} holds SCALE={state['scale']} runs, this is SCALE={p.scale}",
                      "choose another OUT")


def check_data(p: Plan) -> None:
    """Every data variable a runnable, unfinished stage reads is set and exists."""
    missing: dict[str, list[str]] = {}
    for s in p.steps:
        if s.is_done or s.skip:
            continue
        for key in s.needs:
            var = DATA[key][0]
            if key not in p.data:
                missing.setdefault(var, []).append(f"{s.stage} of {s.run}")
            elif not Path(p.data[key].removeprefix("cifar100:")).expanduser().exists() and "{" not in p.data[key]:
                raise HDError(f"{var}={p.data[key]} does not exist", f"needed by {s.stage} of {s.run}")
    if missing:
        var, who = next(iter(missing.items()))
        more = f" (+{len(who) - 1} more)" if len(who) > 1 else ""
        raise HDError(f"{', '.join(missing)} not set: needed by {who[0]}{more}",
                      f"e.g. make reproduce-{p.target} {var}=/data/... (docs/reproduce.md); DRY_RUN=1 shows the plan")


def _exec_argv(argv: list[str]) -> list[str]:
    """The argv that executes a displayed command with this environment's interpreter and tools
    (``srun ... bash -c '...'`` runs as shown: bash expands $SLURM_NODEID on each node)."""
    if argv[0] == "hd":
        return [sys.executable, "-m", "hdcli", *argv[1:]]
    if argv[0] == "accelerate":
        exe = Path(sys.executable).with_name("accelerate")
        return [str(exe) if exe.exists() else shutil.which("accelerate") or "accelerate", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def execute(p: Plan, *, run_hd: Callable[[list[str]], None] | None = None) -> dict:
    """Run every step that is neither done nor skipped, in order. Returns counts of what happened.

    ``run_hd(argv)``: how an ``hd ...`` step runs in this process (the CLI passes its own app for the smoke
    scale: no start-up cost per stage); without it every step is a subprocess."""
    check_out(p)
    check_data(p)
    p.out.mkdir(parents=True, exist_ok=True)
    state = report.read_json(p.out / report.STATE) or {"scale": p.scale, "created": _now()}
    state.update({"scale": p.scale, "last_target": p.target, "updated": _now()})
    atomic_write(p.out / report.STATE, json.dumps(state, indent=1) + "\n")
    counts = {"ran": 0, "done": 0, "skipped": 0}
    for i, s in enumerate(p.steps, 1):
        name = f"[{i}/{len(p.steps)}] {s.stage}" + (f" {s.run}" if s.run else "")
        if s.is_done:
            ui.info(f"[dim]{name}: done, skipped[/]")
            counts["done"] += 1
            continue
        if s.skip:
            ui.info(f"[dim]{name}: {s.skip}[/]")
            counts["skipped"] += 1
            continue
        ui.info(f"[bold]{name}[/]: {s.command()}")
        t0 = time.perf_counter()
        try:
            if run_hd is not None and s.argv[0] == "hd":
                run_hd(s.argv)
            else:
                rc = subprocess.call(_exec_argv(s.argv))
                if rc:
                    raise HDError(f"`{s.command()}` exited with status {rc}")
            if s.after is not None:
                s.after()
        except HDError as e:
            raise HDError(f"{s.stage}{' of ' + s.run if s.run else ''} failed: {e.problem}",
                          e.hint or "fix it and run the same command again: finished stages are skipped, "
                          "unfinished runs resume from their newest checkpoint") from e
        counts["ran"] += 1
        ui.info(f"[dim]{name}: finished in {time.perf_counter() - t0:.1f} s[/]")
    return counts


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")
