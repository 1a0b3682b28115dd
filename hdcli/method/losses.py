"""How a student's prediction is compared with a teacher's target (METHOD.md "Loss"): pure functions on tensors.

Every loss returns a scalar, the mean over all elements, computed in fp32 whatever the autocast dtype (as DUNE
computes its losses): a bf16 subtraction of two close targets loses most of its digits. ``LOSSES`` names them
for the config (``[[distill.targets]] loss = ...``); a new loss is a function here, its entry in ``LOSSES`` and
its test in tests/test_losses.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

BETA = 2.0  # the paper's SmoothL1 beta (as FD and dBOT)


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """SmoothL1 with ``beta`` (0.5·d²/β below β, d − β/2 above), mean over all elements, in fp32."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"smooth_l1": smooth_l1}
