"""The method's vocabulary, torch-free: the option lists the config validates against and the paper's blocks.

Imported by :mod:`hdcli.config` (which must stay torch-free, so ``hd --help`` is fast) and by the method's own
modules, so each list is written here once. The lists whose entries each have an implementation beside them
(target kinds, losses, heads, target normalisations) are NOT here: they are the keys of their module's table
(``targets.KINDS``, ``losses.LOSSES``, ``heads.HEADS``, ``norms.NORMS``), and the config asks that module when it
validates a ``[distill]`` section (:func:`hdcli.method.spec.check`).
"""

from __future__ import annotations

from typing import NamedTuple

MASKING = ("progressive", "direct", "random", "none")  # paper Tab. 8
RELATION_HEADS = ("match", "mean")  # relations per head (head counts must agree) or averaged over heads
METRIC_PREFIXES = ("part", "share", "cos", "attn", "drop", "knn", "probe")  # a run's records: part/<target>, ...
TEACHER_DTYPES = ("auto", "fp32", "bf16", "fp16")  # the teachers' own precision (auto: bf16 on CUDA, fp32 on the CPU)


class PaperBlocks(NamedTuple):
    """0-based block indices of a depth-L MIM teacher where the paper takes its relations and masks."""

    relations: tuple[int, ...]
    mask: tuple[int, ...]


def paper_blocks(depth: int = 12) -> PaperBlocks:
    """The paper's blocks for a depth-L MIM teacher (METHOD.md): relations at paper layers L-2, L-1 (blocks L-3,
    L-2) and masking entering paper layers [0, L/3, 2L/3] (blocks 0, L/3, 2L/3). 12 -> ((9, 10), (0, 4, 8))."""
    return PaperBlocks((depth - 3, depth - 2), (0, depth // 3, 2 * depth // 3))
