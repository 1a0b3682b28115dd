"""``hd distill``: load the config (defaults <- recipe <- flags), build the distill task, run the engine.

Runs as is on the CPU or one GPU, and on many with ``accelerate launch -m hdcli distill ...`` or
``torchrun --nproc_per_node N -m hdcli distill ...`` (docs/distributed.md).
"""

from __future__ import annotations

import typer

from hdcli.commands.options import (
    CHECKPOINTS,
    DATA,
    DATA_OPTS,
    DATA_SOURCE,
    EVAL,
    METHOD,
    MODEL,
    TRAIN,
    Opt,
    run_options,
    with_options,
)
from hdcli.config import DistillConfig

OPTIONS = (
    *run_options("runs/distill", recipe_help="TOML recipe (recipes/distill/*.toml); lists only what differs from "
                 "the paper's defaults."),
    Opt("distill.teachers", ("--teachers",), "Comma-separated, MIM teacher first (relations + masking), then one "
        "or more feature teachers: registry names (mae, clip, dinov3, siglip2, ...), timm tags, local-dir:PATH, or "
        "random:ARCH[@SEED] (smoke runs, benchmarks) (default: {default}).", MODEL),
    Opt("student.arch", ("--student",), "Student timm architecture.", MODEL, name="student"),
    Opt("distill.students", ("--students",), "Several students from one teacher pass, comma-separated timm archs "
        "(each as a run of its own with --student; [[distill.students]] in a recipe sets their own lr, kwargs, ...; "
        "docs/scale.md).", MODEL),
    Opt("data.img_size", ("--img-size",), "Input resolution.", MODEL, int),
    Opt("student.patch_size", ("--patch-size",), "Student patch size (tiny runs) (default: the architecture's).",
        MODEL, int),
    Opt("student.drop_path", ("--drop-path",), "Student drop path.", MODEL, float),
    Opt("student.init", ("--student-init",), "random | a pretrained model of the student's architecture whose "
        "weights it starts from: local-dir:DIR, a run dir, a registry name or hub tag.", MODEL),
    Opt("student.freeze_blocks", ("--freeze-blocks",), "Keep the student's embeddings and first N blocks as "
        "initialised (student.freeze: name patterns).", MODEL, int),
    Opt("distill.relation_blocks", ("--relation-blocks",), "MIM-teacher blocks whose q·kᵀ relations are distilled, "
        "0-based.", METHOD),
    Opt("distill.mask_blocks", ("--mask-blocks",), "Blocks entering which a masking step runs.", METHOD),
    Opt("distill.drop_ratio", ("--drop-ratio",), "Fraction of kept tokens dropped per masking step, in [0, 1).",
        METHOD, float),
    Opt("distill.masking", ("--masking",), "progressive | direct | random | none.", METHOD),
    Opt("distill.alpha", ("--alpha",), "Weight of the relation loss.", METHOD, float),
    Opt("distill.relation_heads", ("--relation-heads",), "match | mean (average relations over heads).", METHOD),
    Opt("distill.teacher_drop", ("--teacher-drop",), "UNIC's teacher dropping: per image, each feature target's "
        "loss is dropped with this probability (never the image's highest); 0: off (the paper).", METHOD, float),
    Opt("distill.targets_cache", ("--targets-cache",), "Train from a target cache written by hd cache-targets for "
        "this recipe and data: no teacher is loaded or run (docs/scale.md).", METHOD),
    Opt("distill.teacher_dtype", ("--teacher-dtype",), "auto (bf16 on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16: "
        "the teachers' weights and compute, whatever --mixed-precision says.", METHOD),
    Opt("distill.teacher_mean", ("--teacher-mean",), "R,G,B input mean of the teachers that state none (a py: "
        "callable, an hf: directory without its image processor); with --teacher-std.", METHOD),
    Opt("distill.teacher_std", ("--teacher-std",), "R,G,B input std of those teachers; with --teacher-mean.", METHOD),
    Opt("distill.target_norm", ("--target-norm",), "layernorm (the paper) | standardize (running per-channel) | "
        "standardize_roles (the same, the CLS/summary token apart: UNIC) | phis (PHI-S, AM-RADIO): how feature "
        "targets are normalised.", METHOD),
    DATA_SOURCE, *DATA_OPTS,
    Opt("data.decode", ("--decode",), "auto (gpu on CUDA, else cpu) | cpu | pil (the reference) | gpu: who decodes "
        "and crops the JPEGs (docs/data.md).", DATA),
    *TRAIN, *CHECKPOINTS,
    Opt("eval.every", ("--eval-every",), "Steps between k-NN evaluations of the student (0: off) (default: every "
        "epoch; off in --steps runs).", EVAL, int),
    Opt("eval.data", ("--eval-data",), "Source of the k-NN eval set, anything --data takes (default: --data; "
        "queries from its val split, or held-out train images).", EVAL),
    Opt("eval.samples", ("--eval-samples",), "BANK[,QUERIES] images of the k-NN eval set (default: min(10000, "
        "N/10) and min(5000, N/20) of N train images).", EVAL),
    Opt("eval.signals", ("--signals/--no-signals",), "Per-target loss, gradient share, cosine and attention "
        "agreement on logged steps.", EVAL, bool),
)


def register(app: typer.Typer) -> None:
    @app.command("distill")
    @with_options(DistillConfig, *OPTIONS)
    def distill(overrides: dict, recipe, out, resume, set_, print_config, allow_config_change) -> None:
        """Distil a ViT student from a MIM teacher's relations and a feature teacher's features.

        With no --data it trains on the built-in demo digits. Example (CPU, about a minute):
        hd distill --recipe recipes/distill/tiny-cpu.toml --out runs/tiny
        """
        import functools

        from hdcli import config
        from hdcli.commands.training import run_training

        def train(cfg, out, **kw):
            from hdcli.tasks.distill import DistillTask
            from hdcli.train import engine

            return engine.train(lambda: DistillTask(cfg), cfg, out, **kw)

        run_training(functools.partial(config.load_config, config.DistillConfig), train, command="distill", out=out,
                     recipe=recipe, overrides=overrides, set_=set_, resume=resume, print_config=print_config,
                     allow_config_change=allow_config_change)
