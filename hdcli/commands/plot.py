"""``hd plot``: PNGs of one or more runs' ``metrics.jsonl`` (docs/distill.md "Watching a run")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)


def plot(
    runs: Annotated[list[Path], typer.Argument(
        help="Run directories (--out of hd distill / finetune / pretrain), each holding metrics.jsonl.",
        show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Where the PNGs go (default: RUN/plots for one run, ./plots for several).",
        show_default=False)] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", help="A legend name per run, in order (default: the run directories' names).",
        show_default=False)] = None,
) -> None:
    """Plot loss parts, lr, images/s, k-NN top-1 with the teachers' lines, per-target gradient shares and
    signals, and the head-distance probe; several runs on one figure for comparison."""
    from rich.markup import escape

    from hdcli.errors import HDError
    from hdcli.train.plots import plot_runs
    from hdcli.ui import info

    if label and len(label) != len(runs):
        raise HDError(f"{len(label)} --label for {len(runs)} runs", "give one --label per run, or none")
    written = plot_runs(runs, out, labels=label)
    if not written:
        raise HDError("the runs' metrics.jsonl hold no record to plot yet", "plot again after the first --log-every steps")
    info(f"[green]wrote[/] {len(written)} PNGs in [bold]{escape(str(written[0].parent))}[/]: "
         + ", ".join(p.name for p in written))
