"""hdcli.models.vit taps on unmodified timm ViTs, checked against hand computations from the weights."""

from __future__ import annotations

import pytest
import torch

from hdcli.errors import HDError
from hdcli.models import vit

CLIP = "vit_base_patch16_clip_quickgelu_224"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    from conftest import tiny_vit

    return tiny_vit(CLIP, seed=0)


def entering_block(model, x: torch.Tensor, i: int) -> torch.Tensor:
    """What timm's own forward_features feeds to blocks[i] (captured by a pre-hook)."""
    seen = {}
    handle = model.blocks[i].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    return seen["x"]


def hand_relations(block, x: torch.Tensor) -> torch.Tensor:
    """q·kᵀ per head from the qkv weights, no scale. x: [B, T, D] -> [B, H, T, T]."""
    attn = block.attn
    h, dh = attn.num_heads, attn.head_dim
    a = block.norm1(x)
    qkv = a @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)  # [B, T, 3D]
    out = []
    for head in range(h):
        q = attn.q_norm(qkv[..., head * dh:(head + 1) * dh])
        k = attn.k_norm(qkv[..., h * dh + head * dh:h * dh + (head + 1) * dh])
        out.append(torch.einsum("btd,bsd->bts", q, k))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_relations_equal_unscaled_logits_from_qkv_weights(make_tiny_vit, qk_norm):
    model = make_tiny_vit(seed=1, qk_norm=qk_norm)
    x = torch.randn(2, 65, 48)
    with torch.no_grad():
        torch.testing.assert_close(vit.relations(model.blocks[3], x), hand_relations(model.blocks[3], x))


def test_relations_are_the_logits_of_the_fused_attention(make_tiny_vit):
    model = make_tiny_vit(seed=2)
    blk = model.blocks[5]
    assert blk.attn.fused_attn  # the model keeps timm's SDPA path
    x = torch.randn(2, 65, 48)
    with torch.no_grad():
        r = vit.relations(blk, x)  # [B, H, T, T]
        v = blk.attn.qkv(blk.norm1(x)).reshape(2, 65, 3, 3, 16)[:, :, 2].transpose(1, 2)  # [B, H, T, dh]
        manual = (r * blk.attn.scale).softmax(-1) @ v  # [B, H, T, dh]
        manual = blk.attn.proj(manual.transpose(1, 2).reshape(2, 65, 48))
        torch.testing.assert_close(manual, blk.attn(blk.norm1(x)), rtol=1e-4, atol=1e-5)


def test_the_tap_leaves_the_block_output_unchanged(make_tiny_vit):
    model = make_tiny_vit(seed=3)
    x = torch.randn(2, 65, 48)
    with torch.no_grad():
        before = model.blocks[4](x)
        vit.relations(model.blocks[4], x)
        torch.testing.assert_close(model.blocks[4](x), before, rtol=0, atol=0)


def test_relations_of_gathered_tokens_equal_the_full_relations_indexed(make_tiny_vit):
    model = make_tiny_vit(seed=4)
    x = torch.randn(2, 65, 48)
    keep = torch.tensor([[0, 5, 9, 63], [2, 3, 40, 41]])
    with torch.no_grad():
        full = vit.relations(model.blocks[9], x)
        part = vit.relations(model.blocks[9], vit.gather_tokens(x, keep))
    for b in range(2):
        s = [0] + [1 + k for k in keep[b].tolist()]
        torch.testing.assert_close(part[b], full[b][:, s][:, :, s], rtol=1e-5, atol=1e-5)


def test_gather_puts_cls_first_then_kept_patches():
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    keep = torch.tensor([[1, 3], [0, 2]])
    assert vit.gather_tokens(x, keep)[..., 0].tolist() == [[0, 2, 4], [5, 6, 8]]


def test_embed_is_what_timm_feeds_block_0_including_norm_pre(clip):
    x = torch.randn(2, 3, 32, 32)
    assert not isinstance(clip.norm_pre, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(vit.embed(clip, x)[0], entering_block(clip, x, 0))


def test_embed_kept_equals_gathering_the_full_embedding(clip):
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 7, 8, 30], [1, 2, 60, 63]])
    with torch.no_grad():
        torch.testing.assert_close(vit.embed_kept(clip, x, keep)[0], vit.gather_tokens(vit.embed(clip, x)[0], keep))


def test_run_blocks_taps_match_timm_and_stop_early(clip):
    x = torch.randn(2, 3, 32, 32)
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(clip.blocks)]
    with torch.no_grad():
        entering, leaving, feats = vit.run_blocks(clip, *vit.embed(clip, x), enter={4, 10}, leave={2})
    for h in hooks:
        h.remove()
    assert ran == list(range(10)) and feats is None
    torch.testing.assert_close(entering[10], entering_block(clip, x, 10))
    torch.testing.assert_close(leaving[2], entering_block(clip, x, 3))


def test_run_blocks_final_equals_forward_features(clip):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, _, feats = vit.run_blocks(clip, *vit.embed(clip, x), final=True)
        torch.testing.assert_close(feats, clip.forward_features(x))


def test_msa_is_the_attention_branch_before_the_residual(make_tiny_vit):
    blk = make_tiny_vit(seed=5).blocks[2]
    x = torch.randn(2, 65, 48)
    with torch.no_grad():
        y = x + vit.msa(blk, x)
        torch.testing.assert_close(blk(x), y + blk.mlp(blk.norm2(y)))


def test_block_out_of_range_names_the_depth(make_tiny_vit):
    with pytest.raises(HDError, match="12 blocks"):
        vit.check_blocks(make_tiny_vit(), (9, 12), "teacher 'mim'")


def test_fit_grid_resizes_a_patch14_teacher_to_the_student_grid(make_tiny_vit):
    teacher = make_tiny_vit(img_size=224, patch_size=14)  # 16x16 grid
    assert vit.fit_grid(teacher, (4, 4)) == (56, 56)
    assert teacher.pos_embed.shape[1] == 1 + 16
    with torch.no_grad():
        assert teacher.forward_features(torch.randn(1, 3, 56, 56)).shape == (1, 17, 48)


def test_an_unsupported_family_is_an_error_naming_the_supported_ones():
    import timm

    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=48,
                             depth=2, num_heads=3, num_classes=0)
    with pytest.raises(HDError, match="Beit.*not a supported model family") as err:
        vit.check_vit(beit, "the student")
    assert "VisionTransformer" in str(err.value.hint) and "Eva" in str(err.value.hint)


def test_the_final_norm_of_an_average_pooling_model_is_fc_norm():
    from conftest import tiny_vit

    m = tiny_vit(global_pool="avg")  # timm: norm is Identity, fc_norm holds the final LayerNorm
    assert isinstance(m.norm, torch.nn.Identity) and vit.final_norm(m) is m.fc_norm
    x, _ = vit.embed(m, torch.randn(2, 3, 32, 32))
    _, _, feats = vit.run_blocks(m, x, final=True)
    torch.testing.assert_close(feats, m.fc_norm(m.blocks(x)))
    token = tiny_vit()  # global_pool="token": the final norm is norm
    assert vit.final_norm(token) is token.norm and isinstance(token.norm, torch.nn.LayerNorm)
