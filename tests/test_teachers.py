"""hdcli.teachers: registry, loading from the hub cache / local dirs, --from-file imports, manifest.

Every test writes its own tiny models into a hub-cache layout under tmp_path and loads them through the
real code path (registry -> hub repo -> cache -> timm's loader); nothing touches the network.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import torch
from conftest import TINY, tiny_vit

from hdcli import teachers
from hdcli.errors import HDError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def save_in_hub_cache(model, repo_id: str, cache, rev: str = "0123456789abcdef0123456789abcdef01234567"):
    """Write ``model`` as huggingface_hub lays out a downloaded repo (files dereferenced, as `cp -rL` of a
    cache gives): models--ORG--NAME/snapshots/<rev>/{model.safetensors,config.json} + refs/main."""
    from timm.models import save_for_hf

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    save_for_hf(model, repo / "snapshots" / rev, safe_serialization=True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev / "model.safetensors"


def same_weights(expected: dict, model) -> bool:
    got = model.state_dict()
    return set(got) <= set(expected) and all(torch.equal(expected[k], v) for k, v in got.items())


def to_openai_clip(sd: dict) -> dict:
    """A timm CLIP ViT state dict in OpenAI's layout (visual.* with conv1, transformer.resblocks, ln_*,
    in_proj/out_proj, c_fc/c_proj, proj), plus text-tower keys the import must ignore."""
    out = {"token_embedding.weight": torch.randn(10, 8), "transformer.resblocks.0.ln_1.weight": torch.ones(8)}
    for k, v in sd.items():
        if k == "cls_token":
            out["visual.class_embedding"] = v[0, 0]
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        elif k == "head.weight":
            out["visual.proj"] = v.t()
        elif k != "head.bias":
            for a, b in (("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
                         ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("norm1", "ln_1"), ("norm2", "ln_2")):
                k = k.replace(a, b)
            out["visual." + ("ln_post." + k[5:] if k.startswith("norm.") else k)] = v
    return out


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_maps_short_names_to_tags_and_roles():
    got = {n: (s.tag, s.role) for n, s in teachers.REGISTRY.items()}
    assert got == {
        "mae": ("vit_base_patch16_224.mae", "mim"),
        "mae-l": ("vit_large_patch16_224.mae", "mim"),
        "clip": ("vit_base_patch16_clip_quickgelu_224.openai", "feature"),
        "clip-l": ("vit_large_patch14_clip_quickgelu_224.openai", "feature"),
        "deit": ("deit_base_patch16_224.fb_in1k", "feature"),
        "dinov2": ("vit_base_patch14_dinov2.lvd142m", "feature"),
        "dinov2-reg": ("vit_base_patch14_reg4_dinov2.lvd142m", "feature"),
        "dinov3": ("vit_base_patch16_dinov3.lvd1689m", "feature"),
        "dinov3-l": ("vit_large_patch16_dinov3.lvd1689m", "feature"),
        "siglip2": ("vit_base_patch16_siglip_224.v2_webli", "feature"),
        "eva02-clip": ("eva02_base_patch16_clip_224.merged2b", "feature"),
        "pe": ("vit_pe_core_base_patch16_224.fb", "feature"),
        "hf-mae": ("hf:facebook/vit-mae-base", "mim"),
        "hf-dinov2": ("hf:facebook/dinov2-base", "feature"),
        "hf-siglip2": ("hf:google/siglip2-base-patch16-224", "feature"),
    }


def test_registry_hub_repos_are_timms():
    from timm.models import get_pretrained_cfg

    for name, spec in teachers.REGISTRY.items():
        if spec.tag.startswith("hf:"):  # a Transformers repo: the repo itself (tests/test_hf_teachers.py)
            assert teachers.REGISTRY_HUB_IDS[name] == spec.tag.removeprefix("hf:"), name
            continue
        assert teachers.REGISTRY_HUB_IDS[name] == get_pretrained_cfg(spec.tag).hf_hub_id, name


def test_registry_families_prefix_tokens_and_input_statistics_are_timms():
    """What `hd fetch-teachers --list` says of each teacher, against the real architecture (built on the meta
    device: no weights) and timm's pretrained_cfg."""
    import timm
    import torch
    from timm.models import get_pretrained_cfg

    from hdcli.models import vit

    for name, spec in teachers.REGISTRY.items():
        if spec.tag.startswith("hf:"):  # Transformers models: their statistics come from the repo's processor
            continue
        cfg = get_pretrained_cfg(spec.tag)
        assert teachers.STATS[spec.stats] == (tuple(cfg.mean), tuple(cfg.std)), name
        with torch.device("meta"):
            m = timm.create_model(spec.tag, pretrained=False, num_classes=0)
        vit.check_vit(m, name)
        assert spec.family.startswith({"vit": "ViT", "eva": "Eva (RoPE)"}[vit.family(m)]), name
        assert (getattr(m, "rope", None) is not None) == ("RoPE" in spec.family), name
        roles = vit.prefix_roles(m)
        regs = roles.count("reg")
        assert spec.prefix.startswith("CLS" if "cls" in roles else "none"), name
        assert (f"+ {regs} reg" in spec.prefix) == (regs > 0), name


def test_resolve_is_case_insensitive_for_registry_names():
    assert teachers.resolve("CLIP") == teachers.REGISTRY["clip"]


def test_resolve_accepts_timm_tag_as_is():
    assert teachers.resolve("vit_small_patch16_224.dino") == teachers.TeacherSpec(
        "vit_small_patch16_224.dino", "vit_small_patch16_224.dino", None)


def test_resolve_directory_and_local_dir_prefix_give_the_same_tag(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert teachers.resolve(str(tmp_path)).tag == teachers.resolve(f"local-dir:{tmp_path}").tag == f"local-dir:{tmp_path}"


def test_resolve_unknown_name_suggests_registry_names():
    with pytest.raises(HDError) as e:
        teachers.resolve("maee")
    assert "did you mean: mae" in e.value.hint


def test_resolve_name_that_cannot_be_a_timm_name_suggests_registry_names():
    with pytest.raises(HDError) as e:
        teachers.resolve("mae-ll")
    assert "did you mean: mae-l" in e.value.hint


def test_resolve_unknown_pretrained_tag_suggests_timm_tags():
    with pytest.raises(HDError) as e:
        teachers.resolve("vit_base_patch16_224.maee")
    assert "vit_base_patch16_224.mae" in e.value.hint


def test_resolve_missing_directory_is_an_error(tmp_path):
    with pytest.raises(HDError, match="does not exist"):
        teachers.resolve(str(tmp_path / "nope"))


# --- loading ----------------------------------------------------------------------------------------------


def test_load_registry_name_from_hub_cache_with_hf_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as if set before import, like `hd --offline`
    saved = tiny_vit("vit_base_patch16_224", seed=1)
    save_in_hub_cache(saved, "timm/vit_base_patch16_224.mae", tmp_path)
    model = teachers.load("mae", cache_dir=tmp_path, **TINY)
    assert same_weights(saved.state_dict(), model)


def test_loaded_teacher_is_frozen_eval_headless_with_pretrained_mean_std(tmp_path):
    save_in_hub_cache(tiny_vit("vit_base_patch16_224"), "timm/vit_base_patch16_224.mae", tmp_path)
    model = teachers.load("mae", cache_dir=tmp_path, offline=True, **TINY)
    assert (model.training, model.num_classes, any(p.requires_grad for p in model.parameters())) == (False, 0, False)
    assert tuple(model.pretrained_cfg["mean"]) == IMAGENET_MEAN


def test_load_clip_drops_projection_head_and_keeps_clip_mean(tmp_path):
    saved = tiny_vit("vit_base_patch16_clip_quickgelu_224", seed=2, num_classes=16)
    save_in_hub_cache(saved, "timm/vit_base_patch16_clip_224.openai", tmp_path)
    model = teachers.load("clip", cache_dir=tmp_path, offline=True, **TINY)
    assert (model.num_classes, tuple(model.pretrained_cfg["mean"])) == (0, CLIP_MEAN)
    assert same_weights(saved.state_dict(), model)


def test_load_missing_offline_names_tag_cache_and_ways_out(tmp_path):
    with pytest.raises(HDError) as e:
        teachers.load("mae", cache_dir=tmp_path, offline=True)
    text = str(e.value)
    assert all(s in text for s in ("vit_base_patch16_224.mae", str(tmp_path), "--from-file", "copy"))


def test_load_img_size_override_resamples_position_embedding(tmp_path):
    saved = tiny_vit("vit_base_patch16_224")
    save_in_hub_cache(saved, "timm/vit_base_patch16_224.mae", tmp_path)
    model = teachers.load("mae", cache_dir=tmp_path, offline=True, **{**TINY, "img_size": 28})
    assert model.pos_embed.shape == (1, 1 + 7 * 7, 48)
    assert model.forward_features(torch.zeros(1, 3, 28, 28)).shape == (1, 1 + 7 * 7, 48)


def test_load_patch_size_override_resamples_patch_embedding(tmp_path):
    save_in_hub_cache(tiny_vit("vit_base_patch16_224"), "timm/vit_base_patch16_224.mae", tmp_path)
    model = teachers.load("mae", cache_dir=tmp_path, offline=True, **{**TINY, "patch_size": 2})
    assert (model.patch_embed.proj.weight.shape, model.pos_embed.shape[1]) == ((48, 3, 2, 2), 1 + 16 * 16)


def test_load_local_dir_prefix_and_plain_directory(tmp_path):
    from timm.models import save_for_hf

    saved = tiny_vit("vit_base_patch16_224", seed=3)
    save_for_hf(saved, tmp_path / "student", safe_serialization=True)
    a = teachers.load(f"local-dir:{tmp_path / 'student'}")
    b = teachers.load(str(tmp_path / "student"))
    assert same_weights(saved.state_dict(), a) and same_weights(saved.state_dict(), b)


def test_create_random_student_and_unknown_arch():
    student = teachers.create("vit_base_patch16_224", num_classes=0, **TINY)
    assert any(p.requires_grad for p in student.parameters())
    with pytest.raises(HDError, match="no model"):
        teachers.create("vit_bsae_patch16_224")


# --- --from-file imports ----------------------------------------------------------------------------------


def test_import_original_mae_checkpoint(tmp_path):
    saved = tiny_vit("vit_base_patch16_224", seed=4)
    sd = saved.state_dict()
    ckpt = {"model": {**sd, "mask_token": torch.zeros(1, 1, 48), "decoder_embed.weight": torch.randn(32, 48),
                      "decoder_pos_embed": torch.zeros(1, 65, 32)},
            "args": argparse.Namespace(model="mae_vit_base_patch16"), "epoch": 799}
    torch.save(ckpt, tmp_path / "mae_pretrain.pth")
    teachers.import_checkpoint("mae", tmp_path / "mae_pretrain.pth", cache_dir=tmp_path / "hub", **TINY)
    assert same_weights(sd, teachers.load("mae", cache_dir=tmp_path / "hub", offline=True, **TINY))


def test_import_openai_clip_visual_state_dict(tmp_path):
    saved = tiny_vit("vit_base_patch16_clip_quickgelu_224", seed=5, num_classes=16)
    torch.save(to_openai_clip(saved.state_dict()), tmp_path / "clip.pt")
    teachers.import_checkpoint("clip", tmp_path / "clip.pt", cache_dir=tmp_path / "hub", **TINY)
    assert same_weights(saved.state_dict(), teachers.load("clip", cache_dir=tmp_path / "hub", offline=True, **TINY))


class _Tree(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; OpenAI's files are JIT
def test_import_openai_clip_torchscript_archive(tmp_path):
    saved = tiny_vit("vit_base_patch16_clip_quickgelu_224", seed=5, num_classes=16)
    root = _Tree()  # a module tree whose parameter names are the OpenAI ones, saved as TorchScript
    for key, value in to_openai_clip(saved.state_dict()).items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, _Tree())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    torch.jit.script(root).save(str(tmp_path / "ViT-B-16.pt"))
    teachers.import_checkpoint("clip", tmp_path / "ViT-B-16.pt", cache_dir=tmp_path / "hub", **TINY)
    assert same_weights(saved.state_dict(), teachers.load("clip", cache_dir=tmp_path / "hub", offline=True, **TINY))


def test_import_deit_safetensors(tmp_path):
    from safetensors.torch import save_file

    saved = tiny_vit("deit_base_patch16_224", seed=6, num_classes=10)
    save_file(saved.state_dict(), tmp_path / "deit.safetensors")
    teachers.import_checkpoint("deit", tmp_path / "deit.safetensors", cache_dir=tmp_path / "hub", **TINY)
    assert same_weights(saved.state_dict(), teachers.load("deit", cache_dir=tmp_path / "hub", offline=True, **TINY))


def test_import_of_an_incomplete_checkpoint_names_missing_tensors(tmp_path):
    sd = {k: v for k, v in tiny_vit("vit_base_patch16_224").state_dict().items() if not k.startswith("blocks.3.")}
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(HDError, match="blocks.3.norm1.weight"):
        teachers.import_checkpoint("mae", tmp_path / "bad.pth", cache_dir=tmp_path / "hub", **TINY)


def test_imported_cache_entry_is_read_by_huggingface_hub(tmp_path):
    from huggingface_hub import hf_hub_download, scan_cache_dir

    torch.save(tiny_vit("vit_base_patch16_224").state_dict(), tmp_path / "w.pth")
    weights = teachers.import_checkpoint("mae", tmp_path / "w.pth", cache_dir=tmp_path / "hub", **TINY)
    found = hf_hub_download("timm/vit_base_patch16_224.mae", "model.safetensors", cache_dir=tmp_path / "hub",
                            local_files_only=True)
    [repo] = scan_cache_dir(tmp_path / "hub").repos
    assert (found, repo.repo_id, set(repo.refs)) == (str(weights), "timm/vit_base_patch16_224.mae", {"main"})


# --- fetch + manifest -------------------------------------------------------------------------------------


def test_fetch_offline_verifies_cache_and_writes_manifest(tmp_path):
    import timm

    saved = timm.create_model("test_vit.r160_in1k", pretrained=False)  # timm's own tiny test ViT
    weights = save_in_hub_cache(saved, "timm/test_vit.r160_in1k", tmp_path)
    [record] = teachers.fetch(["test_vit.r160_in1k"], cache_dir=tmp_path, offline=True)
    manifest = json.loads((tmp_path / "teachers.json").read_text())["teachers"]["test_vit.r160_in1k"]
    assert manifest == record
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (tmp_path / record["file"]) == weights
    assert (record["embed_dim"], record["depth"], record["num_heads"]) == (
        saved.embed_dim, len(saved.blocks), saved.blocks[0].attn.num_heads)
