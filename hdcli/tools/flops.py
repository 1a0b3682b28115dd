"""An analytic FLOP model of one Hybrid Distill step, as pure functions of the architectures' dimensions,
the token count and the keep count (docs/performance.md lists the numbers for the paper's setting).

Convention: 1 multiply-add = 2 FLOPs; only matrix products are counted (linear layers, the patch-embedding
convolution, attention's q·kᵀ and attn·v, the relations' q·kᵀ), as ``torch.utils.flop_counter`` and MFU
figures do. Norms, activations, softmax, masking and AdamW are elementwise and left out; the SmoothL1 losses
are the one elementwise part counted (``LOSS_FLOPS_PER_ELEMENT``), so a reader sees how small they are.

What one image costs in a step (METHOD.md; the engine runs exactly this, ``hdcli.method``):

- MIM teacher: patch embedding of all N patches, then blocks 0..s-1 on all 1+N tokens, where s is the
  last block it must *enter* (relation blocks and, when it chooses the keep set, mask blocks: s = 10 for
  relations at 9, 10); blocks after it never run. Then q·kᵀ at each relation block on the 1+n kept tokens
  (norm1 + the q, k rows of ``qkv`` + the product).
- Feature teacher: patch embedding + all blocks on 1+N tokens (its final norm is elementwise).
- Student forward: patch embedding of all N patches (the gather comes after it), all blocks on 1+n tokens,
  its own q·kᵀ taps at the relation blocks and the linear feature head, all on 1+n tokens.
- Student backward: 2× the forward (gradients of inputs and of weights), except the patch embedding,
  whose input (the image) needs no gradient: 1×. Fused (flash) attention kernels also recompute q·kᵀ in
  the backward; that is work done but not model FLOPs, so it is left out unless ``recompute=True``
  (``torch.utils.flop_counter`` counts it; the test compares with it that way).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from hdcli.method.names import paper_blocks

# SmoothL1 forward (difference, abs, compare, square/scale, select, mean) and backward (~4): about 10 per element.
LOSS_FLOPS_PER_ELEMENT = 10


@dataclass(frozen=True)
class ViTDims:
    """What the FLOP count needs of a ViT: width, depth, heads × head_dim, MLP hidden width, patch fan-in
    (in_chans · patch_h · patch_w), prefix tokens (1: CLS) and MLP input matrices (2: gated, SwiGLU)."""

    dim: int
    depth: int
    heads: int
    head_dim: int
    mlp_hidden: int
    patch_in: int
    prefix: int = 1
    mlp_in: int = 1

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim


def vit_dims(
    dim: int, depth: int, heads: int, *, mlp_ratio: float = 4.0, patch: int = 16, in_chans: int = 3
) -> ViTDims:
    """ViTDims of a standard ViT: head_dim = dim / heads, MLP hidden = mlp_ratio · dim. ViT-B/16 = vit_dims(768, 12, 12)."""
    return ViTDims(dim, depth, heads, dim // heads, int(dim * mlp_ratio), in_chans * patch * patch)


def dims_of(model) -> ViTDims:
    """ViTDims of a timm VisionTransformer (read from its modules, so overrides like embed_dim are seen)."""
    blk = model.blocks[0]
    proj = model.patch_embed.proj
    k = proj.kernel_size
    return ViTDims(
        dim=int(model.embed_dim),
        depth=len(model.blocks),
        heads=int(blk.attn.num_heads),
        head_dim=int(blk.attn.head_dim),
        mlp_hidden=int(blk.mlp.fc2.in_features),
        patch_in=int(proj.in_channels * k[0] * k[1]),
        prefix=int(getattr(model, "num_prefix_tokens", 1)),
        mlp_in=_mlp_inputs(blk.mlp),
    )


def _mlp_inputs(mlp) -> int:
    """Input matrices of an MLP: 1 (fc1), 2 for gated ones (SwiGLU's fc1_g + fc1_x, GluMlp's doubled fc1)."""
    if hasattr(mlp, "fc1_g"):
        return 2
    return int(mlp.fc1.out_features) // int(mlp.fc2.in_features)


def arch_dims(arch: str, **timm_kwargs) -> ViTDims:
    """ViTDims of a timm architecture, built on the meta device (no memory, no weights, milliseconds)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs)
    return dims_of(model)


# ---------------------------------------------------------------- pieces (FLOPs for ONE image)

def linear(tokens: int, d_in: int, d_out: int) -> int:
    """A linear layer on ``tokens`` rows: 2·T·d_in·d_out."""
    return 2 * tokens * d_in * d_out


def patch_embed(v: ViTDims, n_patches: int) -> int:
    """The patch-embedding convolution = one linear layer per patch: 2·N·(C·p²)·D."""
    return linear(n_patches, v.patch_in, v.dim)


def attention(v: ViTDims, tokens: int) -> int:
    """q·kᵀ and attn·v over ``tokens`` tokens: 2 · 2·H·T²·d_h."""
    return 4 * v.heads * tokens * tokens * v.head_dim


def block(v: ViTDims, tokens: int) -> int:
    """One transformer block on ``tokens`` tokens: qkv, attention, proj, fc1 (twice when gated), fc2."""
    a = v.attn_dim
    return (linear(tokens, v.dim, 3 * a) + attention(v, tokens) + linear(tokens, a, v.dim)
            + v.mlp_in * linear(tokens, v.dim, v.mlp_hidden) + linear(tokens, v.mlp_hidden, v.dim))


def relations(v: ViTDims, tokens: int) -> int:
    """One q·kᵀ tap (``hdcli.models.vit.relations``): the q and k rows of qkv, then q·kᵀ without attn·v."""
    return linear(tokens, v.dim, 2 * v.attn_dim) + 2 * v.heads * tokens * tokens * v.head_dim


def encoder(v: ViTDims, n_patches: int, tokens: int, blocks: int) -> int:
    """Patch embedding of all ``n_patches`` patches, then ``blocks`` blocks on ``tokens`` tokens."""
    return patch_embed(v, n_patches) + blocks * block(v, tokens)


# ---------------------------------------------------------------- the step

@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one distillation step for ONE image, by part (multiply by the batch for a step)."""

    mim_teacher: int  # patch embed + blocks up to the last one entered, on 1+N tokens, + q·kᵀ on 1+n
    feat_teacher: int  # patch embed + all blocks on 1+N tokens
    student_fwd: int  # patch embed (N) + blocks, q·kᵀ taps and the feature head on 1+n tokens
    student_bwd: int  # 2× student_fwd, patch embed 1×
    loss: int  # SmoothL1 of features and relations (elementwise, ~LOSS_FLOPS_PER_ELEMENT per element)
    n_patches: int
    n_keep: int

    @property
    def teachers(self) -> int:
        return self.mim_teacher + self.feat_teacher

    @property
    def student(self) -> int:
        """Student forward + backward, heads and losses included."""
        return self.student_fwd + self.student_bwd + self.loss

    @property
    def total(self) -> int:
        return self.teachers + self.student

    @property
    def keep_fraction(self) -> float:
        return self.n_keep / self.n_patches

    def as_dict(self) -> dict:
        return {**asdict(self), "teachers": self.teachers, "student": self.student, "total": self.total}


def hybrid_step(
    mim: ViTDims,
    feat: ViTDims,
    student: ViTDims,
    *,
    n_patches: int,
    n_keep: int,
    relation_blocks: Sequence[int] = paper_blocks().relations,
    student_relation_blocks: Sequence[int] | None = None,
    mask_blocks: Sequence[int] = paper_blocks().mask,
    relation_heads: str = "match",
    recompute: bool = False,
) -> StepFlops:
    """FLOPs per image of a Hybrid Distill step (METHOD.md): relations of ``mim`` at ``relation_blocks``,
    final features of ``feat``, the student on CLS + ``n_keep`` patches.

    ``mask_blocks``: MIM-teacher blocks it must enter to choose the keep set; they only count when tokens
    are dropped (``n_keep < n_patches``) — pass () for ``random``/``none`` masking, which never look at it.
    ``recompute``: add the q·kᵀ that fused attention recomputes in each student block's backward.
    """
    if not 0 < n_keep <= n_patches:
        raise ValueError(f"n_keep must lie in 1..{n_patches}, got {n_keep}")
    s_blocks = tuple(relation_blocks if student_relation_blocks is None else student_relation_blocks)
    full, kept = mim.prefix + n_patches, student.prefix + n_keep
    enter = set(relation_blocks) | (set(mask_blocks) if n_keep < n_patches else set())
    stop = max(enter, default=0)  # blocks 0..stop-1 run: the last one entered needs only its input
    mim_flops = encoder(mim, n_patches, full, stop) + sum(relations(mim, kept) for _ in relation_blocks)
    feat_flops = encoder(feat, n_patches, feat.prefix + n_patches, feat.depth)
    s_pe = patch_embed(student, n_patches)
    s_fwd = (encoder(student, n_patches, kept, student.depth) + sum(relations(student, kept) for _ in s_blocks)
             + linear(kept, student.dim, feat.dim))
    s_bwd = 2 * (s_fwd - s_pe) + s_pe
    if recompute:
        s_bwd += student.depth * attention(student, kept) // 2
    rel_heads = 1 if relation_heads == "mean" else student.heads
    loss_elems = kept * feat.dim + len(s_blocks) * rel_heads * kept * kept
    return StepFlops(mim_teacher=mim_flops, feat_teacher=feat_flops, student_fwd=s_fwd, student_bwd=s_bwd,
                     loss=LOSS_FLOPS_PER_ELEMENT * loss_elems, n_patches=n_patches, n_keep=n_keep)


def of_method(method, *, recompute: bool = False) -> StepFlops:
    """The FLOP model of a built hybrid ``hdcli.method.Distiller``: one relations target (whose teacher also
    chooses the keep set) and one features target."""
    from hdcli.errors import HDError

    kinds = sorted(t.kind for t in method.targets)
    if kinds != ["features", "relations"]:
        raise HDError("the FLOP model covers the hybrid step (features of one teacher + relations of the MIM "
                      f"teacher); this method has targets {[t.name for t in method.targets]}",
                      "benchmark a HybridDistill")
    rel = next(t for t in method.targets if t.kind == "relations")
    feat = next(t for t in method.targets if t.kind == "features")
    teachers = method.teachers
    return hybrid_step(dims_of(teachers[rel.teacher]), dims_of(teachers[feat.teacher]), dims_of(method.student),
                       n_patches=method.num_patches, n_keep=method.n_keep, relation_blocks=rel.blocks,
                       student_relation_blocks=rel.s_blocks,
                       mask_blocks=method.masking.teacher_blocks(method.num_patches),
                       relation_heads=method.relation_heads, recompute=recompute)


# ---------------------------------------------------------------- cross-check with torch's counter

def flop_counter_mapping() -> dict:
    """Formulas for ops ``torch.utils.flop_counter`` does not know: the CPU flash-attention kernels that
    ``F.scaled_dot_product_attention`` (timm's fused attention) runs on the CPU. Same formulas as torch's
    own for the CUDA kernels. Pass as ``FlopCounterMode(custom_mapping=...)``."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """Run ``fn(*args, **kwargs)`` under ``torch.utils.flop_counter.FlopCounterMode`` (CPU attention
    included); return (total FLOPs, fn's result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=flop_counter_mapping()) as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


# ---------------------------------------------------------------- whole steps from a config (hd reproduce's GPU-hours)

def config_keep(cfg, n_patches: int) -> int:
    """Patches the student keeps (METHOD.md: the count depends only on N and the settings)."""
    from hdcli.method.hybrid import masking_of

    return masking_of(cfg.distill).keep_count(n_patches)


def distill_step(cfg, dims: Callable[[str], ViTDims], student: ViTDims) -> int:
    """Model FLOPs of one distillation step per image for any ``[distill]`` section, with the counting rules
    of :func:`hybrid_step` (teachers run up to the last block a target or the mask needs; relations and the
    student on CLS + kept patches; backward = 2x forward, patch embedding 1x). Elementwise losses are left
    out. ``dims(name)``: the ViTDims of a teacher as named in ``cfg.distill.teachers``; ``student``: the
    student's."""
    from hdcli.method.hybrid import masking_of, targets_from_config
    from hdcli.teachers.registry import labels

    dc = cfg.distill
    s = student
    grid = cfg.data.img_size // patch_of(s)
    n = grid * grid
    masking = masking_of(dc)
    tok = s.prefix + masking.keep_count(n)
    targets, mask_teacher = targets_from_config(dc)
    name_of = dict(zip(labels(list(dc.teachers)), dc.teachers, strict=True))  # a target's teacher label -> name
    total = 0
    for label, name in name_of.items():
        d = dims(name)
        run_blocks, taps = 0, 0
        for t in (t for t in targets if t.teacher == label):
            if t.kind == "features":
                run_blocks = d.depth
            elif t.kind == "relations":
                run_blocks = max(run_blocks, *t.blocks)  # entering block b needs blocks 0..b-1
                taps += len(t.blocks)
            else:  # block / msa: the output of block b
                run_blocks = max(run_blocks, *(b + 1 for b in t.blocks))
        if label == mask_teacher:
            run_blocks = max(run_blocks, *masking.teacher_blocks(n), 0)
        total += encoder(d, n, d.prefix + n, run_blocks) + taps * relations(d, tok)
    fwd = encoder(s, n, tok, s.depth)
    for t in targets:
        td = dims(name_of[t.teacher])
        if t.kind == "features":
            fwd += head(t.head, tok, s.dim, td.dim)
        elif t.kind == "relations":
            fwd += len(t.s_blocks) * relations(s, tok)
        else:
            fwd += len(t.blocks) * linear(tok, s.dim, td.dim)
    pe = patch_embed(s, n)
    return total + fwd + 2 * (fwd - pe) + pe


def head(spec, tokens: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of a final-feature head (``hdcli.method.heads``): none, linear, or a decoder (its embedding,
    blocks at its width and projection); other kinds are counted as a linear map."""
    if spec.kind == "identity":
        return 0
    if spec.kind != "decoder":
        return linear(tokens, d_in, d_out)
    dim = spec.dim or d_in
    heads = spec.heads or max(1, dim // 64)
    v = vit_dims(dim, spec.blocks or 1, heads, mlp_ratio=spec.mlp_ratio or 4.0)
    return ((linear(tokens, d_in, dim) if dim != d_in else 0) + v.depth * block(v, tokens)
            + linear(tokens, dim, d_out))


def patch_of(d) -> int:
    """Patch side of a ViTDims (patch_in = 3·p²)."""
    return int(round(math.sqrt(d.patch_in / 3)))


def classifier_step(d, n_patches: int) -> int:
    """Forward + backward of a plain ViT classifier on all tokens, per image."""
    fwd = encoder(d, n_patches, d.prefix + n_patches, d.depth)
    pe = patch_embed(d, n_patches)
    return fwd + 2 * (fwd - pe) + pe


def vitdet(d, size: int = 1024, window: int = 14) -> int:
    """Backbone forward + backward of ViTDet at ``size``² (window attention except 4 global blocks), per image."""
    side = size // patch_of(d)
    n = side * side
    padded = math.ceil(side / window) ** 2
    attn_global, attn_window = attention(d, n), padded * attention(d, window * window)
    dense = block(d, n) - attn_global
    n_global = 4
    fwd = patch_embed(d, n) + d.depth * dense + n_global * attn_global + (d.depth - n_global) * attn_window
    pe = patch_embed(d, n)
    return fwd + 2 * (fwd - pe) + pe


def gpu_hours(flops_total: float, tflops: float) -> float:
    """GPU-hours of ``flops_total`` model FLOPs at ``tflops`` achieved TFLOP/s per GPU."""
    return flops_total / (tflops * 1e12) / 3600
