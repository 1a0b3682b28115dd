"""Attention analysis of ViTs: average head distance, NMI and attention maps (paper Sec. 2.1, Fig. 1, 2, 5).

Three layers, top to bottom:
- pure metrics on attention tensors (``attention_probs``, ``head_distance``, ``nmi``);
- a runner with a forward pre-hook on every block that recomputes only q·kᵀ from the entering
  hidden state (``hdcli.models.vit.relations``), so the model's own forward stays timm's and stays fused;
  each chunk of images is reduced to small numbers inside the hook, so memory is bounded by one
  block's attention for one chunk;
- plots (matplotlib, Agg) and the JSON written by ``hd analyze``.

Nothing here imports the CLI; the command imports this module (and so torch) inside its functions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from hdcli.errors import HDError
from hdcli.models import vit
from hdcli.models.vit import patch_size
from hdcli.rundir import atomic_write
from hdcli.ui import pyplot

METRICS = {
    "head_distance": "average head distance (pixels)",
    "nmi": "normalized mutual information",
}

# ---------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------


def attention_probs(relations: Tensor, scale: float, num_prefix_tokens: int = 1) -> Tensor:
    """Patch-to-patch attention from token relations q·kᵀ: softmax(q·kᵀ·scale) on the full sequence,
    prefix (CLS, registers) rows and columns dropped, each row renormalised to sum to 1 (issue 6).

    relations: [B, H, T, T] with T = num_prefix_tokens + N. Returns float32 [B, H, N, N].
    """
    attn = (relations.float() * scale).softmax(dim=-1)  # over all T keys, as the model attends
    attn = attn[:, :, num_prefix_tokens:, num_prefix_tokens:]  # [B, H, N, N]
    return attn / attn.sum(dim=-1, keepdim=True)


def patch_distances(grid_size: tuple[int, int], patch_size: tuple[int, int]) -> Tensor:
    """D_ij in pixels between the centres of patches i and j on a (rows, cols) grid, patches
    numbered row-major as timm orders them. Returns float32 [N, N], N = rows·cols."""
    rows, cols = grid_size
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    y = (r.flatten() * patch_size[0]).float()  # [N] pixel offset of each patch
    x = (c.flatten() * patch_size[1]).float()  # [N]
    return torch.sqrt((y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2)  # [N, N]


def head_distance(attn: Tensor, dist: Tensor) -> Tensor:
    """Average attention distance per image and head: mean over queries i of Σ_j A_ij D_ij.

    attn: [B, H, N, N] rows summing to 1; dist: [N, N] pixels. Returns [B, H].
    """
    per_query = torch.einsum("bhij,ij->bhi", attn, dist.to(attn))  # [B, H, N]
    return per_query.mean(dim=-1)  # [B, H]


def nmi(attn: Tensor) -> Tensor:
    """Normalised mutual information between query and key per image and head (paper [27]).

    p(q) = 1/N, p(k) = Σ_q p(q) A_qk, I = Σ_q Σ_k p(q) A_qk log(A_qk / p(k)),
    H(q) = log N, H(k) = −Σ_k p(k) log p(k), NMI = I / sqrt(H(q) H(k)) (0 where H(k) = 0).
    I is summed term by term as written (0·log 0 = 0), not as H(k) − H(k|q): near-uniform
    attention would lose it to float32 cancellation.

    attn: [B, H, N, N] rows summing to 1. Returns [B, H].
    """
    n = attn.shape[-1]
    p_k = attn.mean(dim=-2)  # [B, H, N]  p(k) = Σ_q (1/N) A_qk
    ratio = attn / p_k.clamp_min(torch.finfo(attn.dtype).tiny).unsqueeze(-2)  # [B, H, N, N]  A_qk / p(k)
    mutual = torch.special.xlogy(attn, ratio).sum(dim=-1).mean(dim=-1)  # [B, H]
    h_k = -torch.special.xlogy(p_k, p_k).sum(dim=-1)  # [B, H]
    denom = torch.sqrt(h_k * math.log(n))  # [B, H]
    return torch.where(denom > 0, mutual / denom.clamp_min(1e-12), torch.zeros_like(mutual))


# ---------------------------------------------------------------------------------------------
# Model runner
# ---------------------------------------------------------------------------------------------


def check_blocks(model: nn.Module, who: str | None = None) -> None:
    """HDError unless ``model`` is of a supported family and every block exposes q·kᵀ (``vit.check_attention``):
    then the attention logits are exactly ``vit.relations``(entering state, its RoPE)·scale."""
    who = who or getattr(model, "hd_kind", None) or type(model).__name__  # an adapted model: its library's class
    if not len(getattr(model, "blocks", ()) or ()):
        raise HDError(f"{who} has no transformer blocks to analyse", f"hd analyze works on a {vit.SUPPORTED}")
    vit.check_vit(model, who)
    vit.check_attention(model, range(len(model.blocks)), who, "attention maps")


def layers(model: nn.Module, decoder: nn.Module | None = None) -> list[nn.Module]:
    """The blocks analysed, in order: the encoder's, then a decoder's (paper Fig. 2b, 3a)."""
    return [*model.blocks, *(decoder.blocks if decoder is not None else ())]


@contextmanager
def attention_tap(model: nn.Module, fn: Callable[[int, Tensor], None], blocks: Sequence[int] | None = None,
                  decoder: nn.Module | None = None):
    """While active, every forward of ``model`` (and of ``decoder``) calls ``fn(block, attn)`` for each block in
    ``blocks`` (default all; a decoder's blocks are numbered after the encoder's) with ``attn`` =
    ``attention_probs`` of that block: [B, H, N, N].

    A forward pre-hook on each block takes the hidden state entering it and recomputes only the logits
    (``vit.attention_logits``: q·kᵀ·scale, and a relative position bias where the block adds one); the block
    itself still runs timm's fused attention. Yields the set of blocks that fired.
    """
    check_blocks(model)
    all_layers = layers(model, decoder)
    blocks = range(len(all_layers)) if blocks is None else blocks
    prefix = vit.num_prefix(model)
    fired: set[int] = set()
    handles = []
    for b in blocks:
        def tap(block, args, kwargs, b=b):  # Eva blocks get the patches' RoPE as a keyword
            pos = kwargs.get("rope", kwargs.get("shared_rel_pos"))
            fn(b, attention_probs(vit.attention_logits(block, args[0], pos, prefix), 1.0, prefix))
            fired.add(b)

        handles.append(all_layers[b].register_forward_pre_hook(tap, with_kwargs=True))
    try:
        yield fired
    finally:
        for h in handles:
            h.remove()


def input_size(model: nn.Module) -> int:
    """The square input size the model was built (or loaded with ``img_size``) for."""
    h, w = model.patch_embed.img_size
    if h != w:
        raise HDError(f"{type(model).__name__} takes {h}x{w} inputs", "hd analyze needs a square input size")
    return int(h)


def grid_size(model: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the patch grid at the model's input size."""
    return tuple(int(g) for g in model.patch_embed.grid_size)


def mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own normalisation (``pretrained_cfg``), ImageNet's where it has none."""
    from hdcli.data import IMAGENET_MEAN, IMAGENET_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def crop(images: Sequence, size: int) -> Tensor:
    """PIL images → uint8 [B, 3, size, size]: shorter side resized to ``size`` (bicubic), centre crop
    (issue 6; ``data.eval_transform`` with crop_pct 1). uint8 tensors [B, 3, size, size] pass unchanged."""
    from hdcli.data import eval_transform

    if isinstance(images, Tensor):
        if tuple(images.shape[-2:]) != (size, size):
            raise HDError(f"images are {tuple(images.shape[-2:])} px, the model takes {size}")
        return images

    tf = eval_transform(size)
    return torch.stack([tf(im.convert("RGB")) for im in images])


def collect(model: nn.Module, images: Sequence, reduce: Callable[[int, Tensor], Tensor], *,
            blocks: Sequence[int] | None = None, batch_size: int = 32, device: str | torch.device = "cpu",
            on_chunk: Callable[[int], None] | None = None, stats: tuple | None = None,
            decoder: nn.Module | None = None, stack: bool = True) -> Tensor | list[Tensor]:
    """Run ``model`` over ``images`` (PIL, or uint8 crops at its input size; its own mean/std unless
    ``stats`` = (mean, std) is given, e.g. for a student still in training) in chunks;
    ``reduce(block, attn [B, H, N, N]) -> [B, ...]`` is applied inside the hook, so only reduced
    values are kept. Returns [len(blocks), len(images), ...] on the CPU. ``on_chunk(n)`` is called
    after each chunk of n images (progress). ``decoder``: a decoder of a distillation run, run on the final
    features; its blocks follow the encoder's. ``stack`` False: a list of [len(images), ...] per block."""
    from hdcli.data import normalize

    size = input_size(model)
    mean, std = stats or mean_std(model)
    blocks = list(range(len(layers(model, decoder)))) if blocks is None else list(blocks)
    out: dict[int, list[Tensor]] = {b: [] for b in blocks}

    def hook(b: int, attn: Tensor) -> None:
        out[b].append(reduce(b, attn).cpu())

    model = model.eval().to(device)
    if decoder is not None:
        decoder = decoder.eval().to(device)
    with torch.inference_mode(), attention_tap(model, hook, blocks, decoder) as fired:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = normalize(crop(chunk, size).to(device), mean=mean, std=std)  # [B, 3, S, S] float
            if decoder is None:
                model.forward_features(x)
            else:
                decoder(vit.final_features(model, x))
            missing = [b for b in blocks if b not in fired]
            if missing:
                raise HDError(f"block {missing[0]} of {type(model).__name__} was never run",
                              "this model's forward is not supported by hd analyze")
            if on_chunk:
                on_chunk(len(chunk))
    per_block = [torch.cat(out[b]) for b in blocks]
    return torch.stack(per_block) if stack else per_block


def measure(model: nn.Module, images: Sequence, metric: str, *, batch_size: int = 32,
            device: str | torch.device = "cpu", on_chunk: Callable[[int], None] | None = None,
            stats: tuple | None = None, decoder: nn.Module | None = None) -> dict:
    """One model's entry of ``head_distance.json`` / ``nmi.json``: values per block and head,
    averaged over images: ``{"per_head": [[H] × L], "per_block": [L], "patch_size", "tokens"}``; with a
    ``decoder``, its blocks follow the encoder's and ``"decoder_blocks"`` says how many of the L they are."""
    if metric not in METRICS:
        raise HDError(f"unknown metric {metric!r}", f"choose one of {', '.join(METRICS)}")
    grid, ps = grid_size(model), patch_size(model)
    if metric == "head_distance":
        dist = patch_distances(grid, ps).to(device)

        def reduce(_b: int, attn: Tensor) -> Tensor:
            return head_distance(attn, dist)
    else:
        def reduce(_b: int, attn: Tensor) -> Tensor:
            return nmi(attn)

    values = collect(model, images, reduce, batch_size=batch_size, device=device, on_chunk=on_chunk, stats=stats,
                     decoder=decoder, stack=False)  # L × [n_images, H_l] (a decoder may have other head counts)
    per_head = [v.double().mean(dim=0) for v in values]  # L × [H_l]
    entry = {
        "per_head": [h.tolist() for h in per_head],
        "per_block": [h.mean().item() for h in per_head],
        "patch_size": ps[0] if ps[0] == ps[1] else list(ps),
        "tokens": grid[0] * grid[1],
    }
    if decoder is not None:
        entry["decoder_blocks"] = len(decoder.blocks)
    return entry


def query_index(query: tuple[float, float], grid: tuple[int, int]) -> int:
    """Patch index holding the point (x, y), given as fractions of the image width and height."""
    x, y = query
    row = min(int(y * grid[0]), grid[0] - 1)
    col = min(int(x * grid[1]), grid[1] - 1)
    return row * grid[1] + col


def attention_maps(model: nn.Module, images: Sequence, queries: Sequence[tuple[float, float]],
                   blocks: Sequence[int], *, head: int | None = None, batch_size: int = 32,
                   device: str | torch.device = "cpu",
                   on_chunk: Callable[[int], None] | None = None) -> Tensor:
    """Attention of the patches holding ``queries`` over all patches, at ``blocks``, mean over heads
    (or one ``head``). Returns [n_images, n_queries, n_blocks, rows, cols]."""
    grid = grid_size(model)
    idx = torch.tensor([query_index(q, grid) for q in queries], device=device)

    def reduce(_b: int, attn: Tensor) -> Tensor:
        rows = attn[:, :, idx, :]  # [B, H, Q, N]
        return rows.mean(dim=1) if head is None else rows[:, head]  # [B, Q, N]

    maps = collect(model, images, reduce, blocks=blocks, batch_size=batch_size, device=device,
                   on_chunk=on_chunk)  # [nb, n, Q, N]
    return maps.permute(1, 2, 0, 3).reshape(len(images), len(queries), len(blocks), *grid)


# ---------------------------------------------------------------------------------------------
# Output: JSON and plots
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, metric: str, n_images: int, models: dict[str, dict]) -> None:
    """``{"metric", "images", "models": {NAME: entry}}``, one line per list of numbers."""
    doc = {"metric": metric, "images": n_images, "models": models}
    text = json.dumps(doc, indent=2)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    atomic_write(path, text + "\n")


def plot_metric(metric: str, models: dict[str, dict], path: Path, *, n_images: int | None = None) -> None:
    """The paper's style (Fig. 1, 2, 5): x = block, one dot per head, one colour per model, a line
    through the mean over heads."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = len(models)
    width = 0.5 / max(n, 1)  # models side by side within a block
    depth = 0
    for i, (name, entry) in enumerate(models.items()):
        c = colours[i % len(colours)]
        per_head = entry["per_head"]
        depth = max(depth, len(per_head))
        shift = (i - (n - 1) / 2) * width
        for b, heads in enumerate(per_head):
            ax.scatter([b + shift] * len(heads), heads, s=14, color=c, alpha=0.55, linewidths=0)
        ax.plot([b + shift for b in range(len(per_head))], entry["per_block"], color=c,
                marker="o", markersize=4, linewidth=1.8, label=name)
    ax.set_xticks(range(depth))
    ax.set_xticklabels(block_labels(models, depth))
    dec = next((e for e in models.values() if e.get("decoder_blocks")), None)
    if dec is not None:  # the decoder's blocks (paper Fig. 2b, 3a)
        start = len(dec["per_block"]) - dec["decoder_blocks"]
        ax.axvspan(start - 0.5, len(dec["per_block"]) - 0.5, color="0.85", alpha=0.5, zorder=0, label="decoder")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("block")
    ax.set_ylabel(METRICS[metric])
    if metric == "nmi":
        ax.set_ylim(bottom=0)
    title = METRICS[metric].capitalize() + " per head (dots) and mean (line)"
    if n_images:
        title += f", {n_images} images"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def block_labels(models: dict[str, dict], depth: int) -> list[str]:
    """Axis / table labels of blocks 0..depth-1: the encoder's by index, a decoder's as d0, d1, ... (from the first
    entry with a decoder)."""
    dec = next((e for e in models.values() if e.get("decoder_blocks")), None)
    start = len(dec["per_block"]) - dec["decoder_blocks"] if dec else depth
    return [str(b) if b < start else f"d{b - start}" for b in range(depth)]


def plot_attention(crops: Tensor, maps: Tensor, queries: Sequence[tuple[float, float]],
                   blocks: Sequence[int], path: Path, *, title: str = "") -> None:
    """A grid (paper Fig. 5c): one row per image and query, the image with the query patch marked,
    then the attention of that query at each block overlaid on the image.

    crops: uint8 [n, 3, H, W]; maps: [n, Q, n_blocks, rows, cols]."""
    import torch.nn.functional as F

    plt = pyplot()
    n, q, nb, rows, cols = maps.shape
    h, w = crops.shape[-2:]
    fig, axes = plt.subplots(n * q, nb + 1, figsize=(1.6 * (nb + 1), 1.6 * n * q + 0.4), dpi=80,
                             squeeze=False)
    up = F.interpolate(maps.reshape(n * q, nb, rows, cols).float(), size=(h, w), mode="nearest")
    for i in range(n):
        img = crops[i].permute(1, 2, 0).numpy()
        for j, query in enumerate(queries):
            r = i * q + j
            row, col = divmod(query_index(query, (rows, cols)), cols)
            box = dict(xy=(col * w / cols - 0.5, row * h / rows - 0.5), width=w / cols, height=h / rows,
                       fill=False, edgecolor="red", linewidth=1.2)
            axes[r, 0].imshow(img)
            axes[r, 0].add_patch(plt.Rectangle(**box))
            for k in range(nb):
                a = up[r, k]
                axes[r, k + 1].imshow(img)
                axes[r, k + 1].imshow((a / a.max().clamp_min(1e-12)).numpy(), cmap="jet", alpha=0.5,
                                      vmin=0, vmax=1)
                axes[r, k + 1].add_patch(plt.Rectangle(**box))
    for k, b in enumerate(blocks):
        axes[0, k + 1].set_title(f"block {b}", fontsize=8)
    axes[0, 0].set_title("query", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
