"""One declaration per command-line flag of the training commands (distill, finetune, pretrain).

An :class:`Opt` is a flag bound to a config key; its help text shows the key's default read from the
command's config dataclass (``{default}`` in the help, or appended), so a default lives in one place.
:func:`with_options` adds a list of them to a Typer command: the command receives the values given as
``overrides`` (config key -> value, None = not given) next to its own parameters.

    @app.command("distill")
    @with_options(DistillConfig, *run_options("runs/distill"), *TRAIN)
    def distill(overrides: dict, recipe, out, resume, set_, print_config): ...

Torch-free: ``hd --help`` builds every command's options without importing torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

RUN, MODEL, METHOD, DATA, AUG, OBJ, TRAIN_PANEL, CKPT, EVAL = (
    "Run", "Model", "Method", "Data", "Augmentation", "Objective", "Training", "Checkpoints and logs",
    "Watching the run")


@dataclass(frozen=True)
class Opt:
    """A flag: ``flags`` (``--batch-size``, ``-b``) set config key ``key`` (``train.batch_size``).

    ``help`` may hold ``{default}`` (the key's default in the command's config class); without it, and
    with a default other than None, `` (default: X)`` is appended. ``type``: the value's type on the
    command line (``bool`` flags may be ``--x/--no-x``). ``name``: the Python parameter (default: the
    key's last part).
    """

    key: str
    flags: tuple[str, ...]
    help: str
    panel: str
    type: Any = str
    name: str | None = None
    note: str = ""  # a command's own remark on the default, e.g. "90 linear probing"

    @property
    def param_name(self) -> str:
        return self.name or self.key.rsplit(".", 1)[-1]

    def help_for(self, cls) -> str:
        default = config_default(cls, self.key)
        shown = _show(default) + (f"; {self.note}" if self.note else "")
        if "{default}" in self.help:
            return self.help.format(default=shown)
        if not shown or "(default:" in self.help:  # the help states its default in its own words
            return self.help
        return f"{self.help.rstrip('.')} (default: {shown})."

    def parameter(self, cls) -> inspect.Parameter:
        option = typer.Option(*self.flags, help=self.help_for(cls), rich_help_panel=self.panel, show_default=False)
        return inspect.Parameter(self.param_name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[self.type | None, option])


def noted(opts, **notes: str) -> tuple[Opt, ...]:
    """``opts`` with a command's remarks on their defaults, by parameter name: ``noted(TRAIN, epochs="90 ...")``."""
    return tuple(dataclasses.replace(o, note=notes[o.param_name]) if o.param_name in notes else o for o in opts)


def config_default(defaults, key: str):
    """The default of dotted ``key``: ``defaults`` is a config class or a zero-argument function returning the
    command's default config (e.g. with a preset applied)."""
    section, name = key.split(".", 1)
    return getattr(getattr(defaults(), section), name)


def _show(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list | tuple):
        return ",".join(str(x) for x in v)
    if isinstance(v, float) and v and abs(v) < 1e-2:
        mantissa, exp = f"{v:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"  # 1.5e-4, as recipes write it
    if isinstance(v, float):
        return f"{v:g}"
    return "" if v is None else str(v)


def with_options(cls, *opts: Opt | inspect.Parameter):
    """Add ``opts`` to a Typer command. ``Opt``s arrive as ``overrides`` {config key: value or None}; plain
    ``inspect.Parameter``s (see :func:`run_options`) arrive as keyword arguments of their own."""
    def decorate(fn):
        made = cls()  # the command's defaults, built once for all its options' help
        bound = [o for o in opts if isinstance(o, Opt)]
        extra = [o.parameter(lambda: made) if isinstance(o, Opt) else o for o in opts]
        given = {o.name for o in opts if isinstance(o, inspect.Parameter)}
        # the command names the plain parameters it receives; their declarations come from ``opts``
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.name != "overrides" and p.name not in given]
        names = [p.name for p in own + extra]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise TypeError(f"{fn.__name__}: options declared twice: {sorted(dupes)}")

        @functools.wraps(fn)
        def command(**kwargs):
            overrides = {o.key: kwargs.pop(o.param_name) for o in bound}
            return fn(overrides=overrides, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own + extra]
        positional = [p for p in params if p.default is inspect.Parameter.empty]
        command.__signature__ = inspect.Signature(positional + [p for p in params if p not in positional])
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command
    return decorate


def run_options(out: str, *, out_help: str = "Run directory: config.toml, metrics.jsonl, checkpoints/, student/.",
                recipe_help: str = "TOML recipe; lists only what differs from the defaults.",
                set_example: str = "optim.min_lr=1e-6") -> list[inspect.Parameter]:
    """--recipe, --out, --resume, --set, --print-config, --allow-config-change: how a training run is named,
    continued and configured."""
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("recipe", kw, default=None, annotation=Annotated[list[Path] | None, typer.Option(
            "--recipe", help=recipe_help + " Repeatable: recipes are layered in order, later keys win.",
            rich_help_panel=RUN, show_default=False)]),
        inspect.Parameter("out", kw, default=Path(out), annotation=Annotated[Path, typer.Option(
            "--out", "-o", help=out_help, rich_help_panel=RUN)]),
        inspect.Parameter("resume", kw, default=None, annotation=Annotated[str | None, typer.Option(
            "--resume", help="'auto' (newest complete checkpoint in --out; the run's config.toml is the base "
            "config) or a checkpoint path.", rich_help_panel=RUN, show_default=False)]),
        inspect.Parameter("set_", kw, default=None, annotation=Annotated[list[str] | None, typer.Option(
            "--set", help=f"Any config key, TOML value: --set {set_example} (repeatable).", metavar="KEY=VALUE",
            rich_help_panel=RUN, show_default=False)]),
        inspect.Parameter("print_config", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--print-config", help="Print the resolved config (TOML) to stdout and exit.", rich_help_panel=RUN)]),
        inspect.Parameter("allow_config_change", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--allow-config-change", help="Let --resume change what the run trains (teachers, blocks, masking, "
            "model, ...): a new segment, its predecessor's config kept in config-history/.", rich_help_panel=RUN)]),
    ]


# ---------------------------------------------------------------- the options shared by the training commands

DATA_OPTS = (
    Opt("data.num_workers", ("--num-workers",), "Data loader processes per rank (default: min(8, CPUs per rank − 1)).",
        DATA, int),
    Opt("data.epoch_steps", ("--epoch-steps",), "Batches per epoch per rank (default: one pass over the data).",
        DATA, int),
    Opt("data.max_bad_fraction", ("--max-bad-fraction",), "Unreadable images tolerated per epoch.", DATA, float),
)

TRAIN = (
    Opt("train.epochs", ("--epochs",), "Epochs.", TRAIN_PANEL, int),
    Opt("train.steps", ("--steps",), "Total optimiser steps (overrides --epochs).", TRAIN_PANEL, int),
    Opt("train.batch_size", ("--batch-size", "-b"), "Batch per device (per process).", TRAIN_PANEL, int),
    Opt("train.accum_steps", ("--accum-steps",), "Gradient accumulation micro-batches per step.", TRAIN_PANEL, int),
    Opt("optim.blr", ("--blr",), "Base lr: lr = blr × global batch / 256.", TRAIN_PANEL, float),
    Opt("optim.lr", ("--lr",), "Absolute lr (overrides --blr).", TRAIN_PANEL, float),
    Opt("optim.warmup_epochs", ("--warmup-epochs",), "Linear warm-up epochs.", TRAIN_PANEL, float),
    Opt("optim.weight_decay", ("--weight-decay",), "AdamW weight decay.", TRAIN_PANEL, float),
    Opt("optim.min_lr", ("--min-lr",), "Cosine floor.", TRAIN_PANEL, float),
    Opt("train.mixed_precision", ("--mixed-precision",), "auto | no | bf16 | fp16 (default: {default} = bf16 on a "
        "GPU, no on the CPU).", TRAIN_PANEL),
    Opt("train.seed", ("--seed",), "Seed of weights, data order, augmentation.", TRAIN_PANEL, int),
    Opt("train.compile", ("--compile/--no-compile",), "torch.compile the trainable module.", TRAIN_PANEL, bool,
        name="compile_"),
    Opt("train.cpu", ("--cpu",), "Use the CPU even where a GPU is visible.", TRAIN_PANEL, bool),
)

CHECKPOINTS = (
    Opt("train.save_every", ("--save-every",), "Steps between checkpoints.", CKPT, int),
    Opt("train.keep_checkpoints", ("--keep-checkpoints",), "Newest checkpoints kept.", CKPT, int),
    Opt("train.log_every", ("--log-every",), "Steps between metrics lines.", CKPT, int),
    Opt("train.nan_tolerance", ("--nan-tolerance",), "Consecutive non-finite steps skipped before the run stops.",
        CKPT, int),
    Opt("train.tensorboard", ("--tensorboard",), "Also log to <out>/tensorboard (= --tracker tensorboard).", CKPT, bool),
    Opt("train.trackers", ("--tracker",), "Trackers, comma-separated: tensorboard, wandb (main process; wandb "
        "writes <out>/wandb, also with WANDB_MODE=offline).", CKPT),
    Opt("train.plot", ("--plot/--no-plot",), "Write <out>/plots/*.png (hd plot) when the run ends.", CKPT, bool),
)


def student_options(arch_flag: str, key_prefix: str = "student") -> tuple[Opt, ...]:
    """The architecture, resolution and patch size of the model a command builds from scratch."""
    return (
        Opt(f"{key_prefix}.arch", (arch_flag,), "timm ViT architecture.", MODEL, name="arch"),
        Opt("data.img_size", ("--img-size",), "Input resolution.", MODEL, int),
        Opt(f"{key_prefix}.patch_size", ("--patch-size",), "Patch size (default: the architecture's).", MODEL, int),
    )


DATA_SOURCE = Opt("data.source", ("--data",), "demo (default), fashion-mnist[:DIR], cifar100:DIR, an image folder, "
                  "or WebDataset shards (DIR or DIR/train-{000000..000099}.tar).", DATA, name="data_src")

