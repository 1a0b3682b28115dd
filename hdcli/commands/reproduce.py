"""``hd reproduce table1|table2|ablations``: the paper's runs as one resumable chain (``make reproduce-*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RUN, DATA, HW, DOWN = "Run", "Data", "Hardware and estimates", "Downstream tools"


def register(app: typer.Typer) -> None:
    @app.command("reproduce")
    def reproduce(
        target: Annotated[str, typer.Argument(help="table1 (Tab. 1: IN-1k, COCO, ADE20K) | table2 (Tab. 2: "
                                              "CIFAR-100, Cars, iNat19) | ablations (Tab. 3-8: COCO) | figures "
                                              "(Fig. 1-3, Sec. 2: decoders, mask feature reconstruction, FD's "
                                              "student; head distance and NMI).", show_default=False)],
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Runs directory, one dir per run "
                                                 "(default: runs/paper; smoke: runs/paper-smoke).",
                                                 rich_help_panel=RUN, show_default=False)] = None,
        scale: Annotated[str, typer.Option("--scale", help="full (the paper's models and data) | smoke (the same "
                                           "chain with tiny models on the demo digits, CPU, about a minute).",
                                           rich_help_panel=RUN)] = "full",
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (every command, estimated "
                                              "GPU-hours, what is done) and run nothing.",
                                              rich_help_panel=RUN)] = False,
        only: Annotated[str | None, typer.Option("--only", help="Comma-separated run names (the plan's ## "
                                                 "headings) to do, e.g. hybrid-mae-clip-vitb.",
                                                 rich_help_panel=RUN, show_default=False)] = None,
        data_in1k: Annotated[str | None, typer.Option("--data-in1k", help="ImageNet-1k: WebDataset shard dir "
                                                      "(train-*.tar + val-*.tar, `hd data shards`) or image folder "
                                                      "(train/, val/).", rich_help_panel=DATA,
                                                      show_default=False)] = None,
        data_in21k: Annotated[str | None, typer.Option("--data-in21k", help="ImageNet-21k shards (ViT-L "
                                                       "distillation).", rich_help_panel=DATA,
                                                       show_default=False)] = None,
        data_cifar: Annotated[str | None, typer.Option("--data-cifar", help="Folder holding cifar-100-python/ "
                                                       "or its .tar.gz.", rich_help_panel=DATA,
                                                       show_default=False)] = None,
        data_cars: Annotated[str | None, typer.Option("--data-cars", help="Stanford Cars: image folder with "
                                                      "train/ and val/ (or test/) class folders, or shards.",
                                                      rich_help_panel=DATA, show_default=False)] = None,
        data_inat: Annotated[str | None, typer.Option("--data-inat", help="iNaturalist 2019: image folder with "
                                                      "train/ and val/ class folders, or shards.",
                                                      rich_help_panel=DATA, show_default=False)] = None,
        mae_in100: Annotated[str | None, typer.Option("--mae-in100", help="Tab. 4 ⋆: directory of an MAE ViT-B "
                                                      "pretrained on ImageNet-100 (config.json + "
                                                      "model.safetensors); the row is skipped without it.",
                                                      rich_help_panel=DATA, show_default=False)] = None,
        gpus: Annotated[int | None, typer.Option("--gpus", help="GPUs per node (default: the visible ones, "
                                                 "else 8 for the plan).", rich_help_panel=HW,
                                                 show_default=False)] = None,
        nodes: Annotated[int, typer.Option("--nodes", help="Nodes; > 1 runs each training stage with srun "
                                           "inside a SLURM allocation.", rich_help_panel=HW)] = 1,
        bench: Annotated[Path | None, typer.Option("--bench", help="Output of `hd bench distill --json` on your "
                                                   "GPU: its achieved TFLOP/s turn FLOPs into GPU-hours.",
                                                   rich_help_panel=HW, show_default=False)] = None,
        tflops: Annotated[float | None, typer.Option("--tflops", help="Achieved TFLOP/s per GPU for the "
                                                     "estimate (overrides --bench).", rich_help_panel=HW,
                                                     show_default=False)] = None,
        detectron2_dir: Annotated[str | None, typer.Option("--detectron2-dir", help="detectron2 checkout (with "
                                                           "detectron2 installed): runs COCO ViTDet.",
                                                           rich_help_panel=DOWN, show_default=False)] = None,
        mmseg_dir: Annotated[str | None, typer.Option("--mmseg-dir", help="mmsegmentation checkout (with mmseg "
                                                      "installed): runs ADE20K UperNet.", rich_help_panel=DOWN,
                                                      show_default=False)] = None,
    ) -> None:
        """Run the paper's experiments for one table: distill -> fine-tune -> export (-> COCO / ADE20K where
        detectron2 / mmseg are installed) -> `hd report`; for the figures: distill -> `hd analyze` (head distance,
        NMI) -> `hd report figures`. Finished stages are skipped, unfinished ones resume.

        Usually through make: make reproduce-table1 DATA_IN1K=/data/in1k-wds [GPUS=8 NODES=1 OUT=runs/paper],
        DRY_RUN=1 to print the plan, SCALE=smoke for the tiny CPU run (docs/reproduce.md).
        """
        from hdcli import ui
        from hdcli.paper import execute as run
        from hdcli.paper import reproduce as rp

        p = rp.plan(target, out=out, scale=scale, gpus=gpus, nodes=nodes,
                    data={"in1k": data_in1k, "in21k": data_in21k, "cifar100": data_cifar, "cars": data_cars,
                          "inat19": data_inat},
                    only=[r.strip() for r in only.split(",") if r.strip()] if only else None,
                    mae_in100=mae_in100, detectron2_dir=detectron2_dir, mmseg_dir=mmseg_dir,
                    bench=str(bench) if bench else None, tflops=tflops)
        if dry_run:
            ui.stdout.print(run.format_plan(p), end="", markup=False, highlight=False, soft_wrap=True)
            return
        from hdcli.commands import run_in_process

        counts = run.execute(p, run_hd=run_in_process if p.scale == "smoke" else None)
        ui.info(f"[green]{target} done[/]: {counts['ran']} stage(s) ran, {counts['done']} already done, "
                f"{counts['skipped']} not run; report in {p.report}")
