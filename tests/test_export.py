"""hdcli/export.py and ``hd export``: key names against the targets' sources, values and shapes kept,
CLS slot of the position embedding, timm round trip, and forward passes written from the targets'
own code (mmseg MAE / detectron2 ViT) that must reproduce timm's features from the exported files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_vit

from hdcli import teachers
from hdcli.errors import HDError
from hdcli.tools import export as ex

DEPTH = TINY["depth"]

# detectron2/modeling/backbone/vit.py: ViT(patch_embed=utils.PatchEmbed(proj=Conv2d), pos_embed,
# blocks[i] = Block(norm1, attn=Attention(qkv, proj), norm2, mlp=timm Mlp(fc1, fc2))); the ViTDet
# configs (configs/common/models/mask_rcnn_vitdet.py) put it at model.backbone = SimpleFeaturePyramid(net=ViT).
# rel_pos_h / rel_pos_w are zero-initialised there and not in pretrained checkpoints.
D2_TOP = ["backbone.net.pos_embed", "backbone.net.patch_embed.proj.weight", "backbone.net.patch_embed.proj.bias"]
D2_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias"]
D2_KEYS = set(D2_TOP) | {f"backbone.net.blocks.{i}.{k}" for i in range(DEPTH) for k in D2_BLOCK}

# mmseg/models/backbones/mae.py (MAE(BEiT)): cls_token, pos_embed, patch_embed.projection (mmseg PatchEmbed),
# layers[i] = MAETransformerEncoderLayer(ln1, attn=BEiTAttention(qkv with bias=True, proj), ln2,
# ffn=mmcv FFN(layers.0.0, layers.1), gamma_1, gamma_2). relative_position_bias_table is zero-initialised
# for MAE (MAEAttention.init_weights is a no-op); relative_position_index is a buffer the loader pops.
MMSEG_TOP = ["cls_token", "pos_embed", "patch_embed.projection.weight", "patch_embed.projection.bias"]
MMSEG_LAYER = ["ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "ln2.weight", "ln2.bias", "ffn.layers.0.0.weight", "ffn.layers.0.0.bias",
               "ffn.layers.1.weight", "ffn.layers.1.bias", "gamma_1", "gamma_2"]
MMSEG_KEYS = set(MMSEG_TOP) | {f"layers.{i}.{k}" for i in range(DEPTH) for k in MMSEG_LAYER}


def convert(model, fmt):
    return ex.CONVERTERS[fmt](model.state_dict(), ex.layout(model, fmt)).state_dict


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, vit):
    """A run dir as distill leaves it: <run>/student/ = timm save_for_hf (config.json + model.safetensors)."""
    from timm.models import save_for_hf

    run = tmp_path_factory.mktemp("run")
    save_for_hf(vit, str(run / "student"), safe_serialization=True)
    return run


# --- position embedding ----------------------------------------------------------------------


def _lay(**kw):
    base = dict(depth=1, embed_dim=2, num_heads=1, patch_size=4, grid=(2, 2), has_cls=True, reg_tokens=0,
                pos_prefix=1, mlp_ratio=4.0, norm_eps=1e-6)
    return ex.Layout(**{**base, **kw})


def test_pos_embed_cls_slot_kept():
    pos = torch.arange(10.0).reshape(1, 5, 2)  # CLS row + 4 patches
    assert torch.equal(ex.pos_embed_with_cls_slot(pos, _lay()), pos)


def test_pos_embed_no_embed_class_gets_zero_cls_slot():
    pos = torch.arange(1.0, 9.0).reshape(1, 4, 2)  # 4 patches, no prefix rows
    out = ex.pos_embed_with_cls_slot(pos, _lay(pos_prefix=0))
    assert torch.equal(out, torch.tensor([[[0.0, 0.0], [1, 2], [3, 4], [5, 6], [7, 8]]]))


def test_pos_embed_register_rows_dropped():
    pos = torch.arange(14.0).reshape(1, 7, 2)  # CLS, 2 registers, 4 patches
    out = ex.pos_embed_with_cls_slot(pos, _lay(reg_tokens=2, pos_prefix=3))
    assert torch.equal(out, torch.cat([pos[:, :1], pos[:, 3:]], dim=1))


def test_pos_embed_wrong_length_is_an_error():
    with pytest.raises(HDError, match="position embedding has 6 rows"):
        ex.pos_embed_with_cls_slot(torch.zeros(1, 6, 2), _lay())


# --- key lists, shapes, values ---------------------------------------------------------------


def test_detectron2_keys_match_vitdet(vit):
    assert set(convert(vit, "detectron2")) == D2_KEYS


def test_mmseg_keys_match_mae_backbone(vit):
    assert set(convert(vit, "mmseg")) == MMSEG_KEYS


@pytest.mark.parametrize("fmt,prefix,table,pos_key", [
    ("detectron2", "backbone.net.blocks.", ex.D2_BLOCK, "backbone.net.pos_embed"),
    ("mmseg", "layers.", ex.MMSEG_BLOCK, "pos_embed"),
])
def test_block_tensors_and_pos_embed_preserved(vit, fmt, prefix, table, pos_key):
    src, out = vit.state_dict(), convert(vit, fmt)
    for i in range(DEPTH):
        for s, d in table.items():
            if s.startswith("ls"):
                continue
            assert torch.equal(out[f"{prefix}{i}.{d}"], src[f"blocks.{i}.{s}"]), (i, s)
    assert torch.equal(out[pos_key], src["pos_embed"])  # [1, 1 + N, D], CLS slot included


def test_patch_embedding_preserved(vit):
    src, d2, mm = vit.state_dict(), convert(vit, "detectron2"), convert(vit, "mmseg")
    assert torch.equal(d2["backbone.net.patch_embed.proj.weight"], src["patch_embed.proj.weight"])
    assert torch.equal(mm["patch_embed.projection.weight"], src["patch_embed.proj.weight"])
    assert torch.equal(mm["cls_token"], src["cls_token"])


def test_mmseg_gammas_are_ones_without_layer_scale(vit):
    out = convert(vit, "mmseg")
    assert all(torch.equal(out[f"layers.{i}.gamma_{j}"], torch.ones(TINY["embed_dim"]))
               for i in range(DEPTH) for j in (1, 2))


def test_mmseg_layer_scale_becomes_gamma():
    m = tiny_vit(init_values=0.1, seed=1)
    with torch.no_grad():
        m.blocks[3].ls2.gamma.uniform_()
    assert torch.equal(convert(m, "mmseg")["layers.3.gamma_2"], m.blocks[3].ls2.gamma)


def test_missing_qkv_bias_written_as_zeros():
    m = tiny_vit(qkv_bias=False)
    out = convert(m, "detectron2")
    assert torch.equal(out["backbone.net.blocks.0.attn.qkv.bias"], torch.zeros(3 * TINY["embed_dim"]))


# --- forward passes written from the targets' code ---------------------------------------------


def _block(t, g, heads, eps, gamma=(1.0, 1.0)):
    """One pre-norm block as BEiTAttention / detectron2 Attention compute it (q·scale @ kᵀ, softmax)."""
    B, N, D = t.shape
    a = F.layer_norm(t, (D,), g("n1.weight"), g("n1.bias"), eps)
    qkv = F.linear(a, g("qkv.weight"), g("qkv.bias")).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    o = F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), g("proj.weight"), g("proj.bias"))
    t = t + gamma[0] * o
    m = F.layer_norm(t, (D,), g("n2.weight"), g("n2.bias"), eps)
    m = F.linear(F.gelu(F.linear(m, g("fc1.weight"), g("fc1.bias"))), g("fc2.weight"), g("fc2.bias"))
    return t + gamma[1] * m


def mmseg_mae_forward(sd, x, heads, eps=1e-6):
    """mmseg MAE.forward: cat(cls, patches) + pos_embed, layers, last output without CLS as NCHW."""
    names = {"n1": "ln1", "qkv": "attn.qkv", "proj": "attn.proj", "n2": "ln2", "fc1": "ffn.layers.0.0",
             "fc2": "ffn.layers.1"}
    w = sd["patch_embed.projection.weight"]
    t = F.conv2d(x, w, sd["patch_embed.projection.bias"], stride=w.shape[-1])  # [B, D, h, w]
    B, D, h, wd = t.shape
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], dim=1) + sd["pos_embed"]
    for i in range(sum(k.endswith("gamma_1") for k in sd)):
        def g(n, i=i):
            a, _, b = n.partition(".")
            return sd[f"layers.{i}.{names[a]}.{b}"]
        t = _block(t, g, heads, eps, (sd[f"layers.{i}.gamma_1"], sd[f"layers.{i}.gamma_2"]))
    return t[:, 1:].transpose(1, 2).reshape(B, D, h, wd)


def vitdet_forward(sd, x, heads, eps=1e-6):
    """detectron2 ViT.forward with global attention: patches + get_abs_pos(pos_embed, has_cls_token=True)."""
    P = "backbone.net."
    names = {"n1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "n2": "norm2", "fc1": "mlp.fc1",
             "fc2": "mlp.fc2"}
    w = sd[P + "patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd[P + "patch_embed.proj.bias"], stride=w.shape[-1])  # [B, D, h, w]
    B, D, h, wd = t.shape
    t = t.flatten(2).transpose(1, 2) + sd[P + "pos_embed"][:, 1:]  # CLS slot dropped, grid unchanged
    for i in range(sum(k.endswith("norm1.weight") for k in sd)):
        def g(n, i=i):
            a, _, b = n.partition(".")
            return sd[f"{P}blocks.{i}.{names[a]}.{b}"]
        t = _block(t, g, heads, eps)
    return t.transpose(1, 2).reshape(B, D, h, wd)


def _timm_last_block(model, x):
    return model.forward_intermediates(x, indices=1, intermediates_only=True)[0]  # NCHW, before final norm


@pytest.mark.parametrize("overrides", [{}, {"no_embed_class": True, "init_values": 0.1, "qkv_bias": False}])
def test_mmseg_file_reproduces_timm_features(overrides):
    m = tiny_vit(seed=2, **overrides)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mmseg_mae_forward(convert(m, "mmseg"), x, TINY["num_heads"]),
                                   _timm_last_block(m, x), rtol=1e-4, atol=1e-5)


def test_detectron2_file_reproduces_timm_features():
    m = tiny_vit(seed=3, class_token=False, global_pool="avg")  # ViTDet attends over patches only
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vitdet_forward(convert(m, "detectron2"), x, TINY["num_heads"]),
                                   _timm_last_block(m, x), rtol=1e-4, atol=1e-5)


# --- what the backbones cannot hold ------------------------------------------------------------


def test_detectron2_rejects_layer_scale():
    with pytest.raises(HDError, match="ls1.gamma"):
        convert(tiny_vit(init_values=0.1), "detectron2")


@pytest.mark.parametrize("fmt", ["detectron2", "mmseg"])
def test_qk_norm_rejected(fmt):
    with pytest.raises(HDError, match="q_norm"):
        convert(tiny_vit(qk_norm=True), fmt)


def test_non_gelu_activation_rejected():
    with pytest.raises(HDError, match="not exact GELU"):
        ex.layout(tiny_vit(act_layer="quick_gelu"), "mmseg")


def test_mmseg_needs_class_token():
    with pytest.raises(HDError, match="no CLS token"):
        convert(tiny_vit(class_token=False, global_pool="avg"), "mmseg")


# --- config overrides --------------------------------------------------------------------------


def test_overrides_name_only_what_differs_from_vit_b():
    lay = ex.Layout(depth=12, embed_dim=768, num_heads=12, patch_size=16, grid=(14, 14), has_cls=True,
                    reg_tokens=0, pos_prefix=1, mlp_ratio=4.0, norm_eps=1e-6)
    assert ex.config_overrides(lay, "detectron2") == []
    assert ex.config_overrides(ex.layout(tiny_vit(), "mmseg"), "mmseg") == [
        "model.backbone.patch_size=4", "model.backbone.embed_dims=48", "model.backbone.num_heads=3"]


# --- loading, files, CLI -----------------------------------------------------------------------


def test_student_dir_accepts_run_dir_and_local_dir(student_run):
    assert teachers.student_dir(str(student_run)) == student_run / "student"
    assert teachers.student_dir(f"local-dir:{student_run / 'student'}") == student_run / "student"


def test_student_dir_without_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HDError, match="no model.safetensors"):
        teachers.student_dir(str(tmp_path))


def test_mmseg_file_from_local_dir(student_run, tmp_path, vit):
    model = teachers.load_student(f"local-dir:{student_run / 'student'}")
    res = ex.export(model, "mmseg", tmp_path / "mm.pth")
    sd = torch.load(res.path, map_location="cpu", weights_only=True)
    assert set(sd) == MMSEG_KEYS and sd["pos_embed"].shape == vit.pos_embed.shape


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "d2.pth").write_bytes(b"x")
    with pytest.raises(HDError, match="already exists"):
        ex.check_out(tmp_path / "d2.pth", "detectron2", force=False)


def hd_inproc(capsys, *args: str):
    """The real CLI entry point in this process (no interpreter start): (exit code, stderr)."""
    from hdcli.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code or 0, capsys.readouterr().err


def test_cli_timm_round_trip_identical_outputs(capsys, student_run, tmp_path, vit):
    import timm

    code, err = hd_inproc(capsys, "export", str(student_run / "student"), "--format", "timm",
                          "--out", str(tmp_path / "timm"))
    assert code == 0, err
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), vit(x))


@pytest.mark.slow
def test_cli_detectron2_from_run_dir(hd, student_run, tmp_path, vit):
    r = hd("export", str(student_run), "-f", "detectron2", "-o", str(tmp_path / "d2.pth"))
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "d2.pth", map_location="cpu", weights_only=True)
    src = vit.state_dict()
    assert set(ckpt["model"]) == D2_KEYS
    assert all(ckpt["model"][f"backbone.net.{k}"].shape == src[k].shape for k in src if k.startswith("blocks."))


def test_cli_missing_student_is_one_line_error(capsys, tmp_path):
    code, err = hd_inproc(capsys, "export", str(tmp_path / "nope"), "-f", "mmseg", "-o", str(tmp_path / "mm.pth"))
    assert code == 2 and err.strip().startswith("error: no student directory")
    assert len(err.strip().splitlines()) == 1
