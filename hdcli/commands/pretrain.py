"""``hd pretrain mae|supervised``: train a teacher from scratch with the one engine (hdcli/tasks/pretrain.py).

The result, ``<out>/student/``, is a timm ``save_for_hf`` dir: pass ``local-dir:<out>/student`` to
``hd distill --teachers``, or ``<out>`` to ``hd finetune --student`` / ``hd analyze``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated

import typer

from hdcli.commands.options import (
    CHECKPOINTS,
    DATA_OPTS,
    DATA_SOURCE,
    MODEL,
    OBJ,
    TRAIN,
    Opt,
    run_options,
    student_options,
    with_options,
)
from hdcli.config import PretrainConfig, load_pretrain

MODEL_KWARGS = inspect.Parameter("model_kwargs", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    str | None, typer.Option("--model-kwargs", help="Extra timm kwargs as a TOML table, e.g. "
                             "'{embed_dim = 48, depth = 12, num_heads = 3}'.", rich_help_panel=MODEL,
                             show_default=False)])


def _common(out: str) -> tuple:
    return (*run_options(out, recipe_help="TOML recipe; lists only what differs from the defaults (sections train, "
                         "optim, data, student, pretrain).", set_example="pretrain.decoder_depth=4"),
            *student_options("--arch"), MODEL_KWARGS, DATA_SOURCE, *DATA_OPTS, *TRAIN, *CHECKPOINTS)


def _run(mode: str, overrides: dict, out, recipe, resume, set_, print_config, model_kwargs,
         allow_config_change: bool) -> None:
    from hdcli import config, ui
    from hdcli.commands.training import run_training
    from hdcli.tasks import pretrain

    if model_kwargs is not None:
        overrides["student.kwargs"] = config.parse_assignments([f"k={model_kwargs}"])["k"]
    result = run_training(functools.partial(pretrain.load_config, mode), pretrain.pretrain, command=f"pretrain {mode}",
                          out=out, recipe=recipe, overrides=overrides, set_=set_, resume=resume,
                          print_config=print_config, allow_config_change=allow_config_change)
    if result is None:
        return
    ui.info(f"use it as a teacher: hd distill --teachers local-dir:{result['student']},...")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Pre-train a teacher from scratch (MAE or supervised) on any supported data.",
                      no_args_is_help=True)
    app.add_typer(sub, name="pretrain")

    @sub.command("mae")
    @with_options(PretrainConfig, *_common("runs/pretrain-mae"),
                  Opt("pretrain.mask_ratio", ("--mask-ratio",), "Fraction of patches hidden from the encoder.", OBJ,
                      float),
                  Opt("pretrain.decoder_dim", ("--decoder-dim",), "Decoder width.", OBJ, int),
                  Opt("pretrain.decoder_depth", ("--decoder-depth",), "Decoder blocks.", OBJ, int),
                  Opt("pretrain.decoder_heads", ("--decoder-heads",), "Decoder heads.", OBJ, int),
                  Opt("pretrain.norm_pix_loss", ("--norm-pix-loss/--no-norm-pix-loss",), "Per-patch normalised "
                      "pixel targets.", OBJ, bool))
    def mae(overrides: dict, out, recipe, resume, set_, print_config, model_kwargs,
            allow_config_change) -> None:
        """MAE: random 75% masking, light decoder, normalised-pixel loss; exports the encoder.

        Example (CPU, tiny): hd pretrain mae --img-size 32 --patch-size 4 --model-kwargs
        '{embed_dim = 48, depth = 12, num_heads = 3}' --set pretrain.decoder_dim=64 --steps 200 --out runs/mae
        """
        _run("mae", overrides, out, recipe, resume, set_, print_config, model_kwargs, allow_config_change)

    @sub.command("supervised")
    @with_options(lambda: load_pretrain("supervised"), *_common("runs/pretrain-sup"),
                  Opt("pretrain.smoothing", ("--smoothing",), "Label smoothing.", OBJ, float),
                  Opt("pretrain.mixup", ("--mixup",), "Mixup alpha, 0 = off.", OBJ, float),
                  Opt("pretrain.cutmix", ("--cutmix",), "CutMix alpha, 0 = off.", OBJ, float),
                  Opt("pretrain.auto_augment", ("--auto-augment",), "timm RandAugment spec or 'none'.", OBJ),
                  Opt("pretrain.reprob", ("--reprob",), "Random erasing probability.", OBJ, float),
                  Opt("pretrain.num_classes", ("--num-classes",), "Classes (default: from the data).", OBJ, int))
    def supervised(overrides: dict, out, recipe, resume, set_, print_config, model_kwargs,
            allow_config_change) -> None:
        """Supervised (DeiT-style): cross-entropy, label smoothing, RandAugment, Mixup/CutMix.

        Exports the encoder without its head (a feature teacher; hd finetune adds a fresh head).
        """
        _run("supervised", overrides, out, recipe, resume, set_, print_config, model_kwargs, allow_config_change)
