"""``hd demo --study``: the mini study behind docs/mini-study.md (``make mini-study``).

The demo chain on Fashion-MNIST with the comparison rows of the paper's Tab. 1 and 3, each row a
``hd distill`` configuration (``[[distill.targets]]`` for the single-teacher rows), over several seeds:

| row | teachers | targets | masking |
| --- | --- | --- | --- |
| distill-mae | MAE | features | none |
| distill-sup | Sup | features | none |
| sup-own-rel | Sup | features + relations (the relation blocks) | none |
| hybrid | MAE, Sup | Sup features + MAE relations | none |
| hybrid-keep34 | MAE, Sup | Sup features + MAE relations | progressive, drop 0.3 (34 % kept) |
| hybrid-keep73 | MAE, Sup | Sup features + MAE relations | progressive, drop 0.1 (73 % kept) |

The two teachers are pre-trained once (seed 0); every row is distilled, linear-probed and fine-tuned
once per seed; head distance and NMI are measured on the seed-0 student of each row. Results:
``<out>/study.md`` (mean ± std over seeds) and ``<out>/study.json``; plots in ``<out>/analysis/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

from hdcli import ui
from hdcli.paper import demo
from hdcli.paper.demo import Scale, Stage
from hdcli.rundir import STUDENT, atomic_write, write_json

ROWS: dict[str, dict] = {
    "distill-mae": {"label": "Distill-MAE (features)", "teachers": ["mae"],
                    "targets": [{"teacher": "mae", "kind": "features"}], "masking": "none"},
    "distill-sup": {"label": "Distill-Sup (features)", "teachers": ["sup"],
                    "targets": [{"teacher": "sup", "kind": "features"}], "masking": "none"},
    "sup-own-rel": {"label": "Sup + own relations", "teachers": ["sup"],
                    "targets": [{"teacher": "sup", "kind": "features"},
                                {"teacher": "sup", "kind": "relations"}], "masking": "none"},
    "hybrid": {"label": "Hybrid (Sup features + MAE relations)", "teachers": ["mae", "sup"], "masking": "none"},
    "hybrid-keep34": {"label": "Hybrid, progressive masking, 34 % kept", "teachers": ["mae", "sup"],
                      "masking": "progressive", "drop_ratio": 0.3},
    "hybrid-keep73": {"label": "Hybrid, progressive masking, 73 % kept", "teachers": ["mae", "sup"],
                      "masking": "progressive", "drop_ratio": 0.1},
}

# Fashion-MNIST at the demo's model size; every run sees steps × batch images drawn from the 60,000
# training images (probe/fine-tune: epochs × epoch_steps batches), scored on the 10,000 test images.
STUDY = Scale(source="fashion-mnist", mae_steps=1000, sup_steps=800, distill_steps=500, probe_epochs=2,
              finetune_epochs=2, epoch_steps=100, analysis_images=128)
STUDY_QUICK = Scale(source="demo", mae_steps=3, sup_steps=3, distill_steps=3, probe_epochs=1, finetune_epochs=1,
                    epoch_steps=2, analysis_images=8)


def row_distill(row: dict, names: dict[str, str], scale: Scale) -> dict:
    """``distill.*`` overrides of a row, with teacher short names replaced by their ``local-dir:`` names and
    relation targets at the scale's relation blocks."""
    o = {"teachers": [names[t] for t in row["teachers"]], "masking": row["masking"],
         "drop_ratio": row.get("drop_ratio", 0.0)}
    if "targets" in row:
        o["targets"] = [{**t, "teacher": names[t["teacher"]],
                         **({"blocks": list(scale.relation_blocks)} if t["kind"] == "relations" else {})}
                        for t in row["targets"]]
    return o


def stages(out: Path, scale: Scale, seeds: list[int], rows: list[str]) -> list[Stage]:
    mae, sup = out / "mae", out / "sup"
    names = {"mae": f"local-dir:{(mae / 'student').resolve()}", "sup": f"local-dir:{(sup / 'student').resolve()}"}
    plan = [
        Stage("pretrain-mae", "pre-train the MAE teacher", mae, lambda: demo.trained(mae),
              lambda: demo.run_pretrain("mae", mae, scale, 0)),
        Stage("pretrain-sup", "pre-train the supervised teacher", sup, lambda: demo.trained(sup),
              lambda: demo.run_pretrain("supervised", sup, scale, 0)),
    ]
    for t, path in (("mae", mae), ("sup", sup)):  # the teachers as references, seed 0
        for lp, kind in ((True, "probe"), (False, "finetune")):
            run = out / "eval" / f"{t}-{kind}"
            plan.append(Stage(f"{t}/{kind}", f"{t} teacher: {kind}", run, lambda r=run: demo.finetuned(r),
                              lambda r=run, p=path, lp=lp: demo.run_finetune(r, p / STUDENT, scale,
                                                                              linear_probe=lp, seed=0)))
    for key in rows:
        d = row_distill(ROWS[key], names, scale)
        for seed in seeds:
            run = out / key / f"seed{seed}"
            plan.append(Stage(f"{key}/seed{seed}/distill", f"{key} seed {seed}: distil", run / "distill",
                              lambda r=run: demo.trained(r / "distill"),
                              lambda r=run, s=seed, d=d: demo.run_distill(r / "distill", scale=scale, seed=s, **d)))
            for lp, kind in ((True, "probe"), (False, "finetune")):
                plan.append(Stage(f"{key}/seed{seed}/{kind}", f"{key} seed {seed}: {kind}", run / kind,
                                  lambda r=run, k=kind: demo.finetuned(r / k),
                                  lambda r=run, k=kind, s=seed, lp=lp: demo.run_finetune(
                                      r / k, r / "distill" / STUDENT, scale, linear_probe=lp, seed=s)))
    analysis = out / "analysis"
    models = {"mae": mae / STUDENT, "sup": sup / STUDENT,
              **{key: out / key / f"seed{seeds[0]}" / "distill" / STUDENT for key in rows}}
    plan.append(Stage("analyze", "head distance and NMI", analysis, lambda: demo.analysed(analysis),
                      lambda: run_analysis(analysis, models, scale, rows)))
    return plan


def run_analysis(out: Path, models: dict[str, Path], scale: Scale, rows: list[str]) -> None:
    """All models in one JSON per metric (and one plot with every row), plus one plot per row: the row's
    student against the two teachers."""
    from hdcli.tools import analyze

    demo.run_analysis(out, models, scale.analysis_images, scale.source)
    for metric in analyze.METRICS:
        entries = json.loads((out / f"{metric}.json").read_text())["models"]
        for key in rows:
            sub = {key: entries[key], "mae": entries["mae"], "sup": entries["sup"]}
            analyze.plot_metric(metric, sub, out / f"{metric}-{key}.png", n_images=scale.analysis_images)


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(out: Path, seeds: list[int], rows: list[str], scale: Scale) -> dict:
    entries = demo.read_analysis(out)
    res = {}
    for key in ["mae", "sup", *rows]:
        r: dict = {"label": ROWS[key]["label"] if key in ROWS else demo.LABELS[key]}
        for kind in ("probe", "finetune"):
            if key in ROWS:
                r[kind] = [x["top1"] for s in seeds if (x := demo.results(out / key / f"seed{s}" / kind))]
            else:
                r[kind] = [x["top1"] for x in [demo.results(out / "eval" / f"{key}-{kind}")] if x]
        hd, nm = entries["head_distance"].get(key), entries["nmi"].get(key)
        if hd:
            blocks = [b for b in scale.relation_blocks if b < len(hd["per_head"])]
            r["head_distance_spread_rel"] = statistics.fmean(demo.spread(hd["per_head"][b]) for b in blocks)
            r["head_distance_mean"] = statistics.fmean(hd["per_block"])
            r["head_distance_per_block"] = hd["per_block"]
        if nm:
            r["nmi_last"] = nm["per_block"][-1]
            r["nmi_per_block"] = nm["per_block"]
        res[key] = r
    return res


def _pm(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (seed 0 only)"
    ms = _mean_std(values)
    return "–" if ms is None else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def write_report(out: Path, scale: Scale, seeds: list[int], rows: list[str], log: dict, seconds: float) -> Path:
    res = summary(out, seeds, rows, scale)
    blocks = ", ".join(map(str, scale.relation_blocks))
    json_path = out / "study.json"
    write_json(json_path, {"seeds": seeds, "scale": dataclasses.asdict(scale), "rows": res, "stages": log})
    lines = [
        "## Results",
        "",
        f"`hd demo --study --out {out}` ({len(seeds)} seeds: {', '.join(map(str, seeds))}; "
        f"{seconds / 60:.0f} min of stages). Top-1 (%) on the {scale.source} held-out split, mean ± std over seeds. "
        f"Head distance (spread = std over heads, mean of blocks {blocks}: the relation-distilled blocks) and NMI "
        "of the last block, on the seed-0 model.",
        "",
        f"| Row | Linear probe top-1 | Fine-tune top-1 | Head-dist. spread, blocks {blocks} | Mean head dist. | NMI, last block |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in res.values():
        lines.append(f"| {r['label']} | {_pm(r.get('probe', []))} | {_pm(r.get('finetune', []))} "
                     f"| {r.get('head_distance_spread_rel', float('nan')):.2f} | {r.get('head_distance_mean', float('nan')):.2f} "
                     f"| {r.get('nmi_last', float('nan')):.3f} |")
    lines += ["", "Plots (in `analysis/`): `head_distance.png`, `nmi.png` (all rows), and per row "
              "`head_distance-<row>.png`, `nmi-<row>.png` (the row's student against both teachers).", ""]
    path = out / "study.md"
    atomic_write(path, "\n".join(lines))
    return path


def study(out: str | os.PathLike = "runs/mini-study", *, seeds: list[int] | None = None, quick: bool = False,
          rows: list[str] | None = None, source: str | None = None, force: bool = False) -> Path:
    import torch

    out = Path(out)
    seeds = seeds or [0, 1, 2]
    rows = rows or list(ROWS)
    scale = STUDY_QUICK if quick else STUDY
    if source:
        scale = dataclasses.replace(scale, source=source)
    if scale.source.startswith("fashion-mnist"):
        from hdcli import data

        data.open_records(data.parse_source(scale.source), "train")  # missing files: the error names the package
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    out.mkdir(parents=True, exist_ok=True)
    log = demo.run_stages(stages(out, scale, seeds, rows), out, force=force)
    path = write_report(out, scale, seeds, rows, log, sum(s.get("time_s") or 0 for s in log.values()))
    ui.stdout.print(path.read_text(), markup=False, highlight=False, soft_wrap=True)
    return path
