"""The downstream stages of ``hd reproduce``: COCO detection with detectron2's ViTDet and ADE20K segmentation
with mmseg's UperNet, run from their own checkouts on ``hd export``'s files (docs/downstream.md), with their
GPU-hour lower bounds and the readers that record their results for ``hd report``."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hdcli.paper import report
from hdcli.tools import flops

# Downstream schedules of the configs in docs/downstream.md (for the GPU-hour estimate).
COCO_IMAGES = 184_375 * 64  # ViTDet mask_rcnn_vitdet_*_100ep: max_iter x total_batch_size
COCO_SIZE, COCO_WINDOW = 1024, 14  # LSJ 1024 crops; window attention 14x14 except 4 global blocks
ADE_IMAGES = 160_000 * 16  # mmseg 160k schedule, 8 GPUs x 2 images
ADE_SIZE = 512


@dataclass
class Stage:
    """A downstream stage: its command, the file it leaves when done, the GPU-hour estimate, a note on it, why
    it cannot run here ("" when it can), and what records its result afterwards."""

    argv: list[str]
    done: Path
    gpu_hours: float | None
    note: str
    why: str
    after: Callable[[], None]


def _tool(module: str, checkout: str | None, script: str, env: str) -> tuple[Path | None, str]:
    """The checkout of an external tool if it can run here, else (None, why not)."""
    if importlib.util.find_spec(module) is None:
        return None, f"not run: {module} is not installed (set {env}=CHECKOUT with it installed to run it)"
    if not checkout:
        return None, f"not run: {env} (the {module} checkout holding {script}) is not set"
    root = Path(checkout).expanduser()
    if not (root / script).is_file():
        return None, f"not run: {root / script} not found ({env} must be a {module} checkout)"
    return root, ""


def stage(task: str, run_dir: Path, cfg, student, gpus: int, tflops: float, *, smoke: bool,
          detectron2_dir: str | None, mmseg_dir: str | None) -> Stage:
    """The ``coco`` (detectron2 ViTDet) or ``ade20k`` (mmseg UperNet) stage of one run of the plan."""
    large = "large" in cfg.student.arch
    if task == "coco":
        root, why = _tool("detectron2", detectron2_dir, "tools/lazyconfig_train_net.py", "DETECTRON2_DIR")
        base = root or Path("$DETECTRON2_DIR")
        cfg_file = base / f"projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{'l' if large else 'b'}_100ep.py"
        work = run_dir / "coco"
        argv = ["python", str(base / "tools/lazyconfig_train_net.py"), "--config-file", str(cfg_file),
                "--num-gpus", str(gpus), "--resume",
                f"train.init_checkpoint={(run_dir / 'export' / 'detectron2.pth').resolve()}",
                f"train.output_dir={work.resolve()}"]
        done = run_dir / report.COCO

        def after() -> None:
            r = report.read_detectron2(work / "metrics.json")
            report.record(run_dir, box_ap=r["box_ap"], mask_ap=r.get("mask_ap"), source=f"detectron2 {work}")

        est = None if smoke else flops.gpu_hours(flops.vitdet(student, COCO_SIZE, COCO_WINDOW) * COCO_IMAGES, tflops)
        note = "LOWER BOUND: backbone FLOPs only (FPN, RPN and Mask R-CNN heads add more)"
    else:
        root, why = _tool("mmseg", mmseg_dir, "tools/dist_train.sh", "MMSEG_DIR")
        base = root or Path("$MMSEG_DIR")
        work = run_dir / "ade20k"
        argv = ["bash", str(base / "tools/dist_train.sh"),
                str(base / "configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"), str(gpus),
                "--work-dir", str(work.resolve()), "--resume", "--cfg-options",
                f"model.pretrained={(run_dir / 'export' / 'mmseg.pth').resolve()}"]
        if large:  # mmseg ships the MAE UperNet config for ViT-B only (docs/downstream.md, other shapes)
            argv += ["model.backbone.embed_dims=1024", "model.backbone.num_layers=24", "model.backbone.num_heads=16",
                     "model.backbone.out_indices=[7,11,15,23]", "model.neck.embed_dim=1024",
                     "model.decode_head.in_channels=[1024,1024,1024,1024]", "model.auxiliary_head.in_channels=1024",
                     "optim_wrapper.paramwise_cfg.num_layers=24"]
        done = run_dir / report.ADE20K

        def after() -> None:
            report.record(run_dir, miou=report.read_mmseg(work), source=f"mmseg {work}")

        est = None
        if not smoke:
            grid = ADE_SIZE // flops.patch_of(student)
            est = flops.gpu_hours(flops.classifier_step(student, grid * grid) * ADE_IMAGES, tflops)
        note = "LOWER BOUND: backbone FLOPs only (UperNet's 768-channel head costs several times the backbone)"
    if smoke:
        why = "not run: SCALE=smoke trains no detector/segmenter"
    return Stage(argv, done, est, note, why, after)
