"""In-run evaluation of a distillation: a fixed, seeded eval set, k-NN top-1 of the student (and, once, of
each teacher) across ranks, and a head-distance / NMI probe of the student.

The eval set is decoded once per run (each rank its share, with the data workers) and held as uint8
tensors, so an evaluation is forward passes only. The k-NN bank comes from the train split of the eval
source, the queries from its val split, or from held-out train images where it has none. Each rank embeds
its share; the bank is gathered (in the 1-rank order, so any number of ranks gives the same number), each
rank classifies its queries and the hits are summed. Shards are split by rank as files, so there each rank
takes the first samples of its own shards: the same set for a given number of ranks, not across numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hdcli import data, ui
from hdcli.errors import HDError
from hdcli.models import vit
from hdcli.watch.knn import knn_correct

BANK_SHARE, QUERY_SHARE = 10, 20  # default sizes: at most 1/10 (bank) and 1/20 (queries) of the train split
BATCH = 256  # images per forward pass of an evaluation
MIN_WORKER_IMAGES = 2000  # smaller shares of the eval set are decoded in the main process


@dataclass
class Part:
    """One rank's share of the bank or the queries: uint8 images [m, 3, S, S], labels [m], and each image's
    position in the 1-rank order [m] (to gather in that order)."""

    images: torch.Tensor
    labels: torch.Tensor
    position: torch.Tensor


def eval_sizes(samples: list[int] | None, n_train: int, n_val: int | None) -> tuple[int, int]:
    """(bank, queries): ``samples`` capped by the splits, or by default at most 10,000 / 5,000 and 1/10 / 1/20
    of the train split (a small data set is not evaluated on more images than it trains on per epoch).
    ``n_val`` None: the queries are held out from the train split."""
    if samples:
        bank, queries = samples[0], samples[1] if len(samples) > 1 else max(1, samples[0] // 2)
    else:
        bank, queries = min(10_000, max(1, n_train // BANK_SHARE)), min(5_000, max(1, n_train // QUERY_SHARE))
    if n_val is None:
        bank = min(bank, n_train - 1)
        return bank, max(0, min(queries, n_train - bank))
    return min(bank, n_train), min(queries, n_val)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, records, indices: list[int], positions: list[int], transform):
        self.records, self.indices, self.positions, self.transform = records, indices, positions, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        try:
            img = self.records.load(self.indices[j])
        except Exception:  # an unreadable image is left out of the eval set
            return None
        return self.transform(img), self.records.label(self.indices[j]), self.positions[j]


def _collate(items):
    items = [x for x in items if x is not None]
    if not items:
        return None
    return (torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items]),
            torch.tensor([p for _, _, p in items]))


def _load(dataset, num_workers: int) -> Part:
    # worker processes pay off for large sets only (starting one costs about as much as decoding 1,000 small images)
    workers = num_workers if len(dataset) > MIN_WORKER_IMAGES else 0
    dl = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=_collate)
    got = [b for b in dl if b is not None]
    if not got:
        return Part(torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                    torch.empty(0, dtype=torch.long))
    return Part(*(torch.cat(t) for t in zip(*got, strict=True)))


def load_eval_set(source, *, img_size: int, samples: list[int] | None, seed: int, rank: int, world: int,
                  num_workers: int, max_bad_fraction: float, positions: slice | None = None) -> tuple[Part, Part, str]:
    """This rank's (bank, queries) of ``source`` and a description. Map-style sources: a seeded random
    choice; shards: the first samples of one pass (rank-split). ``positions``: take those query positions
    instead of a rank's share (the probe images, on one process)."""
    tf = data.eval_transform(img_size)
    src = data.parse_source(source)
    held_out = not data.has_split(source, "val")
    if src.kind == "shards":
        return _load_shards(source, tf, img_size, samples, held_out, rank, world, positions, num_workers,
                            max_bad_fraction)
    train = data.open_records(src, "train")
    val = None if held_out else data.open_records(src, "val")
    nb, nq = eval_sizes(samples, len(train), None if val is None else len(val))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen).tolist()
    bank_idx = order[:nb]
    query_idx = order[nb:nb + nq] if val is None else torch.randperm(len(val), generator=gen)[:nq].tolist()
    qrec = train if val is None else val
    mine = range(rank, nb, world)
    if positions is not None:
        q = list(range(nq))[positions]
        return None, _load(_Subset(qrec, [query_idx[i] for i in q], q, tf), 0), ""
    bank = _load(_Subset(train, [bank_idx[i] for i in mine], list(mine), tf), num_workers)
    qmine = range(rank, nq, world)
    queries = _load(_Subset(qrec, [query_idx[i] for i in qmine], list(qmine), tf), num_workers)
    where = "held-out train images" if val is None else "the val split"
    return bank, queries, f"{nb} train images, {nq} queries from {where} of {src.spec}"


def _load_shards(source, tf, img_size, samples, held_out, rank, world, positions, num_workers, max_bad_fraction):
    """Shards: one deterministic pass (split by rank) over the first samples of the train split (the bank, then
    the held-out queries) and of the val split, read only as far as needed; positions interleave the ranks
    (position = i·world + rank). ``positions`` (the probe): those query positions, read by this process alone."""
    n_train = data.num_samples(source, "train")
    n_val = None if held_out else data.num_samples(source, "val")
    nb, nq = eval_sizes(samples, n_train, n_val)
    if positions is not None:
        rank, world = 0, 1

    def take(split: str, ranges: list[tuple[int, int]]) -> list[Part]:
        """Parts for the position ranges [lo, hi) of one pass over ``split``, filtered while streaming."""
        end = max(hi for _, hi in ranges)
        per_rank = math.ceil(end / world)
        loader = data.build_loader(source, split=split, img_size=img_size, batch_size=64, train=False,
                                   num_workers=num_workers, rank=rank, world_size=world, transform=tf,
                                   epoch_steps=max(1, math.ceil(per_rank / 64)), max_bad_fraction=max_bad_fraction)
        got: list[list[tuple]] = [[] for _ in ranges]
        seen = 0
        for x, y in loader:
            pos = (torch.arange(len(x)) + seen) * world + rank
            seen += len(x)
            for k, (lo, hi) in enumerate(ranges):
                keep = (pos >= lo) & (pos < hi)
                if keep.any():
                    got[k].append((x[keep], y[keep], pos[keep] - lo))
            if seen >= per_rank:
                break
        loader.close()
        return [Part(*(torch.cat(t) for t in zip(*g, strict=True))) if g else
                Part(torch.empty(0, 3, img_size, img_size, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                     torch.empty(0, dtype=torch.long)) for g in got]

    if positions is not None:
        want = range(nq)[positions]
        lo, hi = (want.start, want.stop) if len(want) else (0, 0)
        queries = take("train", [(nb + lo, nb + hi)])[0] if held_out else take("val", [(lo, hi)])[0]
        return None, Part(queries.images, queries.labels, queries.position + lo), ""
    if held_out:
        bank, queries = take("train", [(0, nb), (nb, nb + nq)])
    else:
        bank, queries = take("train", [(0, nb)])[0], take("val", [(0, nq)])[0]
    where = "held-out train samples" if held_out else "the val shards"
    return bank, queries, f"{nb} train samples, {nq} queries from {where} of {source}"


# ---------------------------------------------------------------- features and gathering

Summaries = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def token_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image summary, mean patch token) [B, D] of a model for normalised images x [B, 3, H, W]: the final CLS
    token (after the final norm), or the model's pooled summary (its MAP/average pool) when it has no class
    token; the mean over the final patch tokens (registers left out)."""
    last = vit.depth(model) - 1
    _, leaving, feats = vit.run_blocks(model, *vit.embed(model, x), leave={last}, final=True)
    cls = feats[:, 0] if vit.has_cls(model) else vit.pooled(model, leaving[last])
    return cls.float(), feats[:, vit.num_prefix(model):].float().mean(dim=1)


def embed_part(part: Part, summaries: Summaries, device: torch.device,
               autocast, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS features, average-pooled patch features) [m, D] fp32 of a part; ``summaries`` maps ImageNet-normalised
    images on ``device`` to both (``token_features``). An empty part gives [0, D] (one blank image is
    embedded for D), so that every rank gathers tensors of the same width."""
    cls, avg = [], []
    images = part.images if len(part.images) else torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8)
    with torch.inference_mode(), autocast():
        for i in range(0, len(images), BATCH):
            c, a = summaries(data.normalize(images[i:i + BATCH].to(device, non_blocking=True)))
            cls.append(c.float())
            avg.append(a.float())
    cls, avg = torch.cat(cls), torch.cat(avg)
    return (cls, avg) if len(part.images) else (cls[:0], avg[:0])


def gather_ordered(accelerator, position: torch.Tensor, *rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``rows`` (same first dimension as ``position``), concatenated in the order of position."""
    if accelerator.num_processes == 1:
        order = position.argsort()
        return [r[order] for r in rows]
    device = accelerator.device
    n = torch.tensor([len(position)], device=device)
    most = int(accelerator.gather(n).max())
    out = []
    pos = _pad(position.to(device), most, -1)
    all_pos = accelerator.gather(pos)
    valid = all_pos >= 0
    order = all_pos[valid].argsort()
    for r in rows:
        g = accelerator.gather(_pad(r.to(device), most, 0))
        out.append(g[valid][order])
    return out


def _pad(t: torch.Tensor, n: int, value) -> torch.Tensor:
    if len(t) == n:
        return t
    pad = t.new_full((n - len(t), *t.shape[1:]), value)
    return torch.cat([t, pad])


# ---------------------------------------------------------------- the monitor

class KnnMonitor:
    """k-NN top-1 (CLS and average-pooled features) of models on the run's eval set; see the module docstring.

    ``evaluate(name, tokens, accelerator)`` -> {"knn/<name>_cls": %, "knn/<name>_avg": %}; the eval set is
    loaded at the first call. ``probe(student, accelerator)`` -> the head-distance / NMI numbers (main process).
    """

    def __init__(self, source, *, img_size: int, samples: list[int] | None, k: int, temperature: float, seed: int,
                 num_workers: int, probe_images: int, max_bad_fraction: float):
        self.source, self.img_size, self.samples, self.seed = source, img_size, samples, seed
        self.max_bad_fraction = max_bad_fraction  # the run's budget of unreadable images, the eval set's too
        self.k, self.temperature, self.num_workers, self.probe_images = k, temperature, num_workers, probe_images
        self.bank: Part | None = None
        self.queries: Part | None = None
        self.probe_set: torch.Tensor | None = None
        self.num_classes = 0
        self.seconds = 0.0  # wall time spent in evaluate() and probe() so far
        self.last_seconds = 0.0  # of the latest student evaluation with its probe (set by the caller)

    def _setup(self, accelerator) -> None:
        t = time.perf_counter()
        self.bank, self.queries, what = load_eval_set(
            self.source, img_size=self.img_size, samples=self.samples, seed=self.seed,
            rank=accelerator.process_index, world=accelerator.num_processes, num_workers=self.num_workers,
            max_bad_fraction=self.max_bad_fraction)
        labels = gather_ordered(accelerator, self.bank.position, self.bank.labels.to(accelerator.device))[0]
        if len(labels) == 0:
            raise HDError(f"the k-NN bank of {self.source} is empty: its train split is too small to give both a bank "
                          "and held-out queries", "give --eval-data a source with more images (or a val split), or "
                          "turn the evaluation off with --eval-every 0")
        if (labels < 0).any():
            raise HDError(f"the k-NN eval set of {self.source} has no labels", "give --eval-data a labelled source, "
                          "or turn the evaluation off with --eval-every 0")
        self.bank_labels = labels
        q = self.queries.labels
        n = torch.tensor([[len(q), int(q.max()) if len(q) else -1, int(q.min()) if len(q) else 0]],
                         device=accelerator.device)
        n = accelerator.gather(n) if accelerator.num_processes > 1 else n  # [ranks, 3]
        if int(n[:, 2].min()) < 0:
            raise HDError(f"the k-NN queries of {self.source} have no labels", "give --eval-data a labelled source")
        self.n_queries = int(n[:, 0].sum())
        self.num_classes = max(int(labels.max()), int(n[:, 1].max())) + 1
        if self.n_queries == 0:
            raise HDError(f"the k-NN eval set of {self.source} holds no query images",
                          "give --eval-data a source with more images, or --eval-every 0")
        if len(labels) < self.k:  # a vote over more neighbours than the bank holds would count absent ones
            if accelerator.is_main_process:
                ui.warn(f"the k-NN bank holds {len(labels)} images, fewer than k = {self.k}: k is {len(labels)} "
                        "(give --eval-data a larger source for a meaningful k-NN)")
            self.k = len(labels)
        if accelerator.is_main_process:
            if self.probe_images:
                self.probe_set = load_eval_set(self.source, img_size=self.img_size, samples=self.samples,
                                               seed=self.seed, rank=0, world=1, num_workers=0,
                                               positions=slice(0, self.probe_images),
                                               max_bad_fraction=self.max_bad_fraction)[1].images
            ui.console.print(f"k-NN eval set: {what} (k {self.k}, T {self.temperature:g}); loaded in "
                             f"{time.perf_counter() - t:.1f}s", soft_wrap=True, markup=False)

    def evaluate(self, name: str, tokens: Summaries, accelerator) -> dict[str, float]:
        t = time.perf_counter()
        try:
            return self._evaluate(name, tokens, accelerator)
        finally:
            self._spent(t)

    def _spent(self, t: float) -> None:
        self.seconds += time.perf_counter() - t

    def _evaluate(self, name, tokens, accelerator) -> dict[str, float]:
        if self.bank is None:
            self._setup(accelerator)
        device = accelerator.device
        bank = embed_part(self.bank, tokens, device, accelerator.autocast, self.img_size)
        queries = embed_part(self.queries, tokens, device, accelerator.autocast, self.img_size)
        out = {}
        for which, b, q in zip(("cls", "avg"), bank, queries, strict=True):
            full = gather_ordered(accelerator, self.bank.position, b)[0]
            hits = knn_correct(full, self.bank_labels, q, self.queries.labels.to(device), k=self.k,
                               temperature=self.temperature, num_classes=self.num_classes)
            hits = torch.tensor(float(hits), device=device)
            if accelerator.num_processes > 1:
                hits = accelerator.reduce(hits, "sum")
            out[f"knn/{name}_{which}"] = 100.0 * float(hits) / self.n_queries
        return out

    def probe(self, student: nn.Module, device) -> dict[str, float]:
        """Mean head distance, its spread across heads (std, mean over blocks) and mean NMI of ``student`` on the
        probe images, in one pass (main process only; {} elsewhere or when turned off)."""
        if self.probe_set is None or not len(self.probe_set):
            return {}
        t = time.perf_counter()
        try:
            return self._probe(student, device)
        finally:
            self._spent(t)

    def _probe(self, student: nn.Module, device) -> dict[str, float]:
        from hdcli.tools import analyze

        dist = analyze.patch_distances(analyze.grid_size(student), vit.patch_size(student)).to(device)

        def reduce(_b: int, attn: torch.Tensor) -> torch.Tensor:  # [B, H, N, N] -> [B, 2, H]
            return torch.stack([analyze.head_distance(attn, dist), analyze.nmi(attn)], dim=1)

        stats = (data.IMAGENET_MEAN, data.IMAGENET_STD)  # what the student is trained on (METHOD.md)
        values = analyze.collect(student, self.probe_set, reduce, batch_size=64, device=device, stats=stats)
        per_head = values.double().mean(dim=1)  # [L, 2, H]
        return {"probe/head_distance": float(per_head[:, 0].mean()),
                "probe/head_distance_spread": float(per_head[:, 0].std(dim=1, unbiased=False).mean()),
                "probe/nmi": float(per_head[:, 1].mean())}
