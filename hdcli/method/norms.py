"""How a feature-like target is normalised before the loss (METHOD.md "Loss"; docs/method.md "Target normalisation").

- ``layernorm`` (the paper's): each token over its channels, no affine parameters, eps 1e-6.
- ``standardize`` (as UNIC): each channel by running statistics of the teacher's tokens, ``(f − μ) / √(σ² + eps)``.
- ``phis`` (PHI-S, as AM-RADIO): rotate the centred features into the covariance's eigenbasis, then by a Hadamard
  matrix, and divide by one scale: ``y = H Uᵀ (f − μ) / φ`` with ``Σ = U Λ Uᵀ`` and ``φ² = mean(Λ)``. Every output
  channel then has variance exactly 1 (``diag(H Λ Hᵀ) = mean(Λ)``), whatever the teacher's spectrum.

Running statistics are exponential moving averages over training batches (``MOMENTUM``; the first batch sets them),
kept as buffers, so they are checkpointed and resumed with the run; PHI-S fixes its transform after ``PHIS_STEPS``.
Teachers with very different feature scales otherwise weigh very differently in a summed loss. The pure functions below take tensors; ``RunningNorm`` holds
the statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdcli.errors import HDError

NORMS = ("layernorm", "standardize", "phis")
MOMENTUM = 0.99  # weight of the running statistics against a new batch's
PHIS_STEPS = 200  # training batches whose statistics PHI-S estimates its transform from, then fixes it
EPS = 1e-6


def layernorm(f: torch.Tensor) -> torch.Tensor:
    """Per-token LayerNorm without affine parameters (eps 1e-6). [.., D] -> [.., D] fp32."""
    return F.layer_norm(f.float(), f.shape[-1:], eps=EPS)


def standardize(f: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-channel standardisation: (f − mean) / √(var + eps). f [.., C], mean/var [C] -> fp32 [.., C]."""
    return (f.float() - mean) / torch.sqrt(var + EPS)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order n (entries ±1/√n, H Hᵀ = I), float64.

    Built as Sylvester's doubling of 1, or of Paley's construction I of order q + 1 (q prime, q ≡ 3 mod 4): that
    covers every power of 2 and widths such as 12·2^k (48, 768, 1536), 20·2^k (1280) and 44·2^k (1408).
    """
    m, k = n, 0
    while m % 2 == 0 and m > 1 and not (_is_prime(m - 1) and (m - 1) % 4 == 3):
        m, k = m // 2, k + 1
    if m == 1:
        h = torch.ones(1, 1, dtype=torch.float64)
    elif _is_prime(m - 1) and (m - 1) % 4 == 3:
        q = m - 1
        squares = {(i * i) % q for i in range(1, q)}
        chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)], dtype=torch.float64)
        idx = torch.arange(q)
        jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q_ij = χ(j − i)
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
        h = s + torch.eye(m, dtype=torch.float64)
    else:
        raise HDError(f"PHI-S needs a Hadamard matrix of order {n}, and hd has no construction for it",
                      "use norm = \"standardize\" for this target (or a teacher width of 2^k, 12·2^k, 20·2^k, ...)")
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def phis_transform(cov: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The PHI-S matrix A = H Uᵀ / φ of a covariance Σ = U Λ Uᵀ (φ² = mean of the eigenvalues). [C, C] -> [C, C].

    Each eigenvector's sign is fixed (its largest-magnitude entry positive): ``eigh`` may return either sign, and
    the Hadamard rotation would spread one flip over every output channel.
    """
    evals, evecs = torch.linalg.eigh(cov.double())
    pivot = evecs.abs().argmax(dim=0, keepdim=True)  # [1, C]
    evecs = evecs * evecs.gather(0, pivot).sign()
    phi = evals.clamp_min(0).mean().sqrt().clamp_min(EPS)
    return (h.to(evecs) @ evecs.T / phi).to(cov.dtype)


def phis(f: torch.Tensor, mean: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """PHI-S of f [.., C]: (f − mean) Aᵀ with A from :func:`phis_transform`. -> fp32 [.., C]."""
    return (f.float() - mean) @ transform.T


class RunningNorm(nn.Module):
    """Running statistics of one target's channels and the normalisation they give (``standardize`` or ``phis``).

    In training mode each call first folds the batch's statistics (over all its tokens, and over all ranks when
    torch.distributed is initialised) into the running ones, then normalises with them; in eval mode the stored
    statistics are used as they are. ``phis`` estimates its statistics over the first ``PHIS_STEPS`` training
    batches, recomputing the transform each time, then keeps it fixed (as AM-RADIO fixes it before training): a
    target whose basis kept turning would be a moving target for the head. Statistics are fp32, outside autocast.
    """

    def __init__(self, kind: str, dim: int, momentum: float = MOMENTUM):
        super().__init__()
        if kind not in NORMS[1:]:
            raise HDError(f"unknown running normalisation {kind!r}", f"use one of: {', '.join(NORMS)}")
        self.kind, self.momentum = kind, float(momentum)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # training batches folded in
        self.register_buffer("mean", torch.zeros(dim))
        if kind == "standardize":
            self.register_buffer("var", torch.ones(dim))
        else:
            self.register_buffer("cov", torch.eye(dim))
            self.register_buffer("hadamard", hadamard(dim).float(), persistent=False)
            self.register_buffer("transform", self.hadamard.clone())
        self._seen: int | None = None  # a host copy of ``count`` (read once), so that no step syncs

    def _load_from_state_dict(self, *args, **kwargs):
        self._seen = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _active(self) -> bool:
        if self.kind == "standardize":
            return True
        if self._seen is None:
            self._seen = int(self.count)
        return self._seen < PHIS_STEPS

    def _moments(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [C] and variance [C] (standardize) or covariance [C, C] (phis) of flat [M, C], over all ranks."""
        import torch.distributed as dist

        def outer(m):
            return m * m if self.kind == "standardize" else torch.outer(m, m)

        mean = flat.mean(0)
        second = flat.var(0, unbiased=False) if self.kind == "standardize" else torch.cov(flat.T, correction=0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([mean, (second + outer(mean)).flatten()])  # raw moments add up over ranks
            dist.all_reduce(both)  # every rank has the same number of tokens
            both /= dist.get_world_size()
            mean = both[: mean.numel()]
            second = both[mean.numel():].reshape(second.shape) - outer(mean)
        return mean, second

    def _update(self, f: torch.Tensor) -> None:
        mean, second = self._moments(f.reshape(-1, f.shape[-1]))
        m = (self.count > 0).float() * self.momentum  # the first batch sets the statistics (no host sync)
        self.mean.copy_(m * self.mean + (1 - m) * mean)
        stat = self.var if self.kind == "standardize" else self.cov
        stat.copy_(m * stat + (1 - m) * second)
        if self.kind == "phis":
            self.transform.copy_(phis_transform(self.cov, self.hadamard))
        self.count += 1
        if self._seen is not None:
            self._seen += 1

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, T, C] (a teacher's target) -> fp32 [B, T, C]."""
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            if self.training and self._active():
                with torch.no_grad():
                    self._update(f)
            if self.kind == "standardize":
                return standardize(f, self.mean, self.var)
            return phis(f, self.mean, self.transform)
