"""hdcli.tools.analyze and `hd analyze`: metrics against hand computations, the hooked runner against a
direct loop over timm's blocks, plots and JSON, and the CLI end to end on a tiny student dir."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_vit
from PIL import Image

from hdcli.errors import HDError
from hdcli.tools import analyze


def _images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of differing, non-square sizes (exercise resize + centre crop)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 56), (64, 36), (33, 33), (50, 70)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


# --- pure metrics -----------------------------------------------------------------------------


def test_identity_attention_has_distance_zero():
    attn = torch.eye(16).expand(2, 3, 16, 16)
    dist = analyze.patch_distances((4, 4), (16, 16))
    assert torch.equal(analyze.head_distance(attn, dist), torch.zeros(2, 3))


def test_identity_attention_has_nmi_one():
    attn = torch.eye(16).expand(2, 3, 16, 16)
    torch.testing.assert_close(analyze.nmi(attn), torch.ones(2, 3))


def test_uniform_attention_distance_is_mean_pairwise_distance():
    rows, cols, p = 4, 6, 16
    n = rows * cols
    attn = torch.full((1, 2, n, n), 1 / n)
    # closed form: offsets (dr, dc) occur (rows-|dr|)(cols-|dc|) times among the n² ordered pairs
    total = sum((rows - abs(dr)) * (cols - abs(dc)) * p * math.hypot(dr, dc)
                for dr in range(-rows + 1, rows) for dc in range(-cols + 1, cols))
    expected = torch.full((1, 2), total / n**2)
    torch.testing.assert_close(analyze.head_distance(attn, analyze.patch_distances((rows, cols), (p, p))), expected)


def test_uniform_attention_on_2x2_grid_is_2_plus_sqrt2_patches():
    attn = torch.full((1, 1, 4, 4), 0.25)
    got = analyze.head_distance(attn, analyze.patch_distances((2, 2), (4, 4)))
    # 4 self pairs at 0, 8 side pairs at 4 px, 4 diagonal pairs at 4√2 px, over 16
    torch.testing.assert_close(got, torch.tensor([[4 * (2 + math.sqrt(2)) / 4]]))


def test_uniform_attention_has_nmi_zero():
    attn = torch.full((1, 2, 10, 10), 0.1)
    torch.testing.assert_close(analyze.nmi(attn), torch.zeros(1, 2))


def test_nmi_matches_definition_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    p_k = [0.75, 0.25]
    mutual = sum(0.5 * a[q, k].item() * math.log(a[q, k].item() / p_k[k])
                 for q in range(2) for k in range(2) if a[q, k] > 0)
    h_k = -sum(p * math.log(p) for p in p_k)
    expected = mutual / math.sqrt(math.log(2) * h_k)
    torch.testing.assert_close(analyze.nmi(a[None, None]), torch.tensor([[expected]]))


def test_nmi_of_near_uniform_attention_keeps_float32_precision():
    torch.manual_seed(0)
    attn = (0.01 * torch.randn(2, 3, 64, 64)).softmax(-1)  # NMI ~ 1e-5
    expected = analyze.nmi(attn.double())
    assert (expected > 0).all()
    torch.testing.assert_close(analyze.nmi(attn).double(), expected, rtol=1e-3, atol=0)


def test_nmi_is_zero_when_all_attend_one_key():
    attn = torch.zeros(1, 1, 5, 5)
    attn[..., 2] = 1
    assert analyze.nmi(attn).item() == 0


def test_attention_probs_drops_cls_and_renormalises():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # [1, 1, 3 = CLS + 2, 2]
    k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]]]])
    logits = (q[0, 0] * 0.5) @ k[0, 0].T  # [3, 3]
    full = logits.softmax(-1)[1:, 1:]
    expected = full / full.sum(-1, keepdim=True)
    got = analyze.attention_probs(q @ k.transpose(-2, -1), 0.5, num_prefix_tokens=1)
    torch.testing.assert_close(got[0, 0], expected)


def test_query_index_maps_fractions_to_patches():
    assert analyze.query_index((0.5, 0.5), (8, 8)) == 4 * 8 + 4
    assert analyze.query_index((1.0, 1.0), (8, 8)) == 63
    assert analyze.query_index((0.9, 0.0), (4, 8)) == 7


def test_crop_resizes_shorter_side_and_takes_the_centre():
    arr = np.zeros((32, 96, 3), dtype=np.uint8)
    arr[:, :, 2] = 255  # blue sides
    arr[:, 32:64] = (255, 0, 0)  # red centre third
    out = analyze.crop([Image.fromarray(arr)], 16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out[0, :, 4:12, 4:12], torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None].expand(3, 8, 8))


# --- runner ----------------------------------------------------------------------------------


def _direct(model, images, metric):
    """Loop-based reference: run timm's blocks one by one, recompute q·kᵀ from norm1 + qkv, and
    evaluate the metric query by query (no hooks, no shared code with the runner)."""
    mean = torch.tensor(model.pretrained_cfg["mean"])[:, None, None]
    std = torch.tensor(model.pretrained_cfg["std"])[:, None, None]
    x = (analyze.crop(images, 32).float() / 255 - mean) / std
    prefix = model.num_prefix_tokens
    cols = 32 // 4  # patch grid columns (img 32, patch 4)
    out = torch.zeros(len(model.blocks), len(images), TINY["num_heads"], dtype=torch.float64)
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for b, blk in enumerate(model.blocks):
            a = blk.attn
            qkv = a.qkv(blk.norm1(h)).reshape(h.shape[0], h.shape[1], 3, a.num_heads, a.head_dim)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, H, T, d]
            full = torch.softmax(q @ k.transpose(-2, -1) * a.head_dim**-0.5, dim=-1).double()
            for i in range(len(images)):
                for hd in range(a.num_heads):
                    att = full[i, hd, prefix:, prefix:]
                    att = att / att.sum(-1, keepdim=True)
                    n = att.shape[0]
                    if metric == "head_distance":
                        vals = []
                        for qi in range(n):
                            d = torch.tensor([4 * math.hypot(qi // cols - kj // cols, qi % cols - kj % cols)
                                              for kj in range(n)], dtype=torch.float64)
                            vals.append((att[qi] * d).sum())
                        out[b, i, hd] = torch.stack(vals).mean()
                    else:
                        p_k = att.mean(0)
                        mutual = sum((att[qi][att[qi] > 0] / n * torch.log(att[qi][att[qi] > 0] / p_k[att[qi] > 0])).sum()
                                     for qi in range(n))
                        h_k = -(p_k * p_k.log()).sum()
                        out[b, i, hd] = mutual / torch.sqrt(h_k * math.log(n))
            h = blk(h)
    return out.mean(1)  # [L, H]


@pytest.mark.parametrize("metric", ["head_distance", "nmi"])
def test_measure_equals_direct_loop_on_tiny_vit(metric):
    model, images = tiny_vit(seed=1), _images(2)
    got = analyze.measure(model, images, metric, batch_size=2)
    torch.testing.assert_close(torch.tensor(got["per_head"], dtype=torch.float64), _direct(model, images, metric),
                               rtol=1e-4, atol=1e-5)


def test_measure_drops_register_tokens_too():
    model, images = tiny_vit(seed=2, reg_tokens=2), _images(2)
    got = analyze.measure(model, images, "head_distance", batch_size=2)
    torch.testing.assert_close(torch.tensor(got["per_head"], dtype=torch.float64),
                               _direct(model, images, "head_distance"), rtol=1e-4, atol=1e-5)


def test_chunking_does_not_change_the_numbers():
    model, images = tiny_vit(seed=3), _images(3)
    whole = analyze.measure(model, images, "nmi", batch_size=3)
    one_by_one = analyze.measure(model, images, "nmi", batch_size=1)
    torch.testing.assert_close(torch.tensor(one_by_one["per_head"]), torch.tensor(whole["per_head"]))


def test_tap_leaves_the_model_output_unchanged_and_removes_its_hooks():
    model = tiny_vit(seed=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_features(x)
        with analyze.attention_tap(model, lambda b, a: None) as fired:
            during = model.forward_features(x)
        after = model.forward_features(x)
    assert fired == set(range(12))
    assert torch.equal(before, during) and torch.equal(before, after)
    assert not any(m._forward_hooks for m in model.modules())


def test_unsupported_attention_is_a_user_error():
    model = tiny_vit()
    model.blocks[3].attn = torch.nn.Identity()
    with pytest.raises(HDError, match="block 3"):
        analyze.measure(model, _images(1), "nmi")


def test_attention_maps_are_rows_of_the_attention():
    model, images = tiny_vit(seed=5), _images(2)
    maps = analyze.attention_maps(model, images, [(0.5, 0.5), (0.0, 0.0)], [2, 11], batch_size=1)
    assert maps.shape == (2, 2, 2, 8, 8)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 2, 2))


def test_mean_std_come_from_the_model():
    model = tiny_vit()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    assert analyze.mean_std(model) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


# --- output ----------------------------------------------------------------------------------


def _check_schema(doc: dict, metric: str, n_images: int, depth: int, heads: int):
    assert set(doc) == {"metric", "images", "models"}
    assert doc["metric"] == metric and doc["images"] == n_images
    for entry in doc["models"].values():
        assert set(entry) == {"per_head", "per_block", "patch_size", "tokens"}
        assert len(entry["per_head"]) == depth and all(len(h) == heads for h in entry["per_head"])
        assert all(isinstance(v, float) for h in entry["per_head"] for v in h)
        assert len(entry["per_block"]) == depth
        assert entry["patch_size"] == 4 and entry["tokens"] == 64


def test_json_follows_the_schema(tmp_path):
    model, images = tiny_vit(), _images(2)
    entry = analyze.measure(model, images, "head_distance")
    path = tmp_path / "head_distance.json"
    analyze.write_json(path, "head_distance", 2, {"tiny": entry, "tiny2": entry})
    _check_schema(json.loads(path.read_text()), "head_distance", 2, depth=12, heads=3)


def test_per_block_is_the_mean_over_heads():
    entry = analyze.measure(tiny_vit(), _images(1), "nmi")
    torch.testing.assert_close(torch.tensor(entry["per_block"]), torch.tensor(entry["per_head"]).mean(1))


def test_metric_plot_is_a_valid_png(tmp_path):
    entry = {"per_head": [[1.0, 2.0, 3.0]] * 4, "per_block": [2.0] * 4, "patch_size": 4, "tokens": 64}
    path = tmp_path / "nmi.png"
    analyze.plot_metric("nmi", {"a": entry, "b": entry}, path, n_images=3)
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 300


def test_attention_plot_is_a_valid_png(tmp_path):
    crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps = torch.rand(2, 1, 3, 8, 8)
    path = tmp_path / "attention.png"
    analyze.plot_attention(crops, maps, [(0.5, 0.5)], [0, 5, 11], path, title="t")
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


# --- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def student_dir(tmp_path):
    """A run's student/ as the engine writes it: timm save_for_hf layout, safetensors."""
    from timm.models import save_for_hf

    path = tmp_path / "student"
    save_for_hf(tiny_vit(seed=7), path, safe_serialization=True, model_args={**TINY, "num_classes": 0})
    return path


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i, im in enumerate(_images(5, seed=ord(c))):
            im.save(root / c / f"{i}.png")
    return root


@pytest.fixture
def offline_env(tmp_path):
    cache = tmp_path / "hf"
    cache.mkdir()
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub")}


@pytest.mark.slow
def test_cli_head_distance_skips_missing_teacher(hd, student_dir, image_folder, tmp_path, offline_env):
    out = tmp_path / "a"
    r = hd("analyze", "head-distance", f"local-dir:{student_dir}", "deit", "--data", str(image_folder),
           "--images", "8", "--out", str(out), "--skip-missing", env=offline_env)
    assert r.returncode == 0, r.stderr
    assert "deit" in r.stderr and "skipping" in r.stderr
    doc = json.loads((out / "head_distance.json").read_text())
    _check_schema(doc, "head_distance", 8, depth=12, heads=3)
    assert list(doc["models"]) == [f"local-dir:{student_dir}"]
    with Image.open(out / "head_distance.png") as im:
        im.verify()


@pytest.mark.slow
def test_cli_missing_teacher_is_one_line_error_naming_it(hd, student_dir, image_folder, tmp_path, offline_env):
    r = hd("analyze", "head-distance", f"local-dir:{student_dir}", "deit", "--data", str(image_folder),
           "--images", "8", "--out", str(tmp_path / "a"), env=offline_env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "deit" in lines[0], r.stderr
    assert "--skip-missing" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_nmi_and_attention_write_their_files(hd, student_dir, image_folder, tmp_path, offline_env):
    out = tmp_path / "b"
    r = hd("analyze", "nmi", str(student_dir), "--data", str(image_folder), "--images", "4",
           "--out", str(out), env=offline_env)
    assert r.returncode == 0, r.stderr
    _check_schema(json.loads((out / "nmi.json").read_text()), "nmi", 4, depth=12, heads=3)
    r = hd("analyze", "attention", str(student_dir), "--data", str(image_folder), "--images", "2",
           "--query", "0.5,0.5", "--query", "0.1,0.9", "--blocks", "0,-1", "--out", str(out), env=offline_env)
    assert r.returncode == 0, r.stderr
    pngs = list(out.glob("attention_*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as im:
        im.verify()


def test_default_blocks_are_four_evenly_spaced_ending_with_the_last():
    from hdcli.commands.analyze import _parse_blocks

    assert _parse_blocks(None, tiny_vit(), "m") == [2, 5, 8, 11]
    assert _parse_blocks(None, tiny_vit(depth=24), "m") == [5, 11, 17, 23]


def test_negative_blocks_count_from_the_end():
    from hdcli.commands.analyze import _parse_blocks

    assert _parse_blocks("0,-1,-3", tiny_vit(), "m") == [0, 11, 9]


def test_block_out_of_range_is_a_user_error_naming_the_model():
    from hdcli.commands.analyze import _parse_blocks

    with pytest.raises(HDError, match="out of range for tiny"):
        _parse_blocks("12", tiny_vit(), "tiny")
