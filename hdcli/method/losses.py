"""How a student's prediction is compared with a teacher's target (METHOD.md "Loss"): pure functions on tensors.

- ``smooth_l1`` (the paper's, FD and dBOT): SmoothL1 with β = 2, mean over all elements.
- ``cosine`` (AM-RADIO's summary loss; UNIC, DUNE, Theia): 1 − cos(prediction, target) per token (over its
  channels), mean over tokens.
- ``mse``: mean squared error over all elements (Theia, C-RADIO's feature loss).
- a weighted mix, ``[{kind = "cosine", weight = 0.9}, {kind = "smooth_l1", weight = 0.1}]`` (AM-RADIO's patch
  loss), is Σ weight · loss (:class:`LossSpec`).

Each loss takes [B, ...] tensors and returns the mean over all elements (a scalar), or with ``per_sample`` the mean
over each sample's elements ([B]: a target's loss weighed per image, for teacher dropping). Losses are computed in fp32 whatever the autocast dtype (as DUNE computes its losses): a bf16 subtraction of two close
targets loses most of its digits. A new loss is a function here, its entry in ``LOSSES`` and its test in
tests/test_losses.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hdcli.errors import HDError

BETA = 2.0  # the paper's SmoothL1 beta (as FD and dBOT)


def _reduce(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1) if per_sample else x.mean()


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float = BETA, per_sample: bool = False) -> torch.Tensor:
    """SmoothL1 with ``beta`` (0.5·d²/β below β, d − β/2 above), mean over all elements (or each sample's), fp32."""
    if not per_sample:  # the paper's loss, as it always was computed
        return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
    return _reduce(F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="none"), True)


def cosine(pred: torch.Tensor, target: torch.Tensor, beta: float = BETA, per_sample: bool = False) -> torch.Tensor:
    """1 − cosine similarity of each token's prediction and target (over the last axis), mean over tokens, fp32."""
    return _reduce(1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1), per_sample)


def mse(pred: torch.Tensor, target: torch.Tensor, beta: float = BETA, per_sample: bool = False) -> torch.Tensor:
    """Mean squared error over all elements (or each sample's), fp32."""
    return _reduce((pred.float() - target.float()).pow(2), per_sample)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"smooth_l1": smooth_l1, "cosine": cosine, "mse": mse}


@dataclass(frozen=True)
class LossSpec:
    """A loss or a weighted mix of losses: ((kind, weight), ...)."""

    terms: tuple[tuple[str, float], ...] = (("smooth_l1", 1.0),)

    @classmethod
    def of(cls, spec) -> LossSpec:
        """A name, a table ``{kind, weight}``, a list of them or a LossSpec -> LossSpec (HDError on a bad one)."""
        if isinstance(spec, LossSpec):
            return spec
        items = spec if isinstance(spec, list | tuple) else [spec]
        if not items:
            raise HDError("an empty loss mix", 'give a loss, e.g. loss = "smooth_l1"')
        terms = []
        for item in items:
            if isinstance(item, str):
                item = {"kind": item}
            if not isinstance(item, dict) or "kind" not in item or set(item) - {"kind", "weight"}:
                raise HDError(f"a loss is a name or a table {{kind, weight}}, got {item!r}",
                              'e.g. loss = [{kind = "cosine", weight = 0.9}, {kind = "smooth_l1", weight = 0.1}]')
            if item["kind"] not in LOSSES:
                raise HDError(f"unknown loss kind {item['kind']!r}", f"use one of: {', '.join(LOSSES)}")
            w = item.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0 or w == float("inf"):
                raise HDError(f"a loss weight must be a finite number ≥ 0, got {w!r}")
            terms.append((str(item["kind"]), float(w)))
        if not sum(w for _, w in terms) > 0:
            raise HDError(f"the weights of the loss mix {[dict(kind=k, weight=w) for k, w in terms]} sum to 0",
                          "give at least one loss a weight > 0")
        return cls(tuple(terms))

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, beta: float = BETA,
                 per_sample: bool = False) -> torch.Tensor:
        """Σ weight · loss(pred, target) (a single loss of weight 1 is that loss itself)."""
        if len(self.terms) == 1 and self.terms[0][1] == 1.0:
            return LOSSES[self.terms[0][0]](pred, target, beta, per_sample)
        return sum(w * LOSSES[k](pred, target, beta, per_sample) for k, w in self.terms)
