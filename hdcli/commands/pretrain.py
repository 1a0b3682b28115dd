"""``hd pretrain mae|supervised``: train a teacher from scratch with the one engine (hdcli/pretrain.py).

The result, ``<out>/student/``, is a timm ``save_for_hf`` dir: pass ``local-dir:<out>/student`` to
``hd distill --teachers``, or ``<out>`` to ``hd finetune --student`` / ``hd analyze``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RUN, MODEL, OBJ, DATA, TRAIN = "Run", "Model", "Objective", "Data", "Training"

Recipe = Annotated[Path | None, typer.Option("--recipe", help="TOML recipe; lists only what differs from the "
                                             "defaults (sections train, optim, data, student, pretrain).",
                                             rich_help_panel=RUN, show_default=False)]
Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory: config.toml, metrics.jsonl, checkpoints/, "
                                   "student/.", rich_help_panel=RUN)]
Resume = Annotated[str | None, typer.Option("--resume", help="'auto' (newest complete checkpoint in --out) or a "
                                            "checkpoint path.", rich_help_panel=RUN, show_default=False)]
Set = Annotated[list[str] | None, typer.Option("--set", help="Any config key, TOML value: --set "
                                               "pretrain.decoder_depth=4 (repeatable).", metavar="KEY=VALUE",
                                               rich_help_panel=RUN, show_default=False)]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the resolved config (TOML) and exit.",
                                           rich_help_panel=RUN)]
Arch = Annotated[str | None, typer.Option("--arch", help="timm ViT architecture (default: vit_base_patch16_224).",
                                          rich_help_panel=MODEL, show_default=False)]
ImgSize = Annotated[int | None, typer.Option("--img-size", help="Input resolution (default: 224).",
                                             rich_help_panel=MODEL, show_default=False)]
PatchSize = Annotated[int | None, typer.Option("--patch-size", help="Patch size (default: the architecture's).",
                                               rich_help_panel=MODEL, show_default=False)]
ModelKwargs = Annotated[str | None, typer.Option("--model-kwargs", help="Extra timm kwargs as a TOML table, e.g. "
                                                 "'{embed_dim = 48, depth = 12, num_heads = 3}'.",
                                                 rich_help_panel=MODEL, show_default=False)]
DataSrc = Annotated[str | None, typer.Option("--data", help="demo (default), fashion-mnist[:DIR], cifar100:DIR, "
                                             "an image folder, or WebDataset shards.",
                                             rich_help_panel=DATA, show_default=False)]
Workers = Annotated[int | None, typer.Option("--num-workers", help="Data loader processes (default: min(8, "
                                             "CPUs − 1)).", rich_help_panel=DATA, show_default=False)]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Epochs (default: mae 800, supervised 300).",
                                            rich_help_panel=TRAIN, show_default=False)]
Steps = Annotated[int | None, typer.Option("--steps", help="Total optimiser steps (overrides --epochs).",
                                           rich_help_panel=TRAIN, show_default=False)]
Batch = Annotated[int | None, typer.Option("--batch-size", "-b", help="Batch per device (default: 128).",
                                           rich_help_panel=TRAIN, show_default=False)]
Blr = Annotated[float | None, typer.Option("--blr", help="Base lr: lr = blr × global batch / 256 (default: mae "
                                           "1.5e-4, supervised 2.5e-4).", rich_help_panel=TRAIN, show_default=False)]
Warmup = Annotated[float | None, typer.Option("--warmup-epochs", help="Linear warm-up epochs (default: mae 40, "
                                              "supervised 5).", rich_help_panel=TRAIN, show_default=False)]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed of weights, data order, augmentation (default: 0).",
                                          rich_help_panel=TRAIN, show_default=False)]
Cpu = Annotated[bool | None, typer.Option("--cpu", help="Use the CPU even where a GPU is visible.",
                                          rich_help_panel=TRAIN, show_default=False)]


def _run(mode: str, out: Path, recipe, resume, set_, print_config, model_kwargs, overrides: dict) -> None:
    import functools

    from hdcli import config, ui
    from hdcli.commands.training import exit_if_interrupted, resolve_config
    from hdcli.tasks import pretrain

    if model_kwargs is not None:
        overrides["student.kwargs"] = config.parse_assignments([f"k={model_kwargs}"])["k"]
    cfg = resolve_config(functools.partial(pretrain.load_config, mode), out, recipe=recipe, overrides=overrides,
                         set_=set_, resume=resume, print_config=print_config)
    if cfg is None:
        return
    result = pretrain.pretrain(cfg, out, resume=resume, resume_hint=f"hd pretrain {mode} --out {out} --resume auto")
    exit_if_interrupted(result)
    ui.info(f"use it as a teacher: hd distill --teachers local-dir:{result['student']},...")


def _common(arch, img_size, patch_size, data_src, num_workers, epochs, steps, batch_size, blr, warmup_epochs,
            seed, cpu) -> dict:
    return {"student.arch": arch, "data.img_size": img_size, "student.patch_size": patch_size,
            "data.source": data_src, "data.num_workers": num_workers, "train.epochs": epochs, "train.steps": steps,
            "train.batch_size": batch_size, "optim.blr": blr, "optim.warmup_epochs": warmup_epochs,
            "train.seed": seed, "train.cpu": cpu}


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Pre-train a teacher from scratch (MAE or supervised) on any supported data.",
                      no_args_is_help=True)
    app.add_typer(sub, name="pretrain")

    @sub.command("mae")
    def mae(
        out: Out = Path("runs/pretrain-mae"), recipe: Recipe = None, resume: Resume = None, set_: Set = None,
        print_config: PrintConfig = False, arch: Arch = None, img_size: ImgSize = None,
        patch_size: PatchSize = None, model_kwargs: ModelKwargs = None,
        mask_ratio: Annotated[float | None, typer.Option("--mask-ratio", help="Fraction of patches hidden from the "
                                                         "encoder (default: 0.75).", rich_help_panel=OBJ,
                                                         show_default=False)] = None,
        decoder_dim: Annotated[int | None, typer.Option("--decoder-dim", help="Decoder width (default: 512).",
                                                        rich_help_panel=OBJ, show_default=False)] = None,
        decoder_depth: Annotated[int | None, typer.Option("--decoder-depth", help="Decoder blocks (default: 8).",
                                                          rich_help_panel=OBJ, show_default=False)] = None,
        decoder_heads: Annotated[int | None, typer.Option("--decoder-heads", help="Decoder heads (default: 16).",
                                                          rich_help_panel=OBJ, show_default=False)] = None,
        norm_pix_loss: Annotated[bool | None, typer.Option("--norm-pix-loss/--no-norm-pix-loss", help="Per-patch "
                                                           "normalised pixel targets (default: on).",
                                                           rich_help_panel=OBJ, show_default=False)] = None,
        data_src: DataSrc = None, num_workers: Workers = None, epochs: Epochs = None, steps: Steps = None,
        batch_size: Batch = None, blr: Blr = None, warmup_epochs: Warmup = None, seed: Seed = None, cpu: Cpu = None,
    ) -> None:
        """MAE: random 75% masking, light decoder, normalised-pixel loss; exports the encoder.

        Example (CPU, tiny): hd pretrain mae --img-size 32 --patch-size 4 --model-kwargs
        '{embed_dim = 48, depth = 12, num_heads = 3}' --set pretrain.decoder_dim=64 --steps 200 --out runs/mae
        """
        overrides = _common(arch, img_size, patch_size, data_src, num_workers, epochs, steps, batch_size, blr,
                            warmup_epochs, seed, cpu)
        overrides.update({"pretrain.mask_ratio": mask_ratio, "pretrain.decoder_dim": decoder_dim,
                          "pretrain.decoder_depth": decoder_depth, "pretrain.decoder_heads": decoder_heads,
                          "pretrain.norm_pix_loss": norm_pix_loss})
        _run("mae", out, recipe, resume, set_, print_config, model_kwargs, overrides)

    @sub.command("supervised")
    def supervised(
        out: Out = Path("runs/pretrain-sup"), recipe: Recipe = None, resume: Resume = None, set_: Set = None,
        print_config: PrintConfig = False, arch: Arch = None, img_size: ImgSize = None,
        patch_size: PatchSize = None, model_kwargs: ModelKwargs = None,
        smoothing: Annotated[float | None, typer.Option("--smoothing", help="Label smoothing (default: 0.1).",
                                                        rich_help_panel=OBJ, show_default=False)] = None,
        mixup: Annotated[float | None, typer.Option("--mixup", help="Mixup alpha, 0 = off (default: 0.8).",
                                                    rich_help_panel=OBJ, show_default=False)] = None,
        cutmix: Annotated[float | None, typer.Option("--cutmix", help="CutMix alpha, 0 = off (default: 1.0).",
                                                     rich_help_panel=OBJ, show_default=False)] = None,
        auto_augment: Annotated[str | None, typer.Option("--auto-augment", help="timm RandAugment spec or 'none' "
                                                         "(default: rand-m9-mstd0.5-inc1).", rich_help_panel=OBJ,
                                                         show_default=False)] = None,
        reprob: Annotated[float | None, typer.Option("--reprob", help="Random erasing probability (default: "
                                                     "0.25).", rich_help_panel=OBJ, show_default=False)] = None,
        num_classes: Annotated[int | None, typer.Option("--num-classes", help="Classes (default: from the data).",
                                                        rich_help_panel=OBJ, show_default=False)] = None,
        data_src: DataSrc = None, num_workers: Workers = None, epochs: Epochs = None, steps: Steps = None,
        batch_size: Batch = None, blr: Blr = None, warmup_epochs: Warmup = None, seed: Seed = None, cpu: Cpu = None,
    ) -> None:
        """Supervised (DeiT-style): cross-entropy, label smoothing, RandAugment, Mixup/CutMix.

        Exports the encoder without its head (a feature teacher; hd finetune adds a fresh head).
        """
        overrides = _common(arch, img_size, patch_size, data_src, num_workers, epochs, steps, batch_size, blr,
                            warmup_epochs, seed, cpu)
        overrides.update({"pretrain.smoothing": smoothing, "pretrain.mixup": mixup, "pretrain.cutmix": cutmix,
                          "pretrain.auto_augment": auto_augment, "pretrain.reprob": reprob,
                          "pretrain.num_classes": num_classes})
        _run("supervised", out, recipe, resume, set_, print_config, model_kwargs, overrides)
