"""The weighted k-NN classifier of DINO's ``eval_knn.py`` on L2-normalised features (pure functions).

Each query's k nearest bank features by cosine similarity s vote for their labels with weight
exp(s / T); the class with the largest summed weight is the prediction (k = 20, T = 0.07 in DINO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels [Q] of ``queries`` [Q, D] from ``bank`` [N, D] with labels [N] (0..C-1).

    Features are L2-normalised here; ``k`` is capped at N. Computed in fp32, ``chunk`` queries at a time
    (memory Q_chunk × N).
    """
    if bank.shape[0] == 0:
        raise ValueError("the k-NN bank is empty")
    num_classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    bank = F.normalize(bank.float(), dim=-1)
    queries = F.normalize(queries.float(), dim=-1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T  # [q, N]
        top, idx = sim.topk(k, dim=1)  # [q, k]
        weights = (top / temperature).exp()  # [q, k]
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[idx], weights)  # [q, C] summed weight per class
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=queries.device)


def knn_correct(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                **kw) -> int:
    """How many ``queries`` the k-NN classifier labels correctly (see :func:`knn_predict`)."""
    if queries.shape[0] == 0:
        return 0
    return int((knn_predict(bank, bank_labels, queries, **kw) == query_labels).sum())
