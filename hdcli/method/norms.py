"""How a feature-like target is normalised before the loss (METHOD.md "Loss"; docs/method.md "Target normalisation").

- ``layernorm`` (the paper's): each token over its channels, no affine parameters, eps 1e-6.
- ``standardize`` (as UNIC): each channel by running statistics of the teacher's tokens, ``(f − μ) / √(σ² + eps)``,
  one set over all of a target's tokens.
- ``standardize_roles`` (UNIC's exact choice): the same with one set of statistics for the summary token (the
  CLS, or a teacher's pooled summary) and one for the other tokens.
- ``phis`` (PHI-S, as AM-RADIO): rotate the centred features into the covariance's eigenbasis, then by a Hadamard
  matrix, and divide by one scale: ``y = H Uᵀ (f − μ) / φ`` with ``Σ = U Λ Uᵀ`` and ``φ² = mean(Λ)``. Every output
  channel then has variance exactly 1 (``diag(H Λ Hᵀ) = mean(Λ)``), whatever the teacher's spectrum.

Statistics are buffers (checkpointed, resumed), fp64, outside autocast, all-reduced over ranks as counts, means and
centred second moments (Chan's parallel update: ranks with different token counts, channels with large offsets and
near-constant channels give the one-process numbers). ``standardize``: exponential moving averages over training
batches (``MOMENTUM``; the first batch sets them). ``phis``: over its first ``PHIS_STEPS`` training batches it
standardises per channel with the statistics pooled over the batches so far (no rotation: a basis that kept turning
would be a moving target for the head), then computes its transform once from the pooled covariance of the whole
window and keeps it (AM-RADIO's ``phi_s.py`` computes it once, from a fixed sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdcli.errors import HDError

NORMS = ("layernorm", "standardize", "standardize_roles", "phis")
MOMENTUM = 0.99  # weight of the running statistics against a new batch's (standardize)
PHIS_STEPS = 200  # training batches whose pooled statistics PHI-S computes its transform from, then fixes it
EPS = 1e-6


def layernorm(f: torch.Tensor) -> torch.Tensor:
    """Per-token LayerNorm without affine parameters (eps 1e-6). [.., D] -> [.., D] fp32."""
    return F.layer_norm(f.float(), f.shape[-1:], eps=EPS)


def standardize(f: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-channel standardisation: (f − mean) / √(var + eps). f [.., C], mean/var [C] -> fp32 [.., C]."""
    return ((f.float() - mean) / torch.sqrt(var + EPS)).float()


# ---------------------------------------------------------------- Hadamard matrices

def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = χ(j − i) over GF(q), q prime (χ: the quadratic character). [q, q] float64."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley's construction I (m = q + 1, q prime ≡ 3 mod 4) or II (m = 2(q + 1),
    q prime ≡ 1 mod 4); None when neither applies. Entries ±1."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # I: I + [[0, 1ᵀ], [−1, Q]]
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # II: C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]]
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An orthonormal Hadamard matrix of order n (entries ±1/√n, H Hᵀ = I), float64, or None when hd has no
    construction for n: Sylvester's doubling of a Paley matrix (I or II) of order n / 2^k. That covers every width
    of timm's ViT and Eva models (64 … 4096, 832 = 8·104, 2432 = 32·76, ...)."""
    m, k = n, 0
    while True:
        h = _paley(m)
        if h is not None:
            break
        if m % 2 or m <= 1:
            return None
        m, k = m // 2, k + 1
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):  # the base (doubling keeps H Hᵀ = nI)
        return None
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def rotation(n: int) -> tuple[torch.Tensor, bool]:
    """PHI-S's rotation of order n: a Hadamard matrix (exact: every output channel gets variance 1), or, for an
    order hd cannot build one of, a fixed random orthogonal matrix (AM-RADIO's fallback: the output channels'
    variances average 1 but are not all exactly 1). -> (float64 [n, n], exact)."""
    h = hadamard(n)
    if h is not None:
        return h, True
    g = torch.Generator().manual_seed(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], False


def phis_transform(cov: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The PHI-S matrix A = H Uᵀ / φ of a covariance Σ = U Λ Uᵀ (φ² = mean of the eigenvalues). [C, C] -> [C, C].

    Each eigenvector's sign is fixed (its largest-magnitude entry positive), so that the same covariance always
    gives the same transform."""
    evals, evecs = torch.linalg.eigh(cov.double())
    pivot = evecs.abs().argmax(dim=0, keepdim=True)  # [1, C]
    evecs = evecs * evecs.gather(0, pivot).sign()
    phi = evals.clamp_min(0).mean().sqrt().clamp_min(EPS)
    return h.to(evecs) @ evecs.T / phi


def phis(f: torch.Tensor, mean: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """PHI-S of f [.., C]: (f − mean) Aᵀ with A from :func:`phis_transform`. -> fp32 [.., C]."""
    return ((f.double() - mean) @ transform.T).float()


# ---------------------------------------------------------------- statistics: one batch, all ranks, pooled

def moments(flat: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, mean [C], centred second moment Σ (x − mean)² [C] or Σ (x − mean)(x − mean)ᵀ [C, C]) of flat
    [M, C], in fp64, over every rank when torch.distributed is initialised: the means are combined weighted by
    each rank's token count, then each rank's second moment is centred on the global mean (Chan et al.), so the
    numbers equal one process's over all the tokens, whatever their offsets and counts."""
    import torch.distributed as dist

    x = flat.double()
    n = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
    s = x.sum(0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.cat([n, s])
        dist.all_reduce(both)
        n, s = both[:1], both[1:]
    mean = s / n.clamp_min(1)
    d = x - mean
    m2 = d.t() @ d if full else (d * d).sum(0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(m2)
    return n[0], mean, m2


def merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's parallel update: the pooled (tokens, mean, centred second moment) of two sets."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    outer = torch.outer(delta, delta) if m2_a.dim() == 2 else delta * delta
    return n, mean, m2_a + m2_b + outer * (n_a * n_b / n)


class RunningNorm(nn.Module):
    """Running statistics of one target's channels and the normalisation they give (``standardize``,
    ``standardize_roles`` or ``phis``; the module docstring says how each is estimated).

    In training mode each call first folds the batch's statistics (over all its tokens, and over all ranks) into
    the running ones, then normalises with them; in eval mode the stored statistics are used as they are.
    ``summary``: rows at the start of each sample that are summary tokens (``standardize_roles`` gives them
    statistics of their own). Statistics are fp64 buffers, outside autocast; no host sync per step (the PHI-S
    window is counted on the host once, after a load).
    """

    def __init__(self, kind: str, dim: int, momentum: float = MOMENTUM, summary: int = 0):
        super().__init__()
        if kind not in NORMS[1:]:
            raise HDError(f"unknown running normalisation {kind!r}", f"use one of: {', '.join(NORMS)}")
        self.kind, self.momentum, self.summary = kind, float(momentum), int(summary)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # training batches folded in
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        if kind == "standardize_roles":
            self.register_buffer("summary_mean", torch.zeros(dim, dtype=torch.float64))
            self.register_buffer("summary_var", torch.ones(dim, dtype=torch.float64))
        if kind == "phis":
            h, self.exact = rotation(dim)
            self.register_buffer("rotation", h, persistent=False)
            self.register_buffer("tokens", torch.zeros((), dtype=torch.float64))  # pooled over the window
            self.register_buffer("m2", torch.zeros(dim, dim, dtype=torch.float64))
            self.register_buffer("transform", torch.eye(dim, dtype=torch.float64))
        self._seen: int | None = None  # a host copy of ``count`` (read once), so that no step syncs

    def _load_from_state_dict(self, *args, **kwargs):
        self._seen = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def fixed(self) -> bool:
        """PHI-S: whether the window is over and the transform fixed (read on the host once, then counted)."""
        if self._seen is None:
            self._seen = int(self.count)
        return self._seen >= PHIS_STEPS

    def _ema(self, mean_buf, var_buf, f: torch.Tensor) -> None:
        n, mean, m2 = moments(f.reshape(-1, f.shape[-1]), full=False)
        w = (self.count > 0).double() * self.momentum  # the first batch sets the statistics (no host sync)
        mean_buf.copy_(w * mean_buf + (1 - w) * mean)
        var_buf.copy_(w * var_buf + (1 - w) * m2 / n.clamp_min(1))

    def _update(self, f: torch.Tensor) -> None:
        if self.kind == "standardize":
            self._ema(self.mean, self.var, f)
        elif self.kind == "standardize_roles":
            self._ema(self.summary_mean, self.summary_var, f[:, :self.summary])
            self._ema(self.mean, self.var, f[:, self.summary:])
        else:  # phis: pool the window's statistics exactly; at its end, the transform once
            n, mean, m2 = moments(f.reshape(-1, f.shape[-1]), full=True)
            tokens, pooled, pooled_m2 = merge(self.tokens, self.mean, self.m2, n, mean, m2)
            self.tokens.copy_(tokens)
            self.mean.copy_(pooled)
            self.m2.copy_(pooled_m2)
            self.var.copy_(torch.diagonal(pooled_m2) / tokens)
            if self._seen + 1 == PHIS_STEPS:
                self.transform.copy_(phis_transform(pooled_m2 / tokens, self.rotation))
        self.count += 1
        self._seen += 1  # forward read it on the host before the first update

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, T, C] (a teacher's target) -> fp32 [B, T, C]."""
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            if self.training and (self.kind != "phis" or not self.fixed):
                if self._seen is None:
                    self._seen = int(self.count)
                with torch.no_grad():
                    self._update(f)
            if self.kind == "phis":
                return phis(f, self.mean, self.transform) if self.fixed else standardize(f, self.mean, self.var)
            if self.kind == "standardize_roles" and self.summary:
                return torch.cat([standardize(f[:, :self.summary], self.summary_mean, self.summary_var),
                                  standardize(f[:, self.summary:], self.mean, self.var)], dim=1)
            return standardize(f, self.mean, self.var)
