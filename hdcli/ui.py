"""Terminal output shared by all commands: one rich console on stderr, progress bars, tables."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Messages and progress go to stderr so that stdout stays clean for data (tables, --json).
console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


def interactive() -> bool:
    """True when a person watches a terminal (live bars); False on clusters and in CI (plain lines)."""
    return console.is_terminal and not os.environ.get("CI")


def progress(**kwargs) -> Progress:
    """A rich progress bar with count, elapsed time and ETA; hidden where stderr is not a terminal."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not interactive(),
        **kwargs,
    )


def info(msg: str) -> None:
    console.print(msg)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/] {msg}")


def is_main_process() -> bool:
    """Global rank 0 (torchrun/accelerate set RANK); used to keep multi-process output single."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """Processes of this launch (torchrun/accelerate set WORLD_SIZE), known before Accelerate starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def flush() -> None:
    sys.stderr.flush()
    sys.stdout.flush()


def pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
