"""Hugging Face Transformers teachers (``hf:``; hdcli.models.hf): every family read as its own forward and
attention compute it, from random-weight models built from small configs (the extra is installed by make test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import REPO, run_hd, tiny_vit

from hdcli import teachers
from hdcli.errors import HDError
from hdcli.method import Distiller, Target
from hdcli.method import masking as masking_lib
from hdcli.models import hf, vit

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96, image_size=32,
             patch_size=4, attn_implementation="eager")
FAMILIES = {  # class -> (config, extra config, prefix roles)
    "ViTModel": (T.ViTConfig, {}, ("cls",)),
    "ViTMAEModel": (T.ViTMAEConfig, {"mask_ratio": 0.0}, ("cls",)),
    "Dinov2Model": (T.Dinov2Config, {}, ("cls",)),
    "Dinov2WithRegistersModel": (T.Dinov2WithRegistersConfig, {"num_register_tokens": 4}, ("cls",) + ("reg",) * 4),
    "DINOv3ViTModel": (T.DINOv3ViTConfig, {"num_register_tokens": 4}, ("cls",) + ("reg",) * 4),
    "CLIPVisionModel": (T.CLIPVisionConfig, {}, ("cls",)),
    "SiglipVisionModel": (T.SiglipVisionConfig, {}, ()),
}
STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def hf_model(kind: str, seed: int = 0, **over):
    cfg_cls, extra, _ = FAMILIES[kind]
    torch.manual_seed(seed)
    return getattr(T, kind)(cfg_cls(**{**SMALL, **extra, **over})).eval()


def hf_output(model, x):
    """The model's own forward: hidden states and attention weights (ViTMAE with its shuffle turned into the
    identity: noise in patch order, nothing masked)."""
    kw = {"noise": torch.arange(64.0).expand(x.shape[0], 64)} if type(model).__name__ == "ViTMAEModel" else {}
    return model(pixel_values=x, output_attentions=True, output_hidden_states=True, **kw)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_family_gives_its_last_hidden_state_and_its_own_attention(kind):
    model = hf_model(kind)
    a = hf.adapt(model, *STATS)
    assert vit.prefix_roles(a) == FAMILIES[kind][2]
    assert vit.family(a) == ("eva" if kind == "DINOv3ViTModel" else "vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf_output(model, x)
        torch.testing.assert_close(a.forward_features(x), out.last_hidden_state, rtol=0, atol=0)
        h, rope = vit.embed(a, x)
        entering, _, _ = vit.run_blocks(a, h, rope, enter={0, 1, 2})
        prefix = vit.num_prefix(a)
        for b in range(3):  # softmax(q·kᵀ · scale) = the attention weights the model itself computed
            r = vit.relations(a.blocks[b], entering[b], rope, prefix)
            torch.testing.assert_close((r * a.blocks[b].attn.scale).softmax(-1), out.attentions[b], rtol=1e-5, atol=1e-6)
            # kept tokens: q·kᵀ of the gathered tokens (their RoPE rows) is the full matrix indexed
            keep = torch.tensor([[0, 3, 17, 63], [5, 6, 7, 40]])
            idx = torch.cat([torch.arange(prefix).expand(2, prefix), keep + prefix], 1)
            rk = vit.relations(a.blocks[b], vit.gather_tokens(entering[b], keep, prefix), vit.gather_rope(rope, keep),
                               prefix)
            want = torch.stack([r[i][:, idx[i]][:, :, idx[i]] for i in range(2)])
            torch.testing.assert_close(rk, want, rtol=1e-5, atol=1e-5)


def test_a_siglip_teacher_gives_its_map_head_summary_to_the_students_cls():
    model = hf_model("SiglipVisionModel")
    a = hf.adapt(model, *STATS)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=x)
        last = vit.run_blocks(a, *vit.embed(a, x), leave={2})[1][2]
        torch.testing.assert_close(vit.pooled(a, last), out.pooler_output, rtol=0, atol=0)


def _hand_hybrid(mae_hf, clip_hf, student, method, x):
    """The hybrid loss by a loop over the Transformers modules themselves (no adapter): progressive masking from
    the MAE's hidden states, its q·kᵀ at blocks 1, 2 over CLS + kept tokens, CLIP's last hidden state at them."""
    prep = method.teacher_input
    with torch.no_grad():
        m_out = hf_output(mae_hf, prep("mae", x))
        hid = m_out.hidden_states  # hidden_states[i] enters layer i
        keep = masking_lib.keep_set(method.masking, [hid[b][:, 1:] for b in method.masking.teacher_blocks(64)],
                                    batch=x.shape[0], n=64)
        gather = lambda v: vit.gather_tokens(v, keep, 1)  # noqa: E731
        rel_t = []
        for b in (1, 2):
            layer = mae_hf.layers[b]
            a = layer.layernorm_before(gather(hid[b]))
            q = layer.attention.q_proj(a).view(2, -1, 3, 16).transpose(1, 2)
            k = layer.attention.k_proj(a).view(2, -1, 3, 16).transpose(1, 2)
            rel_t.append(q @ k.transpose(-2, -1))
        feat_t = F.layer_norm(gather(clip_hf(pixel_values=prep("clip", x)).last_hidden_state), (48,), eps=1e-6)
    h, _ = vit.embed_kept(student, x, keep)
    entering, _, feats = vit.run_blocks(student, h, None, enter={1, 2}, final=True)
    loss_feat = F.smooth_l1_loss(method.head("clip/features")(feats), feat_t, beta=2.0)
    loss_rel = sum(F.smooth_l1_loss(vit.relations(student.blocks[b], entering[b], None, 1), rel_t[i], beta=2.0)
                   for i, b in enumerate((1, 2))) / 2
    return loss_feat + loss_rel


def test_the_hybrid_on_transformers_teachers_equals_a_loop_over_their_modules():
    mae_hf, clip_hf = hf_model("ViTMAEModel", seed=1), hf_model("CLIPVisionModel", seed=2)
    mae = hf.adapt(mae_hf, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    clip = hf.adapt(clip_hf, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    student = tiny_vit(seed=0, depth=3)
    method = Distiller(student, {"mae": mae, "clip": clip},
                       [Target("clip", "features"), Target("mae", "relations", (1, 2))], mask_teacher="mae",
                       mask_blocks=(0, 1, 2))
    x = torch.randn(2, 3, 32, 32)
    out = method(x)
    out.loss.backward()
    mine = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    method.zero_grad()
    want = _hand_hybrid(mae_hf, clip_hf, student, method, x)
    torch.testing.assert_close(out.loss.detach(), want.detach(), rtol=1e-4, atol=1e-6)
    want.backward()
    assert mine and all(torch.allclose(mine[n], p.grad, rtol=1e-4, atol=1e-6) for n, p in student.named_parameters()
                        if p.grad is not None)


# ---------------------------------------------------------------- loading: directories, statistics, bad input

@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "mae"
    hf_model("ViTMAEModel", seed=3, num_hidden_layers=12, mask_ratio=0.75).save_pretrained(d)
    T.ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    return d


def test_a_save_pretrained_directory_loads_with_its_processors_statistics_and_no_masking(mae_dir):
    m = teachers.load(f"hf:{mae_dir}")
    assert m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and m.pretrained_cfg["std"] == (0.229, 0.224, 0.225)
    assert vit.depth(m) == 12 and not any(p.requires_grad for p in m.parameters())
    x = torch.randn(1, 3, 32, 32)
    assert m.forward_features(x).shape == (1, 65, 48)  # every patch, in order, though its config masks 75 %


def test_no_image_processor_is_a_refusal_unless_statistics_are_given(tmp_path):
    d = tmp_path / "vit"
    hf_model("ViTModel").save_pretrained(d)
    with pytest.raises(HDError, match="its input normalisation is unknown"):
        teachers.load(f"hf:{d}")
    m = teachers.load(f"hf:{d}", mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    assert m.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)


def test_the_registry_names_the_common_transformers_repos():
    assert teachers.resolve("hf-mae").tag == "hf:facebook/vit-mae-base"
    assert teachers.resolve("hf:facebook/dinov2-base").tag == "hf:facebook/dinov2-base"
    with pytest.raises(HDError, match="neither a directory nor a hub repo"):
        teachers.resolve("hf:./not/here")


def test_a_transformers_repo_loads_from_the_hub_cache_offline(tmp_path, mae_dir):
    """The hub cache layout (models--ORG--NAME/snapshots/<rev>/ + refs/main), as hd fetch-teachers leaves it."""
    snap = tmp_path / "cache" / "models--lab--tiny-mae" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in mae_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (tmp_path / "cache" / "models--lab--tiny-mae" / "refs").mkdir()
    (tmp_path / "cache" / "models--lab--tiny-mae" / "refs" / "main").write_text("abc123")
    m = teachers.load("hf:lab/tiny-mae", cache_dir=tmp_path / "cache", offline=True)
    assert vit.depth(m) == 12
    with pytest.raises(HDError, match="not in the hub cache"):
        teachers.load("hf:lab/other", cache_dir=tmp_path / "cache", offline=True)


@pytest.mark.slow
def test_tiny_recipe_with_a_transformers_mae_and_a_timm_clip(tmp_path, mae_dir):
    from timm.models import save_for_hf

    clip = tmp_path / "clip"
    save_for_hf(tiny_vit("vit_base_patch16_clip_quickgelu_224", seed=4), str(clip), safe_serialization=True)
    r = run_hd("distill", "--recipe", "recipes/distill/tiny-cpu.toml", "--teachers", f"hf:{mae_dir},local-dir:{clip}",
               "--steps", "2", "--eval-every", "0", "--log-every", "1", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "part/mae/relations" in (tmp_path / "run" / "metrics.jsonl").read_text()
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_bad_transformers_input_is_one_line_before_any_step(tmp_path, mae_dir):
    text = tmp_path / "bert"
    T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             vocab_size=100)).save_pretrained(text)
    fake = tmp_path / "noext" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named transformers')\n")
    base = ("distill", "--recipe", "recipes/distill/tiny-cpu.toml", "--steps", "1", "--eval-every", "0")
    cases = [((f"hf:{text},hf:{mae_dir}",), {}, "holds a Transformers bert model, not a vision model"),
             ((f"hf:{mae_dir},random:vit_base_patch16_clip_quickgelu_224.openai",), {"PYTHONPATH": str(fake.parent)},
              "hdcli[hf]")]
    for (names,), env, message in cases:
        r = run_hd(*base, "--teachers", names, "--out", str(tmp_path / "r"), env=env)
        assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "step 1/" not in r.stdout
    assert not (REPO / "runs").joinpath("r").exists()


# ---------------------------------------------------------------- a hostile user's findings

def test_a_teachers_own_statistics_win_over_the_fallback(mae_dir):
    m = teachers.load(f"hf:{mae_dir}", mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    assert m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # its processor's, not --teacher-mean's


def test_a_teacher_at_another_grid_has_its_position_embeddings_resampled_as_timm_does(tmp_path):
    from timm.layers import resample_abs_pos_embed

    d = tmp_path / "dino64"
    hf_model("Dinov2Model", image_size=64).save_pretrained(d)  # a 16 x 16 grid, as DINOv2's 518 px is 37 x 37
    T.BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    m = teachers.load(f"hf:{d}")
    assert vit.fit_grid(m, (8, 8)) == (32, 32) and m.patch_embed.grid_size == (8, 8)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h, _ = vit.embed(m, x)
        own = m.source.embeddings.position_embeddings
        want = resample_abs_pos_embed(own, [8, 8], old_size=[16, 16], num_prefix_tokens=1)
        patches = m.patch_embed(x)
        torch.testing.assert_close(h[:, 1:], patches + want[:, 1:])
        assert m.forward_features(x).shape == (1, 65, 48)


def test_a_sharded_repo_in_the_hub_cache_loads_offline_and_a_local_directory_needs_no_cache(tmp_path):
    d = tmp_path / "sharded"
    hf_model("ViTModel", seed=5).save_pretrained(d, max_shard_size="100KB")
    T.ViTImageProcessor().save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    snap = tmp_path / "cache" / "models--lab--sharded" / "snapshots" / "r1"
    snap.mkdir(parents=True)
    for f in d.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("r1")
    assert vit.depth(teachers.load("hf:lab/sharded", cache_dir=tmp_path / "cache", offline=True)) == 3
    records = teachers.fetch([f"hf:{d}"], cache_dir=tmp_path / "other", offline=True)
    assert records[0]["source"] == "local-dir"
