"""A teacher-target cache on disk (docs/scale.md "A target cache"): its header, its records and their index.

    CACHE/_header.json               everything that defines the targets (:func:`describe`) + the counts
    CACHE/targets-000000.tar         WebDataset shards: one member ``<image index>.safetensors`` per image, holding
                                     for each of its K views ``v<k>.keep`` and ``v<k>.<target>@<block>`` (the
                                     teacher pass's keep set and raw targets on the prefix + kept tokens) and, in
                                     its metadata, the views' crops (top, left, height, width, flip)
    CACHE/targets-000000.idx.npy     per shard: [n, 3] int64 (image index, byte offset, size) of its records

A shard is complete when its tar exists (its index is written first, both through a temp file and a rename), so a
killed or failed writer leaves whole shards only and a new run of the same command writes what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hdcli.errors import HDError

HEADER = "_header.json"
FORMAT = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def shard_name(i: int) -> str:
    return f"targets-{i:06d}.tar"


def index_name(i: int) -> str:
    return f"targets-{i:06d}.idx.npy"


def source_name(source: tuple[str, int | None]) -> str:
    """A target value's name in a record: ``<target>@<teacher block>`` (``@final`` for the final features)."""
    name, block = source
    return f"{name}@{'final' if block is None else block}"


def read_header(cache: Path) -> dict:
    path = Path(cache) / HEADER
    if not path.is_file():
        raise HDError(f"{cache} is not a target cache (no {HEADER})",
                      "write one with `hd cache-targets --recipe R --data D --out CACHE`")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HDError(f"cannot read {path}: {e}", "write the cache again") from None


def first_difference(a, b, path: str = "") -> str | None:
    """The first place two JSON-like values differ, as ``key: a -> b``; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path + k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}"
            d = first_difference(a[k], b[k], f"{path}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{path}{i}.")
            if d:
                return d
        return None
    return None if a == b else f"{path.rstrip('.')}: {a} -> {b}"


def describe(cfg, method, *, num_images: int, views: int, dtype: str) -> dict:
    """Everything that defines a cache's targets, as JSON: the teachers (as named, their labels and identities),
    each target's teacher side, the keep settings, the relation heads, the teachers' precision, the image size and
    the student's grid and prefix tokens, the crop settings and seed, the data and the views. A run may train
    from a cache whose description equals its own."""
    from hdcli.models import vit
    from hdcli.teachers.registry import labels

    dc, tp = cfg.distill, method.teacher_pass
    teacher_dtype = next(iter(method.teachers.values())).patch_embed.proj.weight.dtype
    return {
        "teachers": [{"name": n, "label": lab, "identity": _identity(n, dc)} for n, lab in
                     zip(dc.teachers, labels(list(dc.teachers)), strict=True)],
        "targets": [{"name": t.name, "teacher": t.teacher, "kind": t.kind, "blocks": list(t.blocks), "norm": t.norm,
                     "registers": t.registers, "pooled": t.pooled} for t in tp.targets],
        "masking": {"strategy": tp.masking.strategy, "drop_ratio": tp.masking.drop_ratio,
                    "blocks": list(tp.masking.blocks), "teacher": tp.mask_teacher},
        "relation_heads": tp.relation_heads, "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
        "img_size": cfg.data.img_size, "grid": list(method.grid), "student_prefix": list(vit.prefix_roles(method.student)),
        "crop": {"scale": list(cfg.data.scale), "hflip": cfg.data.hflip, "seed": cfg.train.seed},
        "data": {"source": str(cfg.data.source or "demo"), "images": num_images}, "views": views, "dtype": dtype,
    }


def _identity(name: str, dc) -> str:
    """What a teacher is, whatever its spelling: ``random:ARCH`` with its kwargs, a directory's resolved path, a
    registry name's tag."""
    from hdcli.teachers.registry import LOCAL_DIR, RANDOM, resolve

    if name.startswith(RANDOM):
        return f"{name} {json.dumps(dc.teacher_kwargs, sort_keys=True)}"
    tag = resolve(name).tag
    return str(Path(tag.removeprefix(LOCAL_DIR)).resolve()) if tag.startswith(LOCAL_DIR) else tag
