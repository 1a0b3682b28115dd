"""``hd report``: the paper's tables with our numbers beside them, and ``record`` for downstream results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

IN, OUT, REC = "Input", "Output", "Results"

HELP = {
    "table1": "Tab. 1: ImageNet-1k top-1, COCO AP^box/AP^mask, ADE20K mIoU.",
    "table2": "Tab. 2: CIFAR-100, Cars, iNaturalist19 top-1 and their mean.",
    "ablations": "Tab. 3-8: COCO AP^box/AP^mask of the ablation runs.",
}


def _make(which: str):
    def command(
        runs: Annotated[Path, typer.Option("--runs", help="The OUT directory of `hd reproduce` / `make reproduce-*` "
                                           "(one dir per run: distill/, ft-*/results.json, coco.json, ade20k.json).",
                                           rich_help_panel=IN, show_default=False)],
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the markdown here (default: print it).",
                                                 rich_help_panel=OUT, show_default=False)] = None,
        best: Annotated[bool, typer.Option("--best", help="Our best-epoch top-1 instead of the final epoch's.",
                                           rich_help_panel=IN)] = False,
        paper: Annotated[Path | None, typer.Option("--paper", help="The paper's numbers (default: "
                                                   "recipes/paper_results.toml).", rich_help_panel=IN,
                                                   show_default=False)] = None,
    ) -> None:
        from hdcli import ui
        from hdcli.paper import report
        from hdcli.rundir import atomic_write

        text = report.report(which, runs, paper_path=paper, best=best)
        if out is None:
            ui.stdout.print(text, end="", markup=False, highlight=False, soft_wrap=True)
        else:
            atomic_write(out, text)
            ui.info(f"[green]wrote[/] {out}")

    command.__doc__ = f"{HELP[which]} Markdown: the paper's number, ours and the difference per cell."
    return command


def record(
    run: Annotated[Path, typer.Argument(help="A run dir of `hd reproduce` (OUT/<run>).", show_default=False)],
    coco_box: Annotated[float | None, typer.Option("--coco-box", help="COCO AP^box in percent.",
                                                   rich_help_panel=REC, show_default=False)] = None,
    coco_mask: Annotated[float | None, typer.Option("--coco-mask", help="COCO AP^mask in percent.",
                                                    rich_help_panel=REC, show_default=False)] = None,
    ade20k: Annotated[float | None, typer.Option("--ade20k", help="ADE20K mIoU in percent.",
                                                 rich_help_panel=REC, show_default=False)] = None,
    from_detectron2: Annotated[Path | None, typer.Option("--from-detectron2", help="Read AP^box/AP^mask from a "
                                                         "detectron2 output dir or its metrics.json (last eval).",
                                                         rich_help_panel=REC, show_default=False)] = None,
    from_mmseg: Annotated[Path | None, typer.Option("--from-mmseg", help="Read mIoU from an mmseg work dir, its "
                                                    "vis_data/scalars.json or a *.log.json (last eval).",
                                                    rich_help_panel=REC, show_default=False)] = None,
) -> None:
    """Record downstream results of a run (coco.json, ade20k.json) for `hd report`: by hand or from the
    detectron2 / mmseg logs of a run made elsewhere."""
    from hdcli import ui
    from hdcli.errors import HDError
    from hdcli.paper import report

    if not run.is_dir():
        raise HDError(f"no run directory at {run}", "give OUT/<run> of hd reproduce")
    source = ""
    if from_detectron2 is not None:
        if coco_box is not None or coco_mask is not None:
            raise HDError("give --from-detectron2 or --coco-box/--coco-mask, not both")
        r = report.read_detectron2(from_detectron2)
        coco_box, coco_mask, source = r["box_ap"], r.get("mask_ap"), f"detectron2 {from_detectron2}"
    if from_mmseg is not None:
        if ade20k is not None:
            raise HDError("give --from-mmseg or --ade20k, not both")
        ade20k, source = report.read_mmseg(from_mmseg), f"mmseg {from_mmseg}"
    for path in report.record(run, box_ap=coco_box, mask_ap=coco_mask, miou=ade20k, source=source):
        ui.info(f"[green]wrote[/] {path}")


def figures(
    runs: Annotated[Path, typer.Option("--runs", help="The OUT directory of `make reproduce-figures` (one dir per "
                                       "run, its analyze/head_distance.json and nmi.json; teachers/analyze/).",
                                       rich_help_panel=IN, show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory for figure1.png .. figure3.png and "
                                             "figures.md (default: <runs>/figures).", rich_help_panel=OUT,
                                             show_default=False)] = None,
) -> None:
    """Fig. 1-3 (Sec. 2) as the paper lays them out: head distance and NMI per block of the students distilled with
    each decoder, with mask feature reconstruction and FD's student, beside the teachers. Curves not measured yet
    are listed, not drawn."""
    from hdcli import ui
    from hdcli.paper import figures as figs

    written, missing = figs.draw(runs, out or runs / "figures")
    for path in written:
        ui.info(f"[green]wrote[/] {path}")
    if missing:
        ui.warn(f"{len(missing)} curve(s) not measured yet (listed in {(out or runs / 'figures') / 'figures.md'})")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(name="report", help="The paper's tables (recipes/paper_results.toml) with our numbers and "
                      "the differences, as markdown, and its Figures 1-3 (docs/reproduce.md).", no_args_is_help=True)
    for which in HELP:
        sub.command(which)(_make(which))
    sub.command("figures")(figures)
    sub.command("record")(record)
    app.add_typer(sub, name="report")
