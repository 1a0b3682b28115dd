"""``hd finetune``: fine-tune (or linear-probe) a student on a classification set with MAE's recipe.

Config layers: defaults (MAE ViT-B) <- linear-probe defaults (with --linear-probe) <- recipe <- flags.
Runs on the CPU, one GPU, or many with ``accelerate launch -m hdcli finetune ...`` (docs/distributed.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RUN, MODEL, DATA, AUG, TRAIN, CKPT = "Run", "Model", "Data", "Augmentation", "Training", "Checkpoints and logs"
DATASETS = "cifar100 | imagenet | cars | inat19 | folder | demo | fashion-mnist"


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        dataset: Annotated[str | None, typer.Argument(help=f"{DATASETS} (may come from --recipe).",
                                                      show_default=False)] = None,
        student: Annotated[str | None, typer.Option("--student", "-s", help="The model to fine-tune: a distill run "
                                                    "dir, its student/ dir, local-dir:PATH, a registry name (mae, "
                                                    "clip, deit) or a timm tag.", rich_help_panel=RUN,
                                                    show_default=False)] = None,
        data_dir: Annotated[str | None, typer.Option("--data-dir", "-d", help="cifar100: the folder holding "
                                                     "cifar-100-python/ or its .tar.gz; others: an image folder "
                                                     "(train/ + val/ or test/ class folders) or WebDataset shards.",
                                                     rich_help_panel=RUN, show_default=False)] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: config.toml, metrics.jsonl, "
                                          "results.json, checkpoints/, student/ (the fine-tuned model).",
                                          rich_help_panel=RUN)] = Path("runs/finetune"),
        recipe: Annotated[Path | None, typer.Option("--recipe", help="TOML recipe (recipes/finetune/*.toml).",
                                                    rich_help_panel=RUN, show_default=False)] = None,
        resume: Annotated[str | None, typer.Option("--resume", help="'auto' (newest complete checkpoint in --out; "
                                                   "the run's config.toml is the base config) or a checkpoint path.",
                                                   rich_help_panel=RUN, show_default=False)] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Any config key, TOML value: "
                                                       "--set finetune.mixup_mode=\"pair\" (repeatable).",
                                                       metavar="KEY=VALUE", rich_help_panel=RUN,
                                                       show_default=False)] = None,
        print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config (TOML) to "
                                                   "stdout and exit.", rich_help_panel=RUN)] = False,
        linear_probe: Annotated[bool | None, typer.Option("--linear-probe/--full", help="Linear probing: frozen "
                                                          "backbone, BatchNorm + linear head, MAE's protocol "
                                                          "(default: full fine-tuning).", rich_help_panel=MODEL,
                                                          show_default=False)] = None,
        num_classes: Annotated[int | None, typer.Option("--num-classes", help="Classes (default: from the data).",
                                                        rich_help_panel=MODEL, show_default=False)] = None,
        global_pool: Annotated[str | None, typer.Option("--global-pool", help="avg (+fc_norm) | token "
                                                        "(default: avg; token when linear probing).",
                                                        rich_help_panel=MODEL, show_default=False)] = None,
        drop_path: Annotated[float | None, typer.Option("--drop-path", help="Drop path rate (default: 0.1; 0 when "
                                                        "linear probing).", rich_help_panel=MODEL,
                                                        show_default=False)] = None,
        img_size: Annotated[int | None, typer.Option("--img-size", help="Input resolution; CIFAR is upsampled "
                                                     "(default: 224).", rich_help_panel=DATA,
                                                     show_default=False)] = None,
        eval_data: Annotated[str | None, typer.Option("--eval-data", help="Evaluation data (default: the "
                                                      "--eval-split of --data-dir).", rich_help_panel=DATA,
                                                      show_default=False)] = None,
        eval_split: Annotated[str | None, typer.Option("--eval-split", help="val | test | train (default: val; "
                                                       "CIFAR-100's test set).", rich_help_panel=DATA,
                                                       show_default=False)] = None,
        crop_pct: Annotated[float | None, typer.Option("--crop-pct", help="Eval: resize to img/crop_pct, centre "
                                                       "crop (default: 1.0 for cifar100, else 0.875).",
                                                       rich_help_panel=DATA, show_default=False)] = None,
        num_workers: Annotated[int | None, typer.Option("--num-workers", help="Data loader processes per rank "
                                                        "(default: min(8, CPUs per rank − 1)).",
                                                        rich_help_panel=DATA, show_default=False)] = None,
        epoch_steps: Annotated[int | None, typer.Option("--epoch-steps", help="Batches per epoch per rank "
                                                        "(default: one pass over the data).",
                                                        rich_help_panel=DATA, show_default=False)] = None,
        mixup: Annotated[float | None, typer.Option("--mixup", help="Mixup alpha, 0 = off (default: 0.8).",
                                                    rich_help_panel=AUG, show_default=False)] = None,
        cutmix: Annotated[float | None, typer.Option("--cutmix", help="CutMix alpha, 0 = off (default: 1.0).",
                                                     rich_help_panel=AUG, show_default=False)] = None,
        smoothing: Annotated[float | None, typer.Option("--smoothing", help="Label smoothing (default: 0.1).",
                                                        rich_help_panel=AUG, show_default=False)] = None,
        auto_augment: Annotated[str | None, typer.Option("--aa", help="timm RandAugment spec, 'none' = off "
                                                         "(default: rand-m9-mstd0.5-inc1).", rich_help_panel=AUG,
                                                         show_default=False)] = None,
        reprob: Annotated[float | None, typer.Option("--reprob", help="Random erasing probability, pixel mode "
                                                     "(default: 0.25).", rich_help_panel=AUG,
                                                     show_default=False)] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs (default: 100; 90 linear probing).",
                                                   rich_help_panel=TRAIN, show_default=False)] = None,
        steps: Annotated[int | None, typer.Option("--steps", help="Total optimiser steps (overrides --epochs).",
                                                  rich_help_panel=TRAIN, show_default=False)] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Batch per device (per "
                                                       "process) (default: 128).", rich_help_panel=TRAIN,
                                                       show_default=False)] = None,
        accum_steps: Annotated[int | None, typer.Option("--accum-steps", help="Gradient accumulation "
                                                        "micro-batches per step (default: 1).",
                                                        rich_help_panel=TRAIN, show_default=False)] = None,
        blr: Annotated[float | None, typer.Option("--blr", help="Base lr: lr = blr × global batch / 256 "
                                                  "(default: 5e-4; 1e-3 linear probing).", rich_help_panel=TRAIN,
                                                  show_default=False)] = None,
        lr: Annotated[float | None, typer.Option("--lr", help="Absolute lr (overrides --blr).",
                                                 rich_help_panel=TRAIN, show_default=False)] = None,
        layer_decay: Annotated[float | None, typer.Option("--layer-decay", help="Layer-wise lr decay, 1 = off "
                                                          "(default: 0.65).", rich_help_panel=TRAIN,
                                                          show_default=False)] = None,
        weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="AdamW weight decay "
                                                           "(default: 0.05; 0 linear probing).",
                                                           rich_help_panel=TRAIN, show_default=False)] = None,
        warmup_epochs: Annotated[float | None, typer.Option("--warmup-epochs", help="Linear warm-up "
                                                            "(default: 5; 10 linear probing).",
                                                            rich_help_panel=TRAIN, show_default=False)] = None,
        min_lr: Annotated[float | None, typer.Option("--min-lr", help="Cosine floor (default: 1e-6).",
                                                     rich_help_panel=TRAIN, show_default=False)] = None,
        mixed_precision: Annotated[str | None, typer.Option("--mixed-precision", help="auto | no | bf16 | fp16 "
                                                            "(default: auto = bf16 on a GPU, no on the CPU).",
                                                            rich_help_panel=TRAIN, show_default=False)] = None,
        seed: Annotated[int | None, typer.Option("--seed", help="Seed of the head, data order, augmentation "
                                                 "(default: 0).", rich_help_panel=TRAIN, show_default=False)] = None,
        compile_: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model "
                                                      "(default: no).", rich_help_panel=TRAIN,
                                                      show_default=False)] = None,
        cpu: Annotated[bool | None, typer.Option("--cpu", help="Use the CPU even where a GPU is visible.",
                                                 rich_help_panel=TRAIN, show_default=False)] = None,
        save_every: Annotated[int | None, typer.Option("--save-every", help="Steps between checkpoints "
                                                       "(default: 1000).", rich_help_panel=CKPT,
                                                       show_default=False)] = None,
        keep_checkpoints: Annotated[int | None, typer.Option("--keep-checkpoints", help="Newest checkpoints "
                                                             "kept (default: 2).", rich_help_panel=CKPT,
                                                             show_default=False)] = None,
        log_every: Annotated[int | None, typer.Option("--log-every", help="Steps between metrics lines "
                                                      "(default: 50).", rich_help_panel=CKPT,
                                                      show_default=False)] = None,
        tensorboard: Annotated[bool | None, typer.Option("--tensorboard", help="Also log to <out>/tensorboard.",
                                                         rich_help_panel=CKPT, show_default=False)] = None,
    ) -> None:
        """Fine-tune a student for classification and report top-1/top-5 after every epoch.

        MAE's recipe (layer decay, Mixup/CutMix, RandAugment, random erasing, global average pooling)
        from timm; --linear-probe trains only a BatchNorm + linear head. Results: <out>/results.json.
        Example: hd finetune cifar100 --data-dir ~/data --student runs/distill --out runs/ft-cifar
        """
        from hdcli import ui
        from hdcli.commands.training import exit_if_interrupted, resolve_config

        overrides = {
            "finetune.dataset": dataset, "finetune.student": student, "data.source": data_dir,
            "finetune.linear_probe": linear_probe, "finetune.num_classes": num_classes,
            "finetune.global_pool": global_pool, "finetune.drop_path": drop_path, "data.img_size": img_size,
            "finetune.eval_data": eval_data, "finetune.eval_split": eval_split, "finetune.crop_pct": crop_pct,
            "data.num_workers": num_workers, "data.epoch_steps": epoch_steps, "finetune.mixup": mixup,
            "finetune.cutmix": cutmix, "finetune.smoothing": smoothing, "finetune.auto_augment": auto_augment,
            "finetune.reprob": reprob, "train.epochs": epochs, "train.steps": steps,
            "train.batch_size": batch_size, "train.accum_steps": accum_steps, "optim.blr": blr, "optim.lr": lr,
            "finetune.layer_decay": layer_decay, "optim.weight_decay": weight_decay,
            "optim.warmup_epochs": warmup_epochs, "optim.min_lr": min_lr,
            "train.mixed_precision": mixed_precision, "train.seed": seed, "train.compile": compile_,
            "train.cpu": cpu, "train.save_every": save_every, "train.keep_checkpoints": keep_checkpoints,
            "train.log_every": log_every, "train.tensorboard": tensorboard,
        }
        from hdcli.tasks import finetune as ft

        cfg = resolve_config(ft.load_config, out, recipe=recipe, overrides=overrides, set_=set_, resume=resume,
                             print_config=print_config)
        if cfg is None:
            return
        result = ft.finetune(cfg, out, resume=resume, resume_hint=f"hd finetune --out {out} --resume auto")
        exit_if_interrupted(result)
        res = result["results"]
        if res and ui.is_main_process():
            ui.info(f"{res['dataset']}: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% after {res['epochs']} "
                    f"epoch(s) (best top-1 {res['best_top1']:.2f}% at epoch {res['best_epoch']}); "
                    f"{out / ft.RESULTS}")
