"""``hd export``: write a distilled student as a timm dir, a detectron2 ViTDet or an mmseg MAE checkpoint."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

SOURCE_PANEL = "Source"
OUTPUT_PANEL = "Output"


class Format(StrEnum):
    timm = "timm"
    detectron2 = "detectron2"
    mmseg = "mmseg"


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    student: Annotated[str, typer.Argument(
        help="The student: a run dir, its `student/` dir, `local-dir:PATH` (config.json + model.safetensors), "
        "or a teacher name / timm tag from the hub cache.", show_default=False)],
    fmt: Annotated[Format, typer.Option(
        "--format", "-f", help="timm: a directory loadable by timm.create_model('local-dir:DIR', "
        "pretrained=True). detectron2: a .pth with {'model': ...} in ViTDet's backbone.net.* names. "
        "mmseg: a .pth in mmseg's MAE backbone names (layers.*, ln1, ffn.layers.0.0, ...).",
        rich_help_panel=OUTPUT_PANEL, show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output: a directory for timm, a .pth file for detectron2 and mmseg.",
        rich_help_panel=OUTPUT_PANEL, show_default=False)],
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite an existing output.", rich_help_panel=OUTPUT_PANEL)] = False,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Hugging Face hub cache for teacher names / timm tags (default: HF_HUB_CACHE).",
        rich_help_panel=SOURCE_PANEL)] = None,
) -> None:
    """Export a student for downstream work (docs/downstream.md): timm, detectron2 ViTDet (COCO Mask
    R-CNN) or mmsegmentation MAE backbone (ADE20K UperNet). The position embedding keeps its CLS slot;
    the final norm, pooling and classifier are dropped for detectron2 and mmseg."""
    from hdcli import teachers
    from hdcli.tools import export as ex
    from hdcli.ui import info

    ex.check_out(out, fmt.value, force=force)
    model = teachers.load_student(student, cache_dir=str(cache_dir) if cache_dir else None)
    res = ex.export(model, fmt.value, out, force=force)
    kind = "directory" if fmt is Format.timm else "checkpoint"
    info(f"[green]wrote[/] {fmt.value} {kind} [bold]{res.path}[/] "
         f"({res.tensors} tensors, {ex.num_params_str(res.params)} parameters)")
    for note in res.notes:
        info(f"[dim]{note}[/]")
    if res.overrides:
        where = "config overrides" if fmt is Format.detectron2 else "--cfg-options"
        info(f"set for this student's shape ({where}): " + " ".join(res.overrides))
