"""The ``hd`` command line: the root app, global flags and the one place user errors are printed.

Each command group lives in ``hdcli/commands/<name>.py`` and is registered in ``_register``.
Command modules import torch/timm lazily (inside the command) so ``hd --help`` stays fast and
``--offline`` can set ``HF_HUB_OFFLINE`` before huggingface_hub is imported (it reads it at import).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from hdcli import __version__
from hdcli.errors import HDError

app = typer.Typer(
    name="hd",
    help="Hybrid Distillation toolkit: distil a ViT from an MIM teacher's token relations and a "
    "supervised/CLIP teacher's features, with progressive redundant-token masking.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hd {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="Never touch the network (sets HF_HUB_OFFLINE=1).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("HD_DEBUG") == "1"
    if offline:
        from hdcli.teachers.hub import set_offline

        set_offline()


def _register() -> None:
    from hdcli.commands import register_all

    register_all(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; print user errors as one red line and exit 2 (``--debug``: raise)."""
    debug = "--debug" in (argv if argv is not None else sys.argv) or os.environ.get("HD_DEBUG") == "1"
    # Idle OpenMP threads sleep instead of spinning: on shared CPUs (2 cores, several jobs) spinning
    # threads slow tiny runs 3-5x. Must be set before torch loads; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app(args=argv, standalone_mode=True)
    except HDError as e:
        if debug or _state["debug"]:
            raise
        from rich.markup import escape

        from hdcli.ui import console

        # escape: problems and hints hold [sections], [extras] and paths that are not rich markup
        console.print(f"[bold red]error:[/] {escape(e.problem)}" + (f" [dim]({escape(e.hint)})[/]" if e.hint else ""),
                      soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
