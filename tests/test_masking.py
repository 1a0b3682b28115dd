"""Keep sets (hdcli.method.masking) against hand computations and a per-image loop reference of METHOD.md."""

from __future__ import annotations

import math

import pytest
import torch

from hdcli.errors import HDError
from hdcli.method import masking

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_progressive(hiddens: list[torch.Tensor], r: float) -> list[list[int]]:
    """METHOD.md literally, one image at a time: cosine to the mean of the kept tokens, drop the most similar."""
    out = []
    for img in range(hiddens[0].shape[0]):
        kept = list(range(hiddens[0].shape[1]))
        for h in hiddens:
            hk = h[img, kept].double()
            m = hk.mean(0)
            s = [float(hk[j] @ m / (hk[j].norm() * m.norm())) for j in range(len(kept))]
            n_new = math.floor(len(kept) * (1 - r) + 0.5)
            least = sorted(range(len(kept)), key=lambda j: s[j])[:n_new]
            kept = sorted(kept[j] for j in least)
        out.append(kept)
    return out


def keep_set(strategy: str, hiddens: list[torch.Tensor], r: float) -> torch.Tensor:
    """The keep set of ``strategy`` with one mask block per hidden state (the paper's progressive steps)."""
    m = masking.Masking(strategy, r, tuple(range(len(hiddens))))
    b, n, _ = hiddens[0].shape
    given = [hiddens[i] for i in m.teacher_blocks(n)]  # what the teacher pass hands over
    return masking.keep_set(m, given, batch=b, n=n)


def test_counts_follow_the_paper_196_137_96_67():
    assert [masking.keep_count(196, 0.3, k) for k in range(4)] == [196, 137, 96, 67]


def test_tab8_ratios_50_and_90_percent():
    assert masking.keep_count(196, 0.5, 3) == 25  # 196 -> 98 -> 49 -> 25 (13%)
    assert masking.keep_count(196, 0.1, 3) == 142  # 196 -> 176 -> 158 -> 142 (72%)


def test_one_step_by_hand():
    # mean (0.25, 0.5); cosines 0.447, 0.894, 0.949, -0.447 -> token 2 is the most similar, then token 1
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    keep = masking.all_patches(1, 4)
    assert masking.drop_redundant(h, keep, 3).tolist() == [[0, 1, 3]]
    assert masking.drop_redundant(h, keep, 2).tolist() == [[0, 3]]


def test_tokens_identical_to_the_mean_are_dropped_first():
    torch.manual_seed(0)
    others = torch.randn(7, 16)
    h = torch.empty(10, 16)
    copies = [1, 4, 8]
    rest = [i for i in range(10) if i not in copies]
    h[rest] = others
    h[copies] = others.mean(0)  # the mean of all ten tokens is still the mean of the seven
    keep = masking.progressive_keep([h[None]], 0.3)  # 10 -> 7
    assert keep.tolist() == [rest]


def test_progressive_equals_the_loop_reference():
    torch.manual_seed(1)
    hiddens = [torch.randn(3, 196, 16) for _ in range(3)]
    keep = masking.progressive_keep(hiddens, 0.3)
    assert keep.tolist() == ref_progressive(hiddens, 0.3)


def test_second_step_uses_only_the_kept_tokens():
    torch.manual_seed(2)
    hiddens = [torch.randn(2, 50, 8), torch.randn(2, 50, 8)]
    keep = masking.progressive_keep(hiddens, 0.3)
    first = masking.drop_redundant(hiddens[0], masking.all_patches(2, 50), 35)
    assert keep.tolist() == masking.drop_redundant(hiddens[1], first, 25).tolist()
    assert all(set(k) <= set(f) for k, f in zip(keep.tolist(), first.tolist(), strict=True))


def test_keep_sets_are_sorted_unique_and_in_range():
    torch.manual_seed(3)
    hiddens = [torch.randn(4, 196, 8) for _ in range(3)]
    for strategy in masking.STRATEGIES:
        keep = keep_set(strategy, hiddens, 0.3)
        for row in keep.tolist():
            assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < 196


def test_direct_and_random_keep_as_many_as_progressive():
    torch.manual_seed(4)
    hiddens = [torch.randn(2, 196, 8) for _ in range(3)]
    shapes = {s: tuple(keep_set(s, hiddens, 0.3).shape) for s in ("progressive", "direct", "random")}
    assert set(shapes.values()) == {(2, 67)}


def test_direct_is_one_step_at_the_last_mask_block():
    torch.manual_seed(5)
    hiddens = [torch.randn(2, 196, 8) for _ in range(3)]
    direct = keep_set("direct", hiddens, 0.3)
    one_step = masking.drop_redundant(hiddens[-1], masking.all_patches(2, 196), 67)
    assert direct.tolist() == one_step.tolist()


def test_random_without_hidden_states_differs_per_image():
    torch.manual_seed(6)
    keep = masking.keep_set(masking.Masking("random", 0.3, (0, 4, 8)), [], batch=8, n=196)
    assert keep.shape == (8, 67)
    assert len({tuple(r) for r in keep.tolist()}) == 8


def test_none_and_zero_ratio_keep_everything():
    hiddens = [torch.randn(2, 20, 4) for _ in range(3)]
    for strategy in masking.STRATEGIES:
        assert keep_set(strategy, hiddens, 0.0).tolist() == [list(range(20))] * 2
    assert keep_set("none", hiddens, 0.3).tolist() == [list(range(20))] * 2


def test_keep_count_does_not_depend_on_the_data():
    shapes = {tuple(masking.progressive_keep([torch.randn(2, 64, 4) * s for _ in range(3)], 0.3).shape)
              for s in (1e-3, 1.0, 1e3)}
    assert shapes == {(2, masking.keep_count(64, 0.3, 3))}


def test_ties_keep_the_lower_index():
    h = torch.ones(1, 6, 4)  # every token identical: all cosines equal
    assert masking.progressive_keep([h], 0.5).tolist() == [[0, 1, 2]]


def test_bad_strategy_and_ratio_are_user_errors():
    with pytest.raises(HDError, match="progressive"):
        masking.Masking("progresive", 0.3)
    with pytest.raises(HDError, match="outside"):
        masking.check_drop_ratio(1.0)


def test_step_counts_are_exact_on_the_whole_grid():
    # METHOD.md: n' = floor(n(1 - r) + 0.5); with r = k/10 that is (20n - 2kn + 10) // 20 in integers.
    # Floats disagree on 119 of these pairs (45 * 0.7 + 0.5 = 31.999...: 31 instead of 32).
    for k in range(1, 10):
        for n in range(1, 1025):
            assert masking.step_count(n, k / 10) == max(1, (20 * n - 2 * k * n + 10) // 20), (n, k)


def test_the_64_patch_tiny_setting_keeps_45_32_22():
    assert [masking.keep_count(64, 0.3, s) for s in range(4)] == [64, 45, 32, 22]


def test_nothing_is_dropped_is_decided_by_the_masking_settings_alone():
    assert masking.Masking("none", 0.3).keep_count(196) == 196 and not masking.Masking("none", 0.3).drops(196)
    assert masking.Masking("progressive", 0.0).teacher_blocks(196) == ()
    assert masking.Masking("progressive", 0.3, ()).keep_count(196) == 196
    assert masking.Masking("random", 0.3).teacher_blocks(196) == () and masking.Masking("random", 0.3).drops(196)
    assert masking.Masking("direct", 0.3).teacher_blocks(196) == (8,)
    assert masking.Masking("progressive", 0.3, (8, 0, 4, 4)).teacher_blocks(196) == (0, 4, 8)
    assert masking.Masking("progressive", 0.9).drops(1) is False  # 1 patch: at least one is always kept
