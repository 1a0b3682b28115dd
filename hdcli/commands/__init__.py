"""Command groups of the ``hd`` CLI, one module each. ``register_all`` adds them to the root app.

To add a command: write ``hdcli/commands/<name>.py`` with a ``register(app)`` function and add its
name to ``COMMANDS`` (order = order in ``hd --help``).
"""

from __future__ import annotations

import importlib

COMMANDS: list[str] = ["teachers", "pretrain", "distill", "finetune", "analyze", "plot", "export", "data", "bench", "reproduce", "report", "demo"]


def register_all(app) -> None:
    for name in COMMANDS:
        importlib.import_module(f"hdcli.commands.{name}").register(app)
