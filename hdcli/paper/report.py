"""The paper's tables with our numbers beside them: ``hd report table1|table2|ablations --runs OUT``.

    tables = load_paper()                          # recipes/paper_results.toml: every number of Tab. 1-8
    text = report("table1", "runs/paper")          # markdown: paper | ours | Δ per metric, one row per paper row

A run of ``hd reproduce`` lives in ``<OUT>/<run>/`` (``run`` = the row's ``run`` key in paper_results.toml):

    distill/            hd distill run dir (config.toml, metrics.jsonl, student/)
    ft-<set>/           hd finetune run dirs, set = in1k | cifar100 | cars | inat19 (results.json)
    export/             detectron2.pth, mmseg.pth (hd export)
    coco.json           {"box_ap": 50.6, "mask_ap": 44.4}   COCO Mask R-CNN (ViTDet), percent
    ade20k.json         {"miou": 51.5}                      ADE20K UperNet single-scale mIoU, percent

``coco.json`` / ``ade20k.json`` are written by ``hd reproduce`` from detectron2's ``metrics.json`` and
mmseg's ``scalars.json`` when it ran those, or by ``hd report record`` for results obtained elsewhere.
Pure Python (no torch): cheap to import.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hdcli.errors import HDError, did_you_mean
from hdcli.rundir import CONFIG, RESULTS, atomic_write, read_json

REPO = Path(__file__).resolve().parents[2]
PAPER_RESULTS = REPO / "recipes" / "paper_results.toml"
REPORTS = {"table1": ("table1",), "table2": ("table2",),
           "ablations": ("table3", "table4", "table5", "table6", "table7", "table8")}
COCO, ADE20K, STATE = "coco.json", "ade20k.json", "reproduce.json"
# metric -> fine-tuning run dir of a run (its results.json holds top-1)
FINETUNE_METRICS = {"in1k": "ft-in1k", "cifar100": "ft-cifar100", "cars": "ft-cars", "inat19": "ft-inat19"}
MEAN_OF = {"mean": ("cifar100", "cars", "inat19")}  # Table 2's "Mean" column
DOWNSTREAM_METRICS = {"coco_box": (COCO, "box_ap"), "coco_mask": (COCO, "mask_ap"), "ade20k": (ADE20K, "miou")}
DASH = "—"


# ---------------------------------------------------------------- the paper's numbers

@dataclass
class Row:
    cells: list[str]
    paper: dict[str, float]
    run: str | None = None


@dataclass
class Table:
    name: str
    caption: str
    columns: list[str]
    metrics: list[str]
    labels: list[str]
    rows: list[Row] = field(default_factory=list)

    @property
    def number(self) -> str:
        return self.name.removeprefix("table")


def load_paper(path: str | os.PathLike | None = None) -> dict[str, Table]:
    """Tables 1-8 from paper_results.toml (checked: every row has its cells, numbers are numbers)."""
    path = Path(path) if path is not None else PAPER_RESULTS
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise HDError(f"paper results not found: {path}", "it ships as recipes/paper_results.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise HDError(f"{path} is not valid TOML: {e}") from None
    tables = {}
    for name, t in raw.items():
        try:
            table = Table(name, t["caption"], list(t["columns"]), list(t["metrics"]), list(t["labels"]))
        except (KeyError, TypeError) as e:
            raise HDError(f"[{name}] in {path} lacks {e}", "each table needs caption, columns, metrics, labels") from None
        if len(table.labels) != len(table.metrics):
            raise HDError(f"[{name}] in {path}: {len(table.metrics)} metrics but {len(table.labels)} labels")
        for i, r in enumerate(t.get("rows", [])):
            cells = list(r.get("cells", []))
            if len(cells) != len(table.columns):
                raise HDError(f"{name}.rows[{i}] in {path} has {len(cells)} cells for columns {table.columns}")
            unknown = set(r) - {"cells", "run", *table.metrics}
            if unknown:
                raise HDError(f"{name}.rows[{i}] in {path} has unknown keys {sorted(unknown)}",
                              f"metrics of {name}: {', '.join(table.metrics)}")
            paper = {m: float(r[m]) for m in table.metrics if m in r}
            table.rows.append(Row(cells, paper, r.get("run")))
        tables[name] = table
    return tables


def tables_for(which: str, paper: dict[str, Table]) -> list[Table]:
    if which not in REPORTS:
        raise HDError(f"unknown report {which!r}", did_you_mean(which, REPORTS))
    missing = [n for n in REPORTS[which] if n not in paper]
    if missing:
        raise HDError(f"the paper results lack {', '.join(missing)}")
    return [paper[n] for n in REPORTS[which]]


def runs_of(which: str, paper: dict[str, Table] | None = None) -> list[str]:
    """The runs a report needs, in row order, each once."""
    paper = paper or load_paper()
    out: list[str] = []
    for t in tables_for(which, paper):
        out += [r.run for r in t.rows if r.run and r.run not in out]
    return out


def row_labels(run: str, paper: dict[str, Table]) -> list[str]:
    """Where a run appears in the paper: ["Tab. 3 T_c(x) + T'_m(x)", "Tab. 5 R_m^i", ...]."""
    return [f"Tab. {t.number} {' '.join(c for c in r.cells if c and c != '✓')}"
            for t in paper.values() for r in t.rows if r.run == run]


# ---------------------------------------------------------------- our numbers

@dataclass
class Measured:
    value: float
    partial: bool = False  # fine-tuning not finished: the number of the last epoch evaluated
    note: str = ""


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def finetune_result(ft_dir: Path, best: bool = False) -> Measured | None:
    """Top-1 of a finetune run (results.json): the last epoch's, or the best with ``best``."""
    res = read_json(ft_dir / RESULTS)
    if not res:
        return None
    v = _number(res.get("best_top1" if best else "top1"))
    if v is None:
        return None
    done, total = res.get("epochs"), res.get("total_epochs")
    partial = isinstance(done, int) and isinstance(total, int) and done < total
    return Measured(v, partial, f"epoch {done}/{total}" if partial else "")


def measure(run_dir: Path, metrics: list[str], best: bool = False) -> dict[str, Measured]:
    """Our numbers for one run dir, for the metrics asked (missing ones are left out)."""
    out: dict[str, Measured] = {}
    for m in metrics:
        if m in FINETUNE_METRICS:
            got = finetune_result(run_dir / FINETUNE_METRICS[m], best)
        elif m in DOWNSTREAM_METRICS:
            fname, key = DOWNSTREAM_METRICS[m]
            v = _number((read_json(run_dir / fname) or {}).get(key))
            got = Measured(v) if v is not None else None
        elif m in MEAN_OF:
            parts = measure(run_dir, list(MEAN_OF[m]), best)
            got = None
            if len(parts) == len(MEAN_OF[m]):
                got = Measured(sum(p.value for p in parts.values()) / len(parts),
                               any(p.partial for p in parts.values()))
        else:
            raise HDError(f"no source of our numbers for metric {m!r}",
                          f"known: {', '.join([*FINETUNE_METRICS, *DOWNSTREAM_METRICS, *MEAN_OF])}")
        if got is not None:
            out[m] = got
    return out


def describe_run(run_dir: Path) -> str:
    """One line on what a run trained (from the resolved configs), so a reader sees what was compared."""
    parts = []
    cfg = _toml(run_dir / "distill" / CONFIG)
    if cfg:
        s, t, d, dc = cfg.get("student", {}), cfg.get("train", {}), cfg.get("data", {}), cfg.get("distill", {})
        kw = s.get("kwargs") or {}
        arch = s.get("arch", "?") + (f" {_inline(kw)}" if kw else "")
        length = f"{t['steps']} steps" if t.get("steps") not in (None, "none") else f"{t.get('epochs')} epochs"
        src = d.get("source")
        src = "demo" if src in (None, "none") else src
        what = " + ".join(dc.get("teachers", []))
        masking = dc.get("masking", "?")
        if masking != "none":
            masking = f"{masking} {dc.get('drop_ratio')}"
        parts.append(f"distill {arch} from {what}, {length} on {src}, masking {masking}")
    else:
        parts.append("not distilled yet")
    for key, sub in FINETUNE_METRICS.items():
        res = read_json(run_dir / sub / RESULTS)
        if res:
            parts.append(f"{key}: {res.get('epochs')}/{res.get('total_epochs')} epochs on {res.get('dataset')}")
    for fname in (COCO, ADE20K):
        obj = read_json(run_dir / fname)
        if obj and obj.get("source"):
            parts.append(f"{fname}: {obj['source']}")
    return "; ".join(parts)


def _toml(path: Path) -> dict | None:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None


def _inline(d: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in d.items()) + "}"


def is_smoke(runs: Path, run_names: list[str]) -> bool:
    """True when the numbers come from ``SCALE=smoke`` (tiny models on demo data)."""
    state = read_json(runs / STATE)
    if state and state.get("scale") == "smoke":
        return True
    for r in run_names:
        cfg = _toml(runs / r / "distill" / CONFIG)
        if cfg and cfg.get("data", {}).get("source") in (None, "none", "demo"):
            return True
    return False


# ---------------------------------------------------------------- markdown

def fmt(v: float | None, digits: int = 1) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def fmt_diff(ours: float | None, paper: float | None, digits: int = 1) -> str:
    """ours − paper with its sign ("+0.3", "-1.2", "+0.0"); "—" when either is missing."""
    if ours is None or paper is None:
        return DASH
    s = f"{ours - paper:+.{digits}f}"
    return s.replace("-", "+") if float(s) == 0 else s


def _escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_table(table: Table, ours: dict[str, dict[str, Measured]]) -> tuple[str, list[str]]:
    """One paper table as markdown (paper | ours | Δ per metric) and its footnotes."""
    head = [*table.columns]
    for label in table.labels:
        head += [f"{label} paper", f"{label} ours", "Δ"]
    lines = [f"### Table {table.number}: {table.caption}", "",
             "| " + " | ".join(_escape(h) for h in head) + " |",
             "| " + " | ".join(["---"] * len(table.columns) + ["---:"] * (3 * len(table.metrics))) + " |"]
    notes: list[str] = []
    for row in table.rows:
        got = ours.get(row.run, {}) if row.run else {}
        cells = [_escape(c) for c in row.cells]
        for m in table.metrics:
            p = row.paper.get(m)
            o = got.get(m)
            ours_txt = fmt(o.value if o else None)
            if o and o.partial:
                ours_txt += "*"
                note = f"\\* {row.run}: {m} not finished ({o.note})" if o.note else f"\\* {row.run}: {m} not finished"
                if note not in notes:
                    notes.append(note)
            cells += [fmt(p), ours_txt, fmt_diff(o.value if o else None, p)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), notes


def report(which: str, runs: str | os.PathLike, *, paper_path: str | os.PathLike | None = None,
           best: bool = False) -> str:
    """The markdown report ``which`` (table1 | table2 | ablations) for the run dirs under ``runs``."""
    runs = Path(runs)
    if not runs.is_dir():
        raise HDError(f"no runs directory at {runs}", "give the OUT of `make reproduce-...` / `hd reproduce --out`")
    paper = load_paper(paper_path)
    tables = tables_for(which, paper)
    names = runs_of(which, paper)
    ours = {r: measure(runs / r, sorted({m for t in tables for m in t.metrics}), best) for r in names}
    out = [f"# Hybrid Distill: {which}, the paper's numbers beside ours", "",
           f"Runs: `{runs}`. Written by `hd report {which}` on {datetime.now():%Y-%m-%d %H:%M}. "
           f"\"paper\" = as printed in the paper; \"ours\" = {'best' if best else 'final'}-epoch top-1 of our "
           "fine-tuning (classification) or the downstream result files (COCO AP, ADE20K mIoU); "
           "Δ = ours − paper; \"—\" = no number.", ""]
    if is_smoke(runs, names):
        out += ["**These are SCALE=smoke numbers: tiny random-teacher models on the demo digits, a few steps "
                "each. They check the pipeline end to end and are not comparable to the paper.**", ""]
    notes: list[str] = []
    for t in tables:
        text, n = render_table(t, ours)
        out += [text, ""]
        notes += [x for x in n if x not in notes]
    if notes:
        out += [*notes, ""]
    out += ["### Runs", ""]
    for r in names:
        where = "; ".join(row_labels(r, {t.name: t for t in tables}))
        out.append(f"- `{r}` ({where}): {describe_run(runs / r)}")
    return "\n".join(out) + "\n"




# ---------------------------------------------------------------- downstream results

def _json_lines(path: Path) -> list[dict]:
    out = []
    try:
        text = path.read_text()
    except OSError as e:
        raise HDError(f"cannot read {path}: {e.strerror or e}") from None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _percent(v: float) -> float:
    """mmseg 0.x logs mIoU as a fraction, 1.x as percent; COCO AP is percent in detectron2."""
    return 100.0 * v if v <= 1.0 else v


def read_detectron2(metrics_json: str | os.PathLike) -> dict[str, float]:
    """Box and mask AP of the last evaluation in detectron2's ``metrics.json`` (one JSON object per line,
    evaluation lines hold ``bbox/AP`` and ``segm/AP``)."""
    path = Path(metrics_json)
    if path.is_dir():
        path = path / "metrics.json"
    evals = [o for o in _json_lines(path) if _number(o.get("bbox/AP")) is not None]
    if not evals:
        raise HDError(f"{path} holds no evaluation (no 'bbox/AP')", "did the detectron2 run finish its evaluation?")
    last = evals[-1]
    out = {"box_ap": float(last["bbox/AP"])}
    if _number(last.get("segm/AP")) is not None:
        out["mask_ap"] = float(last["segm/AP"])
    return out


def read_mmseg(path: str | os.PathLike) -> float:
    """mIoU of the last evaluation in an mmseg log: a ``scalars.json`` / ``*.log.json`` file, or a work dir
    (its newest ``*/vis_data/scalars.json``, mmseg 1.x; else its newest ``*.log.json``, mmseg 0.x)."""
    p = Path(path)
    if p.is_dir():
        cands = sorted(p.glob("*/vis_data/scalars.json"), key=lambda f: f.stat().st_mtime)
        cands = cands or sorted(p.glob("*.log.json"), key=lambda f: f.stat().st_mtime)
        if not cands:
            raise HDError(f"{p} holds no mmseg log (*/vis_data/scalars.json or *.log.json)",
                          "give the --work-dir of the mmseg run")
        p = cands[-1]
    evals = [o for o in _json_lines(p) if _number(o.get("mIoU")) is not None]
    if not evals:
        raise HDError(f"{p} holds no evaluation (no 'mIoU')", "did the mmseg run reach its validation?")
    return _percent(float(evals[-1]["mIoU"]))


def record(run_dir: str | os.PathLike, *, box_ap: float | None = None, mask_ap: float | None = None,
           miou: float | None = None, source: str = "") -> list[Path]:
    """Write coco.json / ade20k.json into a run dir (values in percent). Returns the files written."""
    run_dir = Path(run_dir)
    for name, v in (("box AP", box_ap), ("mask AP", mask_ap), ("mIoU", miou)):
        if v is not None and not 1 < v <= 100:  # ≤ 1 reads as a fraction (mmseg 0.x, COCOeval's raw stats)
            raise HDError(f"{name} {v} is not a percentage above 1", "give percent, e.g. 50.6, not 0.506")
    if (box_ap is None) != (mask_ap is None):
        raise HDError("COCO needs both AP^box and AP^mask", "--coco-box X --coco-mask Y")
    written = []
    stamp = datetime.now().isoformat(timespec="seconds")
    if box_ap is not None:
        obj = {"box_ap": box_ap, "mask_ap": mask_ap, "source": source or "recorded by hand", "time": stamp}
        written.append(atomic_write(run_dir / COCO, json.dumps(obj, indent=1) + "\n"))
    if miou is not None:
        obj = {"miou": miou, "source": source or "recorded by hand", "time": stamp}
        written.append(atomic_write(run_dir / ADE20K, json.dumps(obj, indent=1) + "\n"))
    if not written:
        raise HDError("nothing to record", "give --coco-box/--coco-mask, --ade20k, --from-detectron2 or --from-mmseg")
    return written
