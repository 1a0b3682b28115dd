"""``hd demo``: the whole method, end to end, on the built-in digits in minutes on a CPU.

Stages (each one a call into the modules every other command uses; nothing is re-implemented here):

1. ``hd pretrain mae`` a tiny MAE teacher and ``hd pretrain supervised`` a tiny supervised teacher;
2. ``hd distill`` a tiny student from them (MAE relations + supervised features, progressive masking),
   the teachers loaded by path (``local-dir:<run>/student``);
3. ``hd finetune --linear-probe`` and ``hd finetune`` of the student and both teachers on the held-out
   split;
4. ``hd analyze`` head distance and NMI of all three;
5. ``report.md``: a table in the shape of the paper's Table 1, the analysis tables and plots.

A stage is finished when its output exists (a run's ``student/``, ``results.json``, an analysis JSON);
re-running skips finished stages (``--force``: redo them) and resumes interrupted trainings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hdcli import ui
from hdcli.errors import HDError
from hdcli.rundir import RESULTS, STUDENT, atomic_write, read_json, write_json

STAGES_FILE = "stages.json"
REPORT = "report.md"
MODELS = ("student", "mae", "sup")  # run names of the three compared models
LABELS = {"student": "Hybrid Distill (MAE + Sup)", "mae": "MAE teacher", "sup": "Supervised teacher"}
SHORT_LABELS = {"student": "Hybrid Distill", "mae": "MAE teacher", "sup": "Sup. teacher"}


@dataclass(frozen=True)
class Scale:
    """Sizes of a demo run. ``FULL``: `hd demo` (< 10 min on 2 CPU cores); ``QUICK``: a few steps per stage."""

    img_size: int = 32
    patch_size: int = 8  # 32 / 8 = 4x4 tokens: the digits are 8x8 images upsampled 4x
    model: dict = field(default_factory=lambda: {"embed_dim": 48, "depth": 6, "num_heads": 3})
    decoder: dict = field(default_factory=lambda: {"decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 2})
    # the paper's blocks scaled from 12 to 6: relations of blocks 9, 10 -> 3, 4; masking entering 0, 4, 8 -> 0, 2, 4
    relation_blocks: tuple[int, ...] = (3, 4)
    mask_blocks: tuple[int, ...] = (0, 2, 4)
    batch_size: int = 32
    blr: float = 1.6e-2  # lr = 2e-3 at batch 32: short runs of tiny models
    mae_steps: int = 300
    sup_steps: int = 600
    distill_steps: int = 600
    probe_epochs: int = 5
    finetune_epochs: int = 6
    epoch_steps: int | None = None  # batches per epoch of the probe / fine-tune runs (None: a full pass)
    analysis_images: int = 64
    eval_every: int = 100  # distill steps between k-NN evaluations of the student (docs/distill.md "Watching a run")
    eval_samples: tuple[int, int] = (1437, 360)  # the whole demo train split as the bank, the val split as queries
    num_workers: int = 1
    source: str = "demo"  # training data of every stage: demo | fashion-mnist[:DIR]


FULL = Scale()
QUICK = Scale(mae_steps=4, sup_steps=4, distill_steps=4, probe_epochs=1, finetune_epochs=1, epoch_steps=2,
              analysis_images=8, eval_every=2, eval_samples=(200, 100))


@dataclass
class Stage:
    name: str  # key in stages.json
    title: str  # shown in the progress display
    out: Path  # what it writes; removed by --force
    done: Callable[[], bool]
    run: Callable[[], None]


# ---------------------------------------------------------------- configs of the stages

def _common(scale: Scale, seed: int) -> dict:
    return {"data.source": scale.source, "data.img_size": scale.img_size, "data.num_workers": scale.num_workers,
            "data.hflip": 0.0, "data.scale": [0.6, 1.0],  # digits: no mirror images, no crops that cut them
            "train.batch_size": scale.batch_size, "train.seed": seed, "train.log_every": 10,
            "train.save_every": 10_000, "train.keep_checkpoints": 1, "optim.blr": scale.blr}


def _warmup(steps: int) -> int:
    return min(20, steps // 4)


def pretrain_overrides(mode: str, scale: Scale, seed: int = 0) -> dict:
    o = {**_common(scale, seed), "student.arch": "vit_base_patch16_224", "student.patch_size": scale.patch_size,
         "student.kwargs": dict(scale.model), "train.steps": scale.mae_steps if mode == "mae" else scale.sup_steps,
         "optim.warmup_steps": _warmup(scale.mae_steps if mode == "mae" else scale.sup_steps)}
    if mode == "mae":
        o.update({f"pretrain.{k}": v for k, v in scale.decoder.items()})
    else:  # short run: the augmentation that helps at this scale only
        o.update({"pretrain.mixup": 0.0, "pretrain.cutmix": 0.0, "pretrain.auto_augment": "none",
                  "pretrain.reprob": 0.0, "student.drop_path": 0.0})
    return o


def distill_overrides(teachers: list[str], scale: Scale, seed: int = 0, **distill) -> dict:
    o = {**_common(scale, seed), "student.arch": "vit_base_patch16_224", "student.patch_size": scale.patch_size,
         "student.kwargs": dict(scale.model), "student.drop_path": 0.0, "train.steps": scale.distill_steps,
         "optim.warmup_steps": _warmup(scale.distill_steps), "distill.teachers": teachers, "distill.masking": "progressive",
         "distill.relation_blocks": list(scale.relation_blocks), "distill.mask_blocks": list(scale.mask_blocks),
         "eval.every": scale.eval_every, "eval.samples": list(scale.eval_samples)}
    o.update({f"distill.{k}": v for k, v in distill.items()})
    return o


def finetune_overrides(student: Path, scale: Scale, *, linear_probe: bool, seed: int = 0) -> dict:
    kind, _, path = scale.source.partition(":")  # finetune names the dataset and takes its directory apart
    o = {**_common(scale, seed), "finetune.dataset": kind, "finetune.student": str(student),
         "finetune.linear_probe": linear_probe, "data.source": path or None, "data.epoch_steps": scale.epoch_steps,
         "finetune.eval_batch_size": 256}
    if linear_probe:
        o.update({"train.epochs": scale.probe_epochs, "optim.blr": 0.1, "optim.warmup_epochs": 0.5})
    else:
        o.update({"train.epochs": scale.finetune_epochs, "optim.warmup_epochs": 0.5, "finetune.mixup": 0.0,
                  "finetune.cutmix": 0.0, "finetune.auto_augment": "none", "finetune.reprob": 0.0,
                  "finetune.drop_path": 0.0, "finetune.layer_decay": 0.75})
    return o


# ---------------------------------------------------------------- running one stage

def trained(run: Path) -> bool:
    return (run / STUDENT / "config.json").is_file()


def _resume(run: Path) -> str | None:
    """'auto' where an interrupted earlier try left checkpoints, else None (a fresh run)."""
    from hdcli.train import checkpoints

    return "auto" if checkpoints.list_checkpoints(run) else None


def run_pretrain(mode: str, run: Path, scale: Scale, seed: int = 0) -> None:
    from hdcli.tasks import pretrain

    cfg = pretrain.load_config(mode, overrides=pretrain_overrides(mode, scale, seed))
    _finished(pretrain.pretrain(cfg, run, resume=_resume(run)))


def run_distill(run: Path, teachers: list[str], scale: Scale, seed: int = 0, **distill) -> None:
    from hdcli import config
    from hdcli.tasks.distill import DistillTask
    from hdcli.train import engine

    cfg = config.load_config(config.DistillConfig, overrides=distill_overrides(teachers, scale, seed, **distill))
    _finished(engine.train(lambda: DistillTask(cfg), cfg, run, resume=_resume(run)))


def run_finetune(run: Path, student: Path, scale: Scale, *, linear_probe: bool, seed: int = 0) -> None:
    from hdcli.tasks import finetune

    cfg = finetune.load_config(overrides=finetune_overrides(student, scale, linear_probe=linear_probe, seed=seed))
    _finished(finetune.finetune(cfg, run, resume=_resume(run)))


def _finished(result: dict) -> None:
    if result.get("interrupted"):
        raise KeyboardInterrupt


def finetuned(run: Path) -> bool:
    return trained(run) and (run / RESULTS).is_file()


def run_analysis(out: Path, models: dict[str, Path], n_images: int, source: str = "demo") -> None:
    """head_distance.json / nmi.json and their plots for ``models`` (name -> student dir)."""
    from hdcli import data, teachers
    from hdcli.tools import analyze

    images = data.sample_images(source, n_images, split="val", seed=0)
    loaded = {name: teachers.load(f"local-dir:{path.resolve()}") for name, path in models.items()}
    out.mkdir(parents=True, exist_ok=True)
    for metric in analyze.METRICS:
        entries = {name: analyze.measure(m, images, metric) for name, m in loaded.items()}
        analyze.plot_metric(metric, entries, out / f"{metric}.png", n_images=len(images))
        analyze.write_json(out / f"{metric}.json", metric, len(images), entries)  # last: marks the stage done


def analysed(out: Path) -> bool:
    from hdcli.tools import analyze

    return all((out / f"{m}.json").is_file() for m in analyze.METRICS)


# ---------------------------------------------------------------- the plan

def stages(out: Path, scale: Scale, seed: int = 0) -> list[Stage]:
    mae, sup, student = out / "mae", out / "sup", out / "student"
    teachers = [f"local-dir:{(mae / 'student').resolve()}", f"local-dir:{(sup / 'student').resolve()}"]
    plan = [
        Stage("pretrain-mae", "pre-train the MAE teacher", mae, lambda: trained(mae),
              lambda: run_pretrain("mae", mae, scale, seed)),
        Stage("pretrain-sup", "pre-train the supervised teacher", sup, lambda: trained(sup),
              lambda: run_pretrain("supervised", sup, scale, seed)),
        Stage("distill", "hybrid-distil the student (progressive masking)", student, lambda: trained(student),
              lambda: run_distill(student, teachers, scale, seed)),
    ]
    for name in MODELS:
        src = out / name / STUDENT
        for lp, kind in ((True, "probe"), (False, "finetune")):
            run = out / "eval" / f"{name}-{kind}"
            what = "linear-probe" if lp else "fine-tune"
            plan.append(Stage(f"{kind}-{name}", f"{what} {name}", run, lambda run=run: finetuned(run),
                              lambda run=run, src=src, lp=lp: run_finetune(run, src, scale, linear_probe=lp,
                                                                            seed=seed)))
    analysis = out / "analysis"
    plan.append(Stage("analyze", "head distance and NMI", analysis, lambda: analysed(analysis),
                      lambda: run_analysis(analysis, {n: out / n / STUDENT for n in MODELS},
                                           scale.analysis_images)))
    return plan


def run_stages(plan: list[Stage], out: Path, *, force: bool = False) -> dict[str, dict]:
    """Run every unfinished stage in order with a progress display; returns the stage log (stages.json)."""
    log_path = out / STAGES_FILE
    log: dict[str, dict] = {}
    if log_path.is_file():
        try:
            log = json.loads(log_path.read_text())
        except ValueError:
            log = {}
    bar = ui.progress()
    with bar:
        task = bar.add_task("hd demo", total=len(plan), info="")
        for i, st in enumerate(plan, 1):
            bar.update(task, description=f"[{i}/{len(plan)}] {st.title}", info="")
            if force and st.out.exists():
                shutil.rmtree(st.out)
            if st.done():
                ui.info(f"[{i}/{len(plan)}] {st.title}: done before, skipped (--force redoes it)")
                log.setdefault(st.name, {"time_s": None})["skipped"] = True
            else:
                ui.console.rule(f"[bold][{i}/{len(plan)}] {st.title}", style="dim")
                t0 = time.perf_counter()
                st.run()
                log[st.name] = {"time_s": round(time.perf_counter() - t0, 1), "skipped": False}
            write_json(log_path, log)
            bar.advance(task)
    return log


# ---------------------------------------------------------------- the report

def results(run: Path) -> dict | None:
    return read_json(run / RESULTS)


def read_analysis(out: Path) -> dict[str, dict]:
    """metric -> {model: entry} from ``<out>/analysis/{head_distance,nmi}.json`` ({} for a missing file)."""
    analysis = {}
    for metric in ("head_distance", "nmi"):
        try:
            analysis[metric] = json.loads((out / "analysis" / f"{metric}.json").read_text())["models"]
        except (OSError, ValueError, KeyError):
            analysis[metric] = {}
    return analysis


def summary_rows(out: Path) -> list[dict]:
    """One row per model: linear-probe and fine-tune top-1 (last epoch) and the analysis numbers."""
    analysis = read_analysis(out)
    rows = []
    for name in MODELS:
        lp, ft = results(out / "eval" / f"{name}-probe"), results(out / "eval" / f"{name}-finetune")
        hd, nm = analysis["head_distance"].get(name), analysis["nmi"].get(name)
        rows.append({"model": name, "method": LABELS[name], "distill": name == "student",
                     "probe_top1": lp and lp["top1"], "finetune_top1": ft and ft["top1"],
                     "head_distance": hd and hd["per_block"], "head_distance_per_head": hd and hd["per_head"],
                     "nmi": nm and nm["per_block"]})
    return rows


def _pct(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def spread(per_head: list[float]) -> float:
    m = sum(per_head) / len(per_head)
    return (sum((h - m) ** 2 for h in per_head) / len(per_head)) ** 0.5


def table_rows(rows: list[dict], relation_blocks: tuple[int, ...] = FULL.relation_blocks) -> list[list[str]]:
    """The summary table: method, distill, LP, FT, head distance (mean, spread over heads at the relation
    blocks), NMI of the last block."""
    out = []
    for r in rows:
        hd, hph, nm = r["head_distance"], r["head_distance_per_head"], r["nmi"]
        blocks = [b for b in relation_blocks if hd and b < len(hd)]
        out.append([
            r["method"], "✓" if r["distill"] else "", _pct(r["probe_top1"]), _pct(r["finetune_top1"]),
            "–" if not hd else f"{sum(hd) / len(hd):.2f}",
            "–" if not blocks else f"{sum(spread(hph[b]) for b in blocks) / len(blocks):.2f}",
            "–" if not nm else f"{nm[-1]:.3f}",
        ])
    return out


def headers(relation_blocks: tuple[int, ...], short: bool = False) -> list[str]:
    blocks = ", ".join(map(str, relation_blocks))
    if short:
        return ["Method", "Dist.", "LP top-1", "FT top-1", "Head dist.", f"HD spread ({blocks})", "NMI last"]
    return ["Method", "Distill.", "Linear probe top-1 (%)", "Fine-tune top-1 (%)", "Head dist. (mean, px)",
            f"Head-dist. spread, blocks {blocks}", "NMI, last block"]


def backbone(scale: Scale) -> str:
    m = scale.model
    return f"ViT d{m['embed_dim']}×{m['depth']} blocks, {m['num_heads']} heads, /{scale.patch_size} @ {scale.img_size}px"


def write_report(out: Path, scale: Scale, log: dict[str, dict], *, quick: bool = False) -> Path:
    rows = summary_rows(out)
    table = table_rows(rows, scale.relation_blocks)
    head = headers(scale.relation_blocks)
    n_train, n_val = 1437, 360
    lines = [
        "# hd demo report",
        "",
        f"Everything below was produced by `hd demo --out {out}{' --quick' if quick else ''}` on the built-in digits "
        f"(sklearn's 8×8 digits upsampled to {scale.img_size}×{scale.img_size}; {n_train} training images, "
        f"{n_val} held-out images in 10 classes). All three models are the same tiny ViT ({backbone(scale)}).",
        "",
        "## Results (in the shape of the paper's Table 1)",
        "",
        "Top-1 accuracy on the held-out split after linear probing (frozen backbone, BatchNorm + linear head on "
        "the CLS token) and after full fine-tuning, last epoch. Head distance and NMI as in the paper's Fig. 1/2: "
        "the spread (std over heads) of the head distance at the relation-distilled blocks measures attention "
        "diversity, the NMI of the last block how much the attention depends on the query (discrimination).",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
        *["| " + " | ".join(r) + " |" for r in table],
        "",
        "## Setup",
        "",
        f"- Backbone: {backbone(scale)}; batch {scale.batch_size}; AdamW, lr = {scale.blr} × batch / 256, cosine.",
        f"- MAE teacher: `hd pretrain mae`, {scale.mae_steps} steps, mask ratio 0.75, decoder "
        f"{scale.decoder['decoder_depth']} × {scale.decoder['decoder_dim']}, normalised-pixel loss.",
        f"- Supervised teacher: `hd pretrain supervised`, {scale.sup_steps} steps, cross-entropy with label "
        "smoothing 0.1.",
        f"- Student: `hd distill`, {scale.distill_steps} steps, relations of MAE blocks "
        f"{', '.join(map(str, scale.relation_blocks))} + final features of the supervised teacher, progressive "
        f"masking entering blocks {', '.join(map(str, scale.mask_blocks))} (drop ratio 0.3: 16 → 11 → 8 → 6 tokens; the "
        "paper's blocks 9, 10 and 0, 4, 8 of 12, scaled to this depth).",
        f"- Evaluation: `hd finetune --linear-probe` ({scale.probe_epochs} epochs) and `hd finetune` "
        f"({scale.finetune_epochs} epochs) on the train split, scored on the held-out split; "
        f"`hd analyze` on {scale.analysis_images} held-out images.",
        "",
        *watch_section(out, scale),
        "## Attention analysis",
        "",
        "Average head distance per block (dots: heads, line: mean over heads):",
        "",
        "![head distance](analysis/head_distance.png)",
        "",
        "Normalised mutual information between query and key positions per block:",
        "",
        "![NMI](analysis/nmi.png)",
        "",
        "| Model | " + " | ".join(f"block {b}" for b in range(scale.model["depth"])) + " |",
        "| --- | " + " | ".join("---" for _ in range(scale.model["depth"])) + " |",
    ]
    for metric, key, fmt in (("head distance", "head_distance", "{:.2f}"), ("NMI", "nmi", "{:.3f}")):
        for r in rows:
            if r[key]:
                lines.append(f"| {r['model']} {metric} | " + " | ".join(fmt.format(v) for v in r[key]) + " |")
    lines += [
        "",
        "## Stages",
        "",
        "| Stage | Time (s) | |",
        "| --- | --- | --- |",
        *[f"| {name} | {'–' if s.get('time_s') is None else s['time_s']} | {'skipped (done before)' if s.get('skipped') else ''} |"
          for name, s in log.items()],
        "",
        "## Reading it",
        "",
        "This is a smoke-scale run (minutes on a CPU, teachers trained here for a few hundred steps), so the "
        "numbers show that the chain works, not the paper's effect sizes. "
        + ("`--quick` ran a few steps per stage: the accuracies are near chance. " if quick else "")
        + "The mini study (docs/mini-study.md) runs the comparison rows over 3 seeds on Fashion-MNIST.",
        "",
    ]
    return atomic_write(out / REPORT, "\n".join(lines))


def watch_section(out: Path, scale: Scale) -> list[str]:
    """The report's "Watching the distillation": the k-NN curve of the student with the teachers' lines."""
    return [
        "## Watching the distillation",
        "",
        f"k-NN top-1 (k = 20, cosine, DINO's weighted vote) of the student's CLS and average-pooled features every "
        f"{scale.eval_every} steps of `hd distill`, bank = {scale.eval_samples[0]} train images, queries = "
        f"{scale.eval_samples[1]} held-out images; the teachers once, dashed (docs/distill.md \"Watching a run\"):",
        "",
        "![k-NN during distillation](student/plots/knn.png)",
        "",
        *knn_table(out / "student"),
    ]


def knn_table(run: Path) -> list[str]:
    """The k-NN numbers of a distill run's metrics.jsonl as markdown lines: the student at each evaluation, then
    the teachers (recorded once)."""
    from hdcli.train.plots import read_metrics

    try:
        recs = read_metrics(run)
    except HDError:
        return ["(no metrics.jsonl: the distill stage did not run)", ""]
    evals = [r for r in recs if "knn/student_cls" in r]
    teachers = sorted({k.removeprefix("knn/").rsplit("_", 1)[0] for r in recs for k in r
                       if k.startswith("knn/") and not k.startswith("knn/student_")})
    lines = ["| Step | " + " | ".join(f"student {w}" for w in ("CLS", "avg")) + " |", "| --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['knn/student_cls']:.1f} | {r.get('knn/student_avg', float('nan')):.1f} |" for r in evals]
    first = recs[0] if recs else {}
    lines += [f"| teacher {t} | {first.get(f'knn/{t}_cls', float('nan')):.1f} | "
              f"{first.get(f'knn/{t}_avg', float('nan')):.1f} |" for t in teachers]
    return [*lines, ""]


def print_table(out: Path, scale: Scale) -> None:
    from rich.table import Table

    table = Table(title=f"hd demo: {out / REPORT}", title_style="bold")
    for h in headers(scale.relation_blocks, short=True):
        table.add_column(h, justify="left" if h == "Method" else "right", no_wrap=h == "Method")
    rows = summary_rows(out)
    for name, r in zip((r["model"] for r in rows), table_rows(rows, scale.relation_blocks), strict=True):
        table.add_row(SHORT_LABELS[name], *r[1:])
    ui.stdout.print(table)


# ---------------------------------------------------------------- entry point

def demo(out: str | os.PathLike = "runs/demo", *, quick: bool = False, force: bool = False, seed: int = 0) -> Path:
    """Run (or finish) the demo into ``out``; write report.md, print the table; return the report path."""
    import torch

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HDError(f"{out} is a file", "give a directory for --out")
    scale = QUICK if quick else FULL
    marker = out / "demo.json"
    want = json.loads(json.dumps({"quick": quick, "seed": seed, "scale": dataclasses.asdict(scale)}))  # as read back
    if marker.is_file() and not force:
        try:
            have = json.loads(marker.read_text())
        except ValueError:
            have = None
        if have is not None and have != want:
            raise HDError(f"{out} holds a demo run with other settings ({'--quick' if have.get('quick') else 'full'}, "
                          f"seed {have.get('seed')})", "add --force to redo it, or choose another --out")
    if "OMP_NUM_THREADS" not in os.environ:
        # tiny models on a few cores: extra intra-op threads only add synchronisation (next to a data worker)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, want)
    log = run_stages(stages(out, scale, seed), out, force=force)
    path = write_report(out, scale, log, quick=quick)
    print_table(out, scale)
    ui.info(f"report: {path}  ({time.perf_counter() - t0:.0f} s)")
    return path
