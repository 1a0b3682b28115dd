"""Wiring shared by the training commands (distill, finetune, pretrain): config resolution and exit codes.

Not a command group itself (it is not in ``COMMANDS``); torch-free so ``hd --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer


def resolve_config(load: Callable, out: Path, *, recipe, overrides: dict, set_: list[str] | None, resume,
                   print_config: bool):
    """The run's config: ``load(recipe=, overrides=, base=)`` with the ``--set`` items over the flags and,
    when resuming, the run's own config.toml as the base. With ``--print-config`` it is printed as TOML
    and None is returned (nothing runs)."""
    from hdcli import config, ui

    overrides = {**overrides, **config.parse_assignments(set_ or [])}
    from hdcli.rundir import CONFIG

    base = out / CONFIG if resume is not None and (out / CONFIG).is_file() else None
    cfg = load(recipe=recipe, overrides=overrides, base=base)
    if print_config:
        ui.stdout.print(config.dump_config(cfg), end="", markup=False, highlight=False, soft_wrap=True)
        return None
    return cfg


def exit_if_interrupted(result: dict) -> None:
    """After a run stopped by a signal (its checkpoint saved): exit 130 (SIGINT) or 143 (SIGTERM), as a shell would."""
    if result["interrupted"]:
        raise typer.Exit(130 if result["interrupted"] == "SIGINT" else 143)


def run_training(load: Callable, train: Callable, *, command: str, out: Path, recipe, overrides: dict,
                 set_: list[str] | None, resume, print_config: bool, allow_config_change: bool) -> dict | None:
    """What ``hd distill|finetune|pretrain`` do once their flags are read: resolve the config (print it and
    return None with ``--print-config``), ``train(cfg, out, resume=, resume_hint=, allow_config_change=)``,
    and exit 130/143 after a signal (the checkpoint saved). Returns the engine's summary."""
    cfg = resolve_config(load, out, recipe=recipe, overrides=overrides, set_=set_, resume=resume,
                         print_config=print_config)
    if cfg is None:
        return None
    result = train(cfg, out, resume=resume, resume_hint=f"hd {command} --out {out} --resume auto",
                   allow_config_change=allow_config_change)
    exit_if_interrupted(result)
    return result
