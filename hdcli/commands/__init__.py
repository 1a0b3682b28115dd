"""Command groups of the ``hd`` CLI, one module each. ``register_all`` adds them to the root app.

To add a command: write ``hdcli/commands/<name>.py`` with a ``register(app)`` function and add its
name to ``COMMANDS`` (order = order in ``hd --help``).
"""

from __future__ import annotations

import importlib

from hdcli.errors import HDError

COMMANDS: list[str] = ["teachers", "pretrain", "distill", "cache", "finetune", "analyze", "plot", "export", "data", "bench", "reproduce", "report", "demo"]


_ROOT: list = []  # the root app the commands were registered on (hdcli.cli.app)


def register_all(app) -> None:
    _ROOT[:] = [app]
    for name in COMMANDS:
        importlib.import_module(f"hdcli.commands.{name}").register(app)


def run_in_process(argv: list[str]) -> None:
    """``hd ...`` (argv[0] = "hd") in this interpreter; HDError propagates, a non-zero exit becomes one."""
    try:
        rc = _ROOT[0](args=argv[1:], standalone_mode=False, prog_name="hd")
    except SystemExit as e:
        rc = e.code
    if rc not in (None, 0):
        raise HDError(f"`{' '.join(argv)}` exited with status {rc}")
