"""Target normalisation (hdcli.method.norms): Hadamard matrices, running standardisation (pooled and per token role),
PHI-S while it estimates and after, and statistics over several ranks (issue 24, items 1, 2, 4, 5)."""

import os

import pytest
import torch

from hdcli.method import norms

# every width of timm's ViT / Eva / DeiT / BEiT families in the pinned timm (num_features and embed_dim of every
# model of those families, built on the meta device), plus orders only Paley II gives
TIMM_WIDTHS = [64, 96, 192, 256, 320, 384, 512, 640, 768, 832, 896, 1024, 1152, 1280, 1408, 1536, 1664, 1792,
               2048, 2432, 3072, 4096]


def _orthonormal_hadamard(h, n):
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 28, 36, 48, 56, 64, 768, 1024])
def test_hadamard_matrices_are_orthonormal_with_equal_magnitude_entries(n):
    _orthonormal_hadamard(norms.hadamard(n), n)


def test_every_timm_vit_width_has_an_exact_hadamard_matrix():
    g = torch.Generator().manual_seed(0)
    for n in TIMM_WIDTHS:
        h, exact = norms.rotation(n)
        assert exact, n
        assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5)), n
        rows = torch.randperm(n, generator=g)[:16]  # orthonormal rows (checked on a sample: n³ is slow at 4096)
        torch.testing.assert_close(h[rows] @ h.T, torch.eye(n, dtype=torch.float64)[rows])


def test_an_order_without_a_construction_falls_back_to_a_fixed_random_rotation():
    assert norms.hadamard(52) is None and norms.hadamard(6) is None
    h, exact = norms.rotation(52)
    assert not exact
    torch.testing.assert_close(h @ h.T, torch.eye(52, dtype=torch.float64))
    again, _ = norms.rotation(52)
    assert torch.equal(h, again)  # the same matrix every time (a resumed run must get the same transform)
    rn = norms.RunningNorm("phis", 52)  # builds, no error
    assert not rn.exact


def test_standardize_uses_running_statistics_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, 3, generator=g) * torch.tensor([1.0, 10.0, 0.1]) + 3
    b = torch.randn(4, 5, 3, generator=g)
    rn = norms.RunningNorm("standardize", 3, momentum=0.9)
    torch.testing.assert_close(rn(a), (a - a.mean((0, 1))) / torch.sqrt(a.var((0, 1), unbiased=False) + 1e-6))
    mean = 0.9 * a.mean((0, 1)) + 0.1 * b.mean((0, 1))
    var = 0.9 * a.var((0, 1), unbiased=False) + 0.1 * b.var((0, 1), unbiased=False)
    torch.testing.assert_close(rn(b), (b - mean) / torch.sqrt(var + 1e-6))
    rn.eval()  # eval: the stored statistics, not updated
    torch.testing.assert_close(rn(a), (a - mean) / torch.sqrt(var + 1e-6))
    assert int(rn.count) == 2


def test_standardize_roles_keeps_the_summary_token_apart_by_hand():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(6, 9, 4, generator=g) * 2 + 1
    f[:, 0] = f[:, 0] * 30 + 100  # a CLS token on a very different scale from the patches
    rn = norms.RunningNorm("standardize_roles", 4, summary=1)
    y = rn(f)
    cls, patches = f[:, :1], f[:, 1:]
    by_hand = torch.cat([(cls - cls.mean((0, 1))) / torch.sqrt(cls.var((0, 1), unbiased=False) + 1e-6),
                         (patches - patches.mean((0, 1))) / torch.sqrt(patches.var((0, 1), unbiased=False) + 1e-6)],
                        dim=1)
    torch.testing.assert_close(y, by_hand)
    pooled = norms.RunningNorm("standardize", 4)(f)  # pooled statistics: the CLS dominates, the patches collapse
    assert pooled[:, 1:].std() < 0.2 < y[:, 1:].std()


def test_a_target_with_a_summary_token_is_standardised_per_role_and_one_without_is_not():
    from conftest import tiny_vit

    from hdcli.method import Distiller, Target

    teachers = {"cls": tiny_vit(depth=4, seed=1), "siglip": tiny_vit("vit_base_patch16_siglip_224", depth=4, seed=2),
                "gap": tiny_vit(depth=4, seed=3, class_token=False, global_pool="avg")}
    targets = [Target("cls", "features", norm="standardize_roles"),
               Target("siglip", "features", norm="standardize_roles"),  # no CLS: its pooled (MAP) summary first
               Target("gap", "features", norm="standardize_roles", pooled=False)]  # no summary row at all
    method = Distiller(tiny_vit(depth=4), teachers, targets, masking="none")
    assert {k: m.summary for k, m in method.norms.items()} == {"cls_features": 1, "siglip_features": 1, "gap_features": 0}
    out = method(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out.loss)


def test_phis_with_PHIS_STEPS_1_makes_every_channel_unit_variance_whatever_the_spectrum(monkeypatch):
    monkeypatch.setattr(norms, "PHIS_STEPS", 1)  # the transform from this one batch
    g = torch.Generator().manual_seed(1)
    c = 12
    mix = torch.randn(c, c, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, c, dtype=torch.float64)
    f = (torch.randn(2, 500, c, generator=g, dtype=torch.float64) @ mix.T + 5).float()  # very anisotropic
    rn = norms.RunningNorm("phis", c)
    y = rn(f).double().reshape(-1, c)
    flat = f.double().reshape(-1, c)
    cov = torch.cov(flat.T, correction=0)
    lam = torch.linalg.eigvalsh(cov)
    h = norms.hadamard(c)
    # by hand: y = H Uᵀ (f − μ) / φ, so cov(y) = H Λ Hᵀ / φ² with φ² = mean(Λ), whose diagonal is all ones
    want = h @ torch.diag(lam) @ h.T / lam.mean()
    torch.testing.assert_close(torch.cov(y.T, correction=0), want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.diagonal(want), torch.ones(c, dtype=torch.float64))
    torch.testing.assert_close(y.mean(0), torch.zeros(c, dtype=torch.float64), atol=1e-4, rtol=0)


def _power_law_batches(c, steps, g, tokens=197, batch=8):
    basis, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    scale = torch.arange(1, c + 1, dtype=torch.float64) ** -1.0  # a power-law spectrum
    mix = (basis * scale.sqrt()).float()
    offset = torch.randn(c, generator=g)
    make = lambda: torch.randn(batch, tokens, c, generator=g) @ mix.T + offset  # noqa: E731
    return make(), [make() for _ in range(steps)]


def test_phis_targets_hold_still_while_estimating_and_stay_fixed_after_and_on_resume(monkeypatch):
    """384 channels, 8 images × 197 tokens, a power-law spectrum: the targets a fixed probe batch gets move by a
    median ≤ 0.02 of their energy per step during the window (it was 0.29 with an EMA eigenbasis recomputed each
    step), not at all after it, and a resumed run gets the same transform."""
    steps = 40
    monkeypatch.setattr(norms, "PHIS_STEPS", steps)
    g = torch.Generator().manual_seed(5)
    probe, batches = _power_law_batches(384, steps + 3, g)
    rn = norms.RunningNorm("phis", 384)

    def probe_targets():
        rn.eval()
        y = rn(probe).double()
        rn.train()
        return y

    seen = []
    for i, b in enumerate(batches):
        rn(b)
        seen.append(probe_targets())
        if i == steps // 2:
            state = {k: v.clone() for k, v in rn.state_dict().items()}
    moves = [float((b - a).pow(2).sum() / a.pow(2).sum()) for a, b in zip(seen, seen[1:], strict=False)]
    window = torch.tensor(moves[:steps - 1])
    assert window.median() <= 0.02, window
    assert moves[steps:] == [0.0] * len(moves[steps:])  # fixed after the window
    assert int(rn.count) == steps
    # resumed half-way through the window: the rest of the window gives the same transform, bit for bit
    again = norms.RunningNorm("phis", 384)
    again.load_state_dict(state)
    for b in batches[steps // 2 + 1:]:
        again(b)
    assert torch.equal(again.transform, rn.transform) and torch.equal(again.mean, rn.mean)
    # and a resumed run after the window neither updates nor re-estimates
    after = norms.RunningNorm("phis", 384)
    after.load_state_dict(rn.state_dict())
    after(batches[0] * 5)
    assert torch.equal(after.transform, rn.transform) and int(after.count) == steps


# ------------------------------------------------------------------ several ranks = one process

def _rank(rank, world, port, steps, batches, counts, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    norms.PHIS_STEPS = steps
    start = sum(counts[:rank])
    for kind in KINDS:
        rn = norms.RunningNorm(kind, batches[0].shape[-1], momentum=0.9, summary=1)
        torch.save([rn(b[start:start + counts[rank]]) for b in batches], out / f"{kind}-{rank}.pt")
    dist.destroy_process_group()


KINDS = ("standardize", "standardize_roles", "phis")


def test_two_ranks_with_unequal_batches_normalise_as_one_process(tmp_path, monkeypatch):
    """Ranks of 5 and 3 samples (an unreadable image shrinks one rank's batch) against one process on the 8;
    channels offset by 1e2 and 1e3, and one near-constant channel (std 1e-4), which must not turn into NaN. (With
    raw fp32 moments all-reduced as E[x²] − E[x]², they differed by 0.25 at 1e3 and the flat channel was NaN.)"""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(7)
    c, steps, counts = 16, 2, [5, 3]
    scale, means = torch.ones(c), torch.full((c,), 1e3)
    means[: c // 2] = 1e2
    scale[3], means[3] = 1e-4, 5.0
    batches = [torch.randn(8, 11, c, generator=g) * scale + means for _ in range(steps + 2)]
    mp.spawn(_rank, args=(2, 29611, steps, batches, counts, tmp_path), nprocs=2, join=True)
    monkeypatch.setattr(norms, "PHIS_STEPS", steps)
    for kind in KINDS:
        one = norms.RunningNorm(kind, c, momentum=0.9, summary=1)
        want = [one(b) for b in batches]
        r0, r1 = (torch.load(tmp_path / f"{kind}-{r}.pt") for r in (0, 1))
        for w, a, b in zip(want, r0, r1, strict=True):
            got = torch.cat([a, b])
            assert torch.isfinite(got).all(), kind
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()), msg=kind)
