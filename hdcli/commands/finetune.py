"""``hd finetune``: fine-tune (or linear-probe) a student on a classification set with MAE's recipe.

Config layers: defaults (MAE ViT-B) <- linear-probe defaults (with --linear-probe) <- recipe <- flags.
Runs on the CPU, one GPU, or many with ``accelerate launch -m hdcli finetune ...`` (docs/distributed.md).
"""

from __future__ import annotations

from typing import Annotated

import typer

from hdcli.commands.options import (
    AUG,
    CHECKPOINTS,
    DATA,
    DATA_OPTS,
    MODEL,
    RUN,
    TRAIN,
    Opt,
    noted,
    run_options,
    with_options,
)
from hdcli.config import FT_DATASETS, FinetuneConfig

OPTIONS = (
    *run_options("runs/finetune", out_help="Run directory: config.toml, metrics.jsonl, results.json, checkpoints/, "
                 "student/ (the fine-tuned model).", recipe_help="TOML recipe (recipes/finetune/*.toml).",
                 set_example='finetune.mixup_mode="pair"'),
    Opt("finetune.student", ("--student", "-s"), "The model to fine-tune: a distill run dir, its student/ dir, "
        "local-dir:PATH, a registry name (mae, clip, deit) or a timm tag.", RUN, name="student"),
    Opt("data.source", ("--data-dir", "-d"), "cifar100: the folder holding cifar-100-python/ or its .tar.gz; "
        "others: an image folder (train/ + val/ or test/ class folders) or WebDataset shards.", RUN,
        name="data_dir"),
    Opt("finetune.linear_probe", ("--linear-probe/--full",), "Linear probing: frozen backbone, BatchNorm + linear "
        "head, MAE's protocol (default: full fine-tuning).", MODEL, bool),
    Opt("finetune.num_classes", ("--num-classes",), "Classes (default: from the data).", MODEL, int),
    Opt("finetune.global_pool", ("--global-pool",), "avg (+fc_norm) | token | map (attention pool, as SigLIP) "
        "(default: {default}; token when linear probing; avg for students without a class token).", MODEL),
    Opt("finetune.drop_path", ("--drop-path",), "Drop path rate (default: {default}; 0 when linear probing).",
        MODEL, float),
    Opt("data.img_size", ("--img-size",), "Input resolution; CIFAR is upsampled.", DATA, int),
    Opt("finetune.eval_data", ("--eval-data",), "Evaluation data (default: the --eval-split of --data-dir).", DATA),
    Opt("finetune.eval_split", ("--eval-split",), "val | test | train (default: {default}; CIFAR-100's test set).",
        DATA),
    Opt("finetune.crop_pct", ("--crop-pct",), "Eval: resize to img/crop_pct, centre crop (default: 1.0 for "
        "cifar100, else 0.875).", DATA, float),
    *DATA_OPTS,
    Opt("finetune.mixup", ("--mixup",), "Mixup alpha, 0 = off.", AUG, float),
    Opt("finetune.cutmix", ("--cutmix",), "CutMix alpha, 0 = off.", AUG, float),
    Opt("finetune.smoothing", ("--smoothing",), "Label smoothing.", AUG, float),
    Opt("finetune.auto_augment", ("--aa",), "timm RandAugment spec, 'none' = off.", AUG, name="auto_augment"),
    Opt("finetune.reprob", ("--reprob",), "Random erasing probability, pixel mode.", AUG, float),
    Opt("finetune.layer_decay", ("--layer-decay",), "Layer-wise lr decay, 1 = off.", "Training", float),
    *noted(TRAIN, epochs="90 linear probing", blr="1e-3 linear probing", weight_decay="0 linear probing",
           warmup_epochs="10 linear probing"),
    *CHECKPOINTS,
)


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @with_options(FinetuneConfig, *OPTIONS)
    def finetune(
        overrides: dict,
        dataset: Annotated[str | None, typer.Argument(help=f"{' | '.join(FT_DATASETS)} (may come from --recipe).",
                                                      show_default=False)] = None,
        recipe=None, out=None, resume=None, set_=None, print_config=False, allow_config_change=False,
    ) -> None:
        """Fine-tune a student for classification and report top-1/top-5 after every epoch.

        MAE's recipe (layer decay, Mixup/CutMix, RandAugment, random erasing, global average pooling)
        from timm; --linear-probe trains only a BatchNorm + linear head. Results: <out>/results.json.
        Example: hd finetune cifar100 --data-dir ~/data --student runs/distill --out runs/ft-cifar
        """
        from hdcli import ui
        from hdcli.commands.training import run_training
        from hdcli.rundir import RESULTS
        from hdcli.tasks import finetune as ft

        result = run_training(ft.load_config, ft.finetune, command="finetune", out=out, recipe=recipe,
                              overrides={**overrides, "finetune.dataset": dataset}, set_=set_, resume=resume,
                              print_config=print_config, allow_config_change=allow_config_change)
        if result is None:
            return
        res = result["results"]
        if res and ui.is_main_process():
            ui.info(f"{res['dataset']}: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% after {res['epochs']} "
                    f"epoch(s) (best top-1 {res['best_top1']:.2f}% at epoch {res['best_epoch']}); "
                    f"{out / RESULTS}")
