"""``hd distill``: load the config (defaults <- recipe <- flags), build the distill task, run the engine.

Runs as is on the CPU or one GPU, and on many with ``accelerate launch -m hdcli distill ...`` or
``torchrun --nproc_per_node N -m hdcli distill ...`` (docs/distributed.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RUN, MODEL, METHOD, DATA, TRAIN, CKPT = "Run", "Models", "Method", "Data", "Training", "Checkpoints and logs"


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def distill(
        recipe: Annotated[Path | None, typer.Option("--recipe", help="TOML recipe (recipes/distill/*.toml); lists "
                                                    "only what differs from the paper's defaults.",
                                                    rich_help_panel=RUN, show_default=False)] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: config.toml, metrics.jsonl, "
                                          "checkpoints/, student/.", rich_help_panel=RUN)] = Path("runs/distill"),
        resume: Annotated[str | None, typer.Option("--resume", help="'auto' (newest complete checkpoint in --out; "
                                                   "the run's config.toml is the base config) or a checkpoint path.",
                                                   rich_help_panel=RUN, show_default=False)] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Any config key, TOML value: "
                                                       "--set optim.min_lr=1e-6 (repeatable).", metavar="KEY=VALUE",
                                                       rich_help_panel=RUN, show_default=False)] = None,
        print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config (TOML) to "
                                                   "stdout and exit.", rich_help_panel=RUN)] = False,
        teachers: Annotated[str | None, typer.Option("--teachers", help="Comma-separated, MIM teacher first: "
                                                     "registry names (mae, clip, deit, ...), timm tags, "
                                                     "local-dir:PATH, or random:ARCH (smoke runs).",
                                                     rich_help_panel=MODEL, show_default=False)] = None,
        student: Annotated[str | None, typer.Option("--student", help="Student timm architecture "
                                                    "(default: vit_base_patch16_224).",
                                                    rich_help_panel=MODEL, show_default=False)] = None,
        img_size: Annotated[int | None, typer.Option("--img-size", help="Input resolution (default: 224).",
                                                     rich_help_panel=MODEL, show_default=False)] = None,
        patch_size: Annotated[int | None, typer.Option("--patch-size", help="Student patch size (tiny runs) "
                                                       "(default: the architecture's).",
                                                       rich_help_panel=MODEL, show_default=False)] = None,
        drop_path: Annotated[float | None, typer.Option("--drop-path", help="Student drop path (default: 0.2).",
                                                        rich_help_panel=MODEL, show_default=False)] = None,
        relation_blocks: Annotated[str | None, typer.Option("--relation-blocks", help="MIM-teacher blocks whose "
                                                            "q·kᵀ relations are distilled, 0-based (default: 9,10).",
                                                            rich_help_panel=METHOD, show_default=False)] = None,
        mask_blocks: Annotated[str | None, typer.Option("--mask-blocks", help="Blocks entering which a masking "
                                                        "step runs (default: 0,4,8).",
                                                        rich_help_panel=METHOD, show_default=False)] = None,
        drop_ratio: Annotated[float | None, typer.Option("--drop-ratio", help="Fraction of kept tokens dropped per "
                                                         "masking step, in [0, 1) (default: 0.3).",
                                                         rich_help_panel=METHOD, show_default=False)] = None,
        masking: Annotated[str | None, typer.Option("--masking", help="progressive | direct | random | none "
                                                    "(default: progressive).",
                                                    rich_help_panel=METHOD, show_default=False)] = None,
        alpha: Annotated[float | None, typer.Option("--alpha", help="Weight of the relation loss (default: 1.0).",
                                                    rich_help_panel=METHOD, show_default=False)] = None,
        relation_heads: Annotated[str | None, typer.Option("--relation-heads", help="match | mean (average "
                                                           "relations over heads) (default: match).",
                                                           rich_help_panel=METHOD, show_default=False)] = None,
        data_src: Annotated[str | None, typer.Option("--data", help="demo (default), fashion-mnist[:DIR], "
                                                     "cifar100:DIR, an image folder, or WebDataset shards "
                                                     "(DIR or DIR/train-{000000..000099}.tar).",
                                                     rich_help_panel=DATA, show_default=False)] = None,
        num_workers: Annotated[int | None, typer.Option("--num-workers", help="Data loader processes per rank "
                                                        "(default: min(8, CPUs per rank − 1)).",
                                                        rich_help_panel=DATA, show_default=False)] = None,
        epoch_steps: Annotated[int | None, typer.Option("--epoch-steps", help="Batches per epoch per rank "
                                                        "(default: one pass over the data).",
                                                        rich_help_panel=DATA, show_default=False)] = None,
        max_bad_fraction: Annotated[float | None, typer.Option("--max-bad-fraction", help="Unreadable images "
                                                               "tolerated per epoch (default: 0.001).",
                                                               rich_help_panel=DATA, show_default=False)] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs (default: 300).",
                                                   rich_help_panel=TRAIN, show_default=False)] = None,
        steps: Annotated[int | None, typer.Option("--steps", help="Total optimiser steps (overrides --epochs).",
                                                  rich_help_panel=TRAIN, show_default=False)] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Batch per device (per "
                                                       "process) (default: 128).",
                                                       rich_help_panel=TRAIN, show_default=False)] = None,
        accum_steps: Annotated[int | None, typer.Option("--accum-steps", help="Gradient accumulation "
                                                        "micro-batches per step (default: 1).",
                                                        rich_help_panel=TRAIN, show_default=False)] = None,
        blr: Annotated[float | None, typer.Option("--blr", help="Base lr: lr = blr × global batch / 256 "
                                                  "(default: 1.5e-4).",
                                                  rich_help_panel=TRAIN, show_default=False)] = None,
        lr: Annotated[float | None, typer.Option("--lr", help="Absolute lr (overrides --blr).",
                                                 rich_help_panel=TRAIN, show_default=False)] = None,
        warmup_epochs: Annotated[float | None, typer.Option("--warmup-epochs", help="Linear warm-up "
                                                            "(default: 40).",
                                                            rich_help_panel=TRAIN, show_default=False)] = None,
        mixed_precision: Annotated[str | None, typer.Option("--mixed-precision", help="auto | no | bf16 | fp16 "
                                                            "(default: auto = bf16 on a GPU, no on the CPU).",
                                                            rich_help_panel=TRAIN, show_default=False)] = None,
        seed: Annotated[int | None, typer.Option("--seed", help="Seed of weights, data order, augmentation "
                                                 "(default: 0).", rich_help_panel=TRAIN, show_default=False)] = None,
        compile_: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the "
                                                      "trainable module (default: no).",
                                                      rich_help_panel=TRAIN, show_default=False)] = None,
        cpu: Annotated[bool | None, typer.Option("--cpu", help="Use the CPU even where a GPU is visible.",
                                                 rich_help_panel=TRAIN, show_default=False)] = None,
        save_every: Annotated[int | None, typer.Option("--save-every", help="Steps between checkpoints "
                                                       "(default: 1000).",
                                                       rich_help_panel=CKPT, show_default=False)] = None,
        keep_checkpoints: Annotated[int | None, typer.Option("--keep-checkpoints", help="Newest checkpoints "
                                                             "kept (default: 2).",
                                                             rich_help_panel=CKPT, show_default=False)] = None,
        log_every: Annotated[int | None, typer.Option("--log-every", help="Steps between metrics lines "
                                                      "(default: 50).",
                                                      rich_help_panel=CKPT, show_default=False)] = None,
        nan_tolerance: Annotated[int | None, typer.Option("--nan-tolerance", help="Consecutive non-finite steps "
                                                          "skipped before the run stops (default: 10).",
                                                          rich_help_panel=CKPT, show_default=False)] = None,
        tensorboard: Annotated[bool | None, typer.Option("--tensorboard", help="Also log to <out>/tensorboard.",
                                                         rich_help_panel=CKPT, show_default=False)] = None,
    ) -> None:
        """Distil a ViT student from a MIM teacher's relations and a feature teacher's features.

        With no --data it trains on the built-in demo digits. Example (CPU, about a minute):
        hd distill --recipe recipes/distill/tiny-cpu.toml --out runs/tiny
        """
        import functools

        from hdcli import config
        from hdcli.commands.training import exit_if_interrupted, resolve_config

        overrides = {
            "distill.teachers": _split(teachers), "student.arch": student, "data.img_size": img_size,
            "student.patch_size": patch_size, "student.drop_path": drop_path,
            "distill.relation_blocks": relation_blocks, "distill.mask_blocks": mask_blocks,
            "distill.drop_ratio": drop_ratio, "distill.masking": masking, "distill.alpha": alpha,
            "distill.relation_heads": relation_heads, "data.source": data_src, "data.num_workers": num_workers,
            "data.epoch_steps": epoch_steps, "data.max_bad_fraction": max_bad_fraction, "train.epochs": epochs,
            "train.steps": steps, "train.batch_size": batch_size, "train.accum_steps": accum_steps,
            "optim.blr": blr, "optim.lr": lr, "optim.warmup_epochs": warmup_epochs,
            "train.mixed_precision": mixed_precision, "train.seed": seed, "train.compile": compile_,
            "train.cpu": cpu, "train.save_every": save_every, "train.keep_checkpoints": keep_checkpoints,
            "train.log_every": log_every, "train.nan_tolerance": nan_tolerance, "train.tensorboard": tensorboard,
        }
        cfg = resolve_config(functools.partial(config.load_config, config.DistillConfig), out, recipe=recipe,
                             overrides=overrides, set_=set_, resume=resume, print_config=print_config)
        if cfg is None:
            return

        from hdcli.tasks.distill import DistillTask
        from hdcli.train import engine

        result = engine.train(lambda: DistillTask(cfg), cfg, out, resume=resume,
                              resume_hint=f"hd distill --out {out} --resume auto")
        exit_if_interrupted(result)
