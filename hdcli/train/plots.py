"""``hd plot``: PNGs of a run's ``metrics.jsonl`` (loss parts, lr, images/s, k-NN top-1 with the teachers'
lines, per-target gradient shares and signals, the head-distance probe, fine-tuning accuracy); several runs
on one figure for comparison. Written by every training command at the end of its run too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hdcli.errors import HDError
from hdcli.rundir import CONFIG, METRICS, replacing

PLOTS = "plots"  # <run>/plots/


@dataclass(frozen=True)
class Panel:
    """One PNG: the record keys it shows (``keys(key)``), its title, y label and scale."""

    file: str
    title: str
    ylabel: str
    keys: Callable[[str], bool]
    log: bool = False
    constants: bool = False  # keys recorded once (at the start) are drawn as dashed horizontal lines


def _is(*names: str) -> Callable[[str], bool]:
    return lambda k: k in names


def _prefix(*prefixes: str) -> Callable[[str], bool]:
    return lambda k: k.startswith(prefixes)


PANELS = (
    Panel("loss.png", "Loss and its parts (unweighted per target)", "loss",
          lambda k: k in ("loss", "loss_feat", "loss_rel") or k.startswith("part/"), log=True),
    Panel("lr.png", "Learning rate", "lr", _is("lr")),
    Panel("throughput.png", "Throughput", "images/s", _is("img_per_s")),
    Panel("knn.png", "k-NN top-1 (k = 20) of the student; teachers once, dashed", "top-1 (%)",
          _prefix("knn/"), constants=True),
    Panel("accuracy.png", "Evaluation accuracy", "accuracy (%)", _is("top1", "top5")),
    Panel("grad_share.png", "Share of each target in the gradient norm at the shared student block", "share",
          _prefix("share/")),
    Panel("signals.png", "Student vs target: cosine (features) and attention agreement (relations)", "agreement",
          _prefix("cos/", "attn/")),
    Panel("probe.png", "Head-distance / NMI probe of the student", "value", _prefix("probe/")),
    Panel("teacher_drop.png", "Teacher dropping: share of images whose loss of a target was dropped", "dropped",
          _prefix("drop/")),
)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run>/metrics.jsonl`` (unreadable lines, e.g. a half-written last one, skipped), with the
    metric names of a run written before hd named targets by their teachers' labels renamed (:func:`renamed`)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise HDError(f"{run_dir} has no {METRICS}", "give the --out directory of an hd distill/finetune/pretrain run")
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():  # a damaged line is skipped below
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int | float):
            out.append(rec)
    return renamed(out, _teachers_of(Path(run_dir)))


def _teachers_of(run_dir: Path) -> tuple[list[str], bool]:
    """(distill.teachers, whether the run listed explicit targets) of a distillation run dir, else ([], False)."""
    import tomllib

    try:
        dc = tomllib.loads((run_dir / CONFIG).read_text()).get("distill", {})
    except (OSError, ValueError):
        return [], False
    return [str(t) for t in dc.get("teachers", [])], bool(dc.get("targets"))


def renamed(records: list[dict], teachers: tuple[list[str], bool]) -> list[dict]:
    """Today's metric names for the records of a run written before one naming scheme (docs/distill.md "Metric
    names"): then the hybrid by flags named its teachers ``mim``/``feature`` and every other spelling named a
    teacher after its sanitised name (``vit_base_patch16_224_mae``), now both use the teacher's label (``mae``).
    ``teachers``: the run's ``distill.teachers`` and whether it listed ``[[distill.targets]]``."""
    import re

    from hdcli.teachers.registry import RANDOM, labels

    names, explicit = teachers
    if not names:
        return records
    new = labels(names)

    def old_key(name: str) -> str:  # what hd called a teacher before (tasks/distill.teacher_key)
        return re.sub(r"[^A-Za-z0-9_-]+", "_", name.removeprefix(RANDOM)).strip("_")

    old = ["mim", "feature"] if len(names) == 2 and not explicit else [old_key(n) for n in names]
    swap = {o: n for o, n in zip(old, new, strict=True) if o != n}
    knn = {old_key(n): lab for n, lab in zip(names, new, strict=True) if old_key(n) != lab and "/" not in n}
    if not swap and not knn:
        return records
    signal = re.compile(r"^(part|share|cos|attn|drop)/([^/]+)/(.*)$")
    only_new = set(new) - set(old)
    if not only_new or any((m := signal.match(k)) and m.group(2) in only_new for r in records for k in r):
        return records  # written with today's names (or the two schemes cannot be told apart)

    def name(key: str) -> str:
        m = signal.match(key)
        if m and m.group(2) in swap:
            return f"{m.group(1)}/{swap[m.group(2)]}/{m.group(3)}"
        if key.startswith("knn/"):
            head, _, pool = key[4:].rpartition("_")
            return f"knn/{knn[head]}_{pool}" if head in knn else key
        return key

    if not any(name(k) != k for r in records for k in r):
        return records
    return [{name(k): v for k, v in r.items()} for r in records]


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records that hold a finite number for it."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
              labels: Sequence[str] | None = None) -> list[Path]:
    """Write one PNG per panel that has data into ``out`` (default ``<run>/plots`` for one run); return the paths."""
    from hdcli.ui import pyplot

    if not run_dirs:
        raise HDError("no run directory given", "hd plot RUN_DIR [RUN_DIR ...]")
    runs = {str(labels[i]) if labels else Path(d).resolve().name: read_metrics(d) for i, d in enumerate(run_dirs)}
    if len(runs) != len(run_dirs):  # two runs of the same name: use the paths
        runs = {str(d): read_metrics(d) for d in run_dirs}
    out = Path(out) if out is not None else (Path(run_dirs[0]) / PLOTS if len(run_dirs) == 1 else Path(PLOTS))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HDError(f"cannot write plots to {out}: {e.strerror or e}", "give a writable --out") from None
    plt = pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    written = []
    for panel in PANELS:
        keys = sorted({k for recs in runs.values() for r in recs for k in r if panel.keys(k)},
                      key=lambda k: (k.startswith(("part/", "knn/")) and "student" not in k, k))
        if not any(series(recs, k)[0] for recs in runs.values() for k in keys):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        for i, (run, recs) in enumerate(runs.items()):
            steps = [r["step"] for r in recs]
            lo, hi = (min(steps), max(steps)) if steps else (0, 1)
            for j, key in enumerate(keys):
                xs, ys = series(recs, key)
                if not xs:
                    continue
                c = colours[(j if len(runs) == 1 else i) % len(colours)]
                style = styles[(j if len(runs) > 1 else 0) % len(styles)]
                label = key if len(runs) == 1 else f"{run}: {key}"
                if panel.constants and len(xs) == 1 and hi > xs[0]:
                    ax.plot([lo, hi], [ys[0]] * 2, linestyle="--", color=c, linewidth=1.2, label=label)
                else:
                    ax.plot(xs, ys, style, color=c, marker="o" if len(xs) < 30 else None, markersize=3,
                            linewidth=1.5, label=label)
        if panel.log and all(y > 0 for recs in runs.values() for k in keys for y in series(recs, k)[1]):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.subplots_adjust(left=0.11, right=0.98, bottom=0.12, top=0.92)  # fixed: tight_layout draws twice
        path = out / panel.file
        try:
            with replacing(path) as tmp:  # a full disk leaves no half-written PNG
                fig.savefig(tmp, format="png")
        except OSError as e:
            raise HDError(f"could not write {path}: {e.strerror or e}", "free some space or give another --out") from None
        finally:
            plt.close(fig)
        written.append(path)
    return written
