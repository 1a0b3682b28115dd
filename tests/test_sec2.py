"""The paper's Section 2 baselines (issue 27): decoders after the student encoder, mask feature reconstruction,
FD's relative-position student, the analysis of encoder + decoder blocks, and the Figures 1-3 chain."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_hd, tiny_vit

from hdcli.errors import HDError
from hdcli.method import Distiller, Target
from hdcli.method.heads import Decoder, HeadSpec, build, decoder_spec, load_decoder
from hdcli.method.masking import Reconstruction, block_mask
from hdcli.models import vit
from hdcli.paper import figures
from hdcli.paper import reproduce as rp

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = "vit_base_patch16_clip_quickgelu_224.openai"
FD_KWARGS = dict(rel_pos_type="bias", shared_rel_pos=True, class_token=True, global_pool="token", fc_norm=False,
                 qkv_bias=True, init_values=0.1)
FD_TOML = ("{embed_dim = 48, depth = 12, num_heads = 3, rel_pos_type = \"bias\", shared_rel_pos = true, "
           "class_token = true, global_pool = \"token\", fc_norm = false, qkv_bias = true, init_values = 0.1}")


def relpos(shared: bool = True, depth: int = 3, seed: int = 0):
    """A tiny FD-style student (timm VisionTransformerRelPos) whose bias tables are far from zero."""
    m = tiny_vit("vit_relpos_base_patch16_224", seed=seed, depth=depth, **{**FD_KWARGS, "shared_rel_pos": shared})
    for mod in m.modules():
        if hasattr(mod, "relative_position_bias_table"):
            torch.nn.init.normal_(mod.relative_position_bias_table, std=1.0)
    return m


# ---------------------------------------------------------------- decoders (paper Sec. 2.2, 2.3)

def test_decoder_option_names_the_heads_of_fig_1():
    assert decoder_spec("none") == HeadSpec("identity")
    assert decoder_spec("linear") == HeadSpec("linear")  # the paper's head: the default, unchanged
    assert decoder_spec({"blocks": 2, "dim": 32, "heads": 2}) == HeadSpec("decoder", heads=2, blocks=2, dim=32)


@pytest.mark.parametrize("value, message", [("linaer", "unknown decoder 'linaer'"),
                                            ({"block": 2}, "unknown decoder option 'block'"),
                                            ({"blocks": 0}, "positive integer"),
                                            ({"blocks": 1, "dim": 30, "heads": 4}, "cannot have 4 attention heads")])
def test_a_bad_decoder_is_one_line(value, message):
    with pytest.raises(HDError, match=message):
        build(decoder_spec(value), 48, 64)


def test_no_decoder_needs_equal_widths_and_passes_features_through():
    x = torch.randn(2, 5, 48)
    assert torch.equal(build(decoder_spec("none"), 48, 48)(x), x)
    with pytest.raises(HDError, match="width 48 to equal the target's 64"):
        build(decoder_spec("none"), 48, 64)


def test_an_attention_decoder_maps_widths_mixes_tokens_and_passes_gradients():
    torch.manual_seed(0)
    dec = build(decoder_spec({"blocks": 2, "dim": 32, "heads": 2}), 48, 64)
    assert isinstance(dec, Decoder) and len(dec.blocks) == 2
    assert (dec.embed.in_features, dec.embed.out_features, dec.proj.out_features) == (48, 32, 64)
    x = torch.randn(1, 5, 48, requires_grad=True)
    y = dec(x)
    assert y.shape == (1, 5, 64)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in dec.parameters())
    x2 = x.detach().clone()
    x2[0, 4, 0] += 10.0
    assert not torch.allclose(dec(x2)[0, 0], y[0, 0])  # attention: token 0 sees token 4
    assert isinstance(build(decoder_spec({"blocks": 1}), 48, 64).embed, torch.nn.Identity)  # dim = d_in


def _features_method(student, teacher, **kw):
    return Distiller(student, {"clip": teacher}, [Target("clip", "features", **kw)], masking="none")


def test_a_linear_decoder_with_identity_weights_is_plain_feature_distillation():
    student, teacher = tiny_vit(seed=0), tiny_vit(CLIP, seed=1)
    plain = _features_method(student, teacher, head=decoder_spec("none"))
    linear = _features_method(student, teacher, head=decoder_spec("linear"))
    head = linear.head("clip/features")
    with torch.no_grad():
        head.weight.copy_(torch.eye(48))
        head.bias.zero_()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(linear(images).loss, plain(images).loss, rtol=0, atol=0)
    # and by hand: SmoothL1(beta 2) of the student's final features against LN(teacher's)
    s = vit.run_blocks(student, *vit.embed(student, images), final=True)[2]
    seen = plain.teacher_input("clip", images)  # CLIP's own mean/std
    t = vit.run_blocks(teacher, *vit.embed(teacher, seen), final=True)[2]
    want = F.smooth_l1_loss(s, F.layer_norm(t, (48,), eps=1e-6), beta=2.0)  # METHOD.md: LN without affine, eps 1e-6
    torch.testing.assert_close(plain(images).loss, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- mask feature reconstruction (Sec. 2.4)

def test_block_mask_masks_whole_blocks_at_the_given_ratio_by_hand():
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2]])  # blocks (0,0) (0,1) (1,0) (1,1) of a 2x2 block grid
    mask = block_mask(noise, (4, 4), 0.5, 2).view(4, 4)  # ceil(0.5 * 4) = 2 blocks: the two smallest, 1 and 3
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[0:2, 2:4] = True
    want[2:4, 2:4] = True
    assert torch.equal(mask, want)
    many = block_mask(torch.rand(50, 49), (14, 14), 0.6, 2)
    assert (many.sum(1) == 30 * 4).all()  # ceil(0.6 * 49) = 30 blocks of 2x2, every image the same count


def test_the_default_mask_block_is_simmims_32_px_at_224_scaled_to_the_grid():
    r = Reconstruction()
    assert (r.ratio, r.block_for((14, 14)), r.block_for((8, 8)), r.block_for((16, 16))) == (0.6, 2, 1, 2)
    assert r.count((14, 14)) == 120 and r.count((8, 8)) == 39
    with pytest.raises(HDError, match="mask_block 3 does not divide"):
        Reconstruction(block=3).block_for((8, 8))
    with pytest.raises(HDError, match="mask_ratio must lie in"):
        Reconstruction(ratio=1.0)


def test_mask_reconstruction_loss_counts_only_masked_positions_by_hand():
    student, teacher = tiny_vit(seed=0), tiny_vit(CLIP, seed=1)
    method = Distiller(student, {"clip": teacher}, [Target("clip", "features")], masking="none",
                       reconstruct=Reconstruction(0.5, 2))
    assert "mask_token" in dict(method.named_parameters())
    assert not any("mask_token" in k for k in student.state_dict())  # the method's, never the student's
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(7)
    out = method(images)
    torch.manual_seed(7)  # the teacher pass draws nothing: the first draw is the mask
    mask = method.reconstruction_mask(2, images.device)
    assert (mask.sum(1) == 32).all()  # 8 of 16 blocks of 2x2 patches
    # by hand: masked patch embeddings replaced by the token before the position embedding
    with torch.no_grad():
        x = student.patch_embed(images)
        x = torch.where(mask[..., None], method.mask_token.expand_as(x), x)
        x = student.norm_pre(student._pos_embed(x))
        for blk in student.blocks:
            x = blk(x)
        pred = method.head("clip/features")(student.norm(x))[:, 1:]  # patch rows
        target = F.layer_norm(teacher.forward_features(method.teacher_input("clip", images)), (48,), eps=1e-6)[:, 1:]
        rows = mask.nonzero()[:, 1].view(2, -1)
        pick = lambda v: v.gather(1, rows[..., None].expand(-1, -1, 48))  # noqa: E731
        want = F.smooth_l1_loss(pick(pred), pick(target), beta=2.0)
        everywhere = F.smooth_l1_loss(pred, target, beta=2.0)
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=1e-7)
    assert abs(float(want - everywhere)) > 1e-6
    out.loss.backward()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("override, message", [
    ({"distill.masking": "progressive"}, "takes no keep set"),
    ({"distill.targets": [{"teacher": "T", "kind": "relations", "blocks": [9]}]}, "is not one"),
])
def test_mask_reconstruction_refuses_a_keep_set_and_non_feature_targets(override, message):
    from hdcli.config import DistillConfig, load_config

    teacher = f"random:{CLIP}"
    targets = override.pop("distill.targets", [{"teacher": "T", "kind": "features"}])
    targets = [{**t, "teacher": teacher} for t in targets]
    with pytest.raises(HDError, match=message):
        load_config(DistillConfig, recipe=REPO / "recipes/distill/tiny-cpu.toml",
                    overrides={"distill.teachers": [teacher], "distill.targets": targets, "distill.masking": "none",
                               "distill.mask_reconstruction": True, **override})


# ---------------------------------------------------------------- FD's student: timm VisionTransformerRelPos

@pytest.mark.parametrize("shared", [True, False])
def test_relpos_student_runs_as_timm_and_its_relations_and_attention_are_its_own(shared):
    m = relpos(shared)
    assert vit.family(m) == "relpos" and vit.prefix_roles(m) == ("cls",)
    images = torch.randn(2, 3, 32, 32)
    h, pos = vit.embed(m, images)
    entering, _, feats = vit.run_blocks(m, h, pos, enter={1}, final=True)
    torch.testing.assert_close(feats, m.forward_features(images), rtol=0, atol=0)
    blk, x = m.blocks[1], entering[1]
    q, k, _v = blk.attn.qkv(blk.norm1(x)).reshape(2, 65, 3, 3, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(vit.relations(blk, x, pos, 1), q @ k.transpose(-2, -1))  # q·kᵀ, no bias
    bias = pos if shared else blk.attn.rel_pos.get_bias()
    want = (q * blk.attn.scale) @ k.transpose(-2, -1) + bias  # what timm's attention softmaxes
    torch.testing.assert_close(vit.attention_logits(blk, x, pos, 1), want)
    assert vit.gathers_tokens(m) == shared


def test_a_shared_bias_is_gathered_with_the_kept_tokens_and_a_per_block_one_is_refused():
    m = relpos(True)
    keep = torch.tensor([[0, 5, 9, 63], [1, 2, 40, 41]])
    x, bias = vit.embed_kept(m, torch.randn(2, 3, 32, 32), keep)
    full = m.shared_rel_pos.get_bias()[0]  # [H, 65, 65]
    for b in range(2):
        idx = torch.cat([torch.tensor([0]), keep[b] + 1])
        torch.testing.assert_close(bias[b], full[:, idx][:, :, idx])
    assert x.shape == (2, 5, 48)
    with pytest.raises(HDError, match="cannot see only the kept tokens"):
        Distiller(relpos(False), {"clip": tiny_vit(CLIP, seed=1)}, [Target("clip", "features")],
                  masking="random", drop_ratio=0.3, mask_blocks=(0,))


def test_head_distance_of_a_relpos_model_sees_its_bias():
    from hdcli.tools import analyze

    m = relpos(True)
    crops = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with_bias = analyze.measure(m, crops, "head_distance")["per_block"]
    m.shared_rel_pos.relative_position_bias_table.data.zero_()
    without = analyze.measure(m, crops, "head_distance")["per_block"]
    assert all(abs(a - b) > 1e-3 for a, b in zip(with_bias, without, strict=True))


# ---------------------------------------------------------------- end to end: the tiny recipe with each baseline

TINY_RUN = ("distill", "--recipe", "recipes/distill/tiny-cpu.toml", "--steps", "2", "--eval-every", "0",
            "--log-every", "1")
ONE_TEACHER = ("--teachers", f"random:{CLIP}", "--set",
               f"distill.targets=[{{teacher = \"random:{CLIP}\", kind = \"features\"}}]", "--set", "distill.masking=none")
BASELINES = {
    "linear": ("--set", "distill.decoder=\"linear\""),
    "decoder2": ("--set", "distill.decoder={blocks = 2, dim = 32, heads = 2}"),
    "mask-reconstruction": (*ONE_TEACHER, "--set", "distill.mask_reconstruction=true"),
    "fd-student": ("--set", "student.arch=vit_relpos_base_patch16_224", "--set", f"student.kwargs={FD_TOML}"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BASELINES))
def test_tiny_recipe_with_each_baseline_exports_an_encoder_that_loads_in_timm(name, tmp_path):
    import timm
    from safetensors.torch import load_file

    out = tmp_path / name
    r = run_hd(*TINY_RUN, *BASELINES[name], "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    student = timm.create_model(f"local-dir:{out / 'student'}").eval()
    fresh = timm.create_model(f"local-dir:{out / 'student'}", pretrained=False)
    assert set(student.state_dict()) == set(fresh.state_dict())  # the encoder alone: no head, decoder, mask token
    exported = load_file(str(out / "student" / "model.safetensors"))
    (ckpt,) = (out / "checkpoints").glob("*/model.safetensors")
    trained = {k.removeprefix("student."): v for k, v in load_file(str(ckpt)).items() if k.startswith("student.")}
    assert set(exported) <= set(trained)
    for k, v in exported.items():
        assert torch.equal(v, trained[k]), k  # the exported student is the trained encoder
    assert any(k.startswith("heads.") for k in load_file(str(ckpt)))  # the head / decoder is kept in checkpoints
    if name == "fd-student":
        assert type(student).__name__ == "VisionTransformerRelPos" and student.shared_rel_pos is not None
    if name == "mask-reconstruction":
        assert "mask_token" in load_file(str(ckpt)) and not any("mask_token" in k for k in exported)
    if name == "decoder2":
        dec = load_decoder(out / "student" / "decoder" / "clip_features")
        torch.testing.assert_close(dec.state_dict()["proj.weight"],
                                   load_file(str(ckpt))["heads.clip_features.proj.weight"])
        a = run_hd("analyze", "head-distance", str(out), "--images", "8", "--out", str(tmp_path / "an"))
        assert a.returncode == 0, a.stderr[-3000:]
        entry = json.loads((tmp_path / "an" / "head_distance.json").read_text())["models"][str(out)]
        assert len(entry["per_block"]) == 12 + 2 and entry["decoder_blocks"] == 2
        assert re.search(r"│\s+11 │.*\n│\s+d0 │.*\n│\s+d1 │", a.stdout), a.stdout


# ---------------------------------------------------------------- recipes and the Figures 1-3 chain

def test_every_curve_of_figures_1_to_3_has_a_recipe_and_the_recipes_are_what_they_say():
    from hdcli.config import DistillConfig, load_config

    recipes = {p.stem for p in (REPO / "recipes" / "paper").glob("sec2-*.toml")}
    assert recipes == set(figures.runs())
    used = {c.source for _m, _t, panels in figures.FIGURES.values() for p in panels for c in p.curves}
    assert set(figures.runs()) <= used
    for run in figures.runs():
        cfg = load_config(DistillConfig, recipe=REPO / "recipes" / "paper" / f"{run}.toml")
        teacher, variant = run.split("-")[1:]
        assert cfg.distill.teachers == [teacher] and cfg.distill.masking == "none"
        assert (cfg.distill.mask_reconstruction, cfg.student.arch == "vit_relpos_base_patch16_224") == \
            (variant == "mfr", variant == "fd")
        blocks = {"dec1": 1, "dec2": 2, "dec4": 4}.get(variant)
        assert (cfg.distill.decoder.get("blocks") if isinstance(cfg.distill.decoder, dict) else None) == blocks
        assert "Sec. 2" in (REPO / "recipes" / "paper" / f"{run}.toml").read_text()


def test_figures_plan_distills_and_analyses_every_curve_with_gpu_hours(tmp_path):
    from hdcli.paper import execute

    p = rp.plan("figures", out=tmp_path, data={"in1k": "/data/in1k"}, gpus=8)
    stages = [(s.run, s.stage) for s in p.steps]
    for run in figures.runs():
        assert [st for r, st in stages if r == run] == ["distill", "analyze:head_distance", "analyze:nmi"]
    assert ("teachers", "analyze:nmi") in stages and stages[-1] == ("", "report")
    text = execute.format_plan(p)
    assert re.search(r"## sec2-deit-dec4 .*Fig\. 3\(a\)", text)
    assert re.search(r"\[distill\] \d+ GPU-h", text) and "# remaining:" in text
    dec = {s.run: s.gpu_hours for s in p.steps if s.stage == "distill"}
    assert dec["sec2-deit-none"] < dec["sec2-deit-dec1"] < dec["sec2-deit-dec2"] < dec["sec2-deit-dec4"]


@pytest.mark.slow
def test_make_reproduce_figures_dry_run_prints_the_plan(tmp_path):
    r = subprocess.run(["make", "-o", "install", "reproduce-figures", "DRY_RUN=1", "GPUS=8", f"OUT={tmp_path}",
                        "DATA_IN1K=/data/in1k"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^  hd --offline analyze head-distance .*sec2-clip-fd/distill --data /data/in1k", r.stdout, re.M)
    assert re.search(r"remaining: [\d,]+ GPU-hours", r.stdout)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smoke_figures_run_the_whole_chain_and_draw_the_three_figures(hd, tmp_path):
    out = tmp_path / "smoke"
    r = hd("reproduce", "figures", "--scale", "smoke", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in figures.NAMES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000
    listed = (out / "figures" / "figures.md").read_text()
    assert "teacher:deit" in listed and "sec2-deit-dec4" not in listed  # only the teachers are missing in smoke
    dec = json.loads((out / "sec2-deit-dec4" / "analyze" / "nmi.json").read_text())
    assert next(iter(dec["models"].values()))["decoder_blocks"] == 4
    assert figures.read_curve(out, figures.Curve("sec2-deit-dec4", "x"), "nmi")["decoder_blocks"] == 0
    again = rp.plan("figures", out=out, scale="smoke")
    assert all(s.is_done for s in again.steps if s.stage != "report" and not s.skip)


# ---------------------------------------------------------------- a hostile user's findings

def test_section_2_settings_are_checked_even_where_unused_and_a_decoder_needs_an_mlp():
    from hdcli.config import DistillConfig, load_config

    for override, message in (({"distill.mask_ratio": 1.5}, "mask_ratio must lie in"),
                              ({"distill.mask_block": 0}, "mask_block is a positive number"),
                              ({"distill.decoder": "linaer"}, "unknown decoder 'linaer'")):
        with pytest.raises(HDError, match=message):
            load_config(DistillConfig, recipe=REPO / "recipes/distill/tiny-cpu.toml", overrides=override)
    with pytest.raises(HDError, match="leaves its MLP no hidden unit"):
        build(decoder_spec({"blocks": 1, "mlp_ratio": 0.001}), 48, 64)


def test_fds_bias_table_gets_no_weight_decay():
    from hdcli.train.optim import param_groups_weight_decay

    m = relpos(True)
    table = m.shared_rel_pos.relative_position_bias_table
    groups = param_groups_weight_decay(m, 0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(table) in no_decay and table.ndim == 2
    assert id(m.blocks[0].attn.qkv.weight) not in no_decay


def test_analyze_reads_a_hub_name_as_a_hub_name(tmp_path):
    r = run_hd("--offline", "analyze", "head-distance", "hf-hub:timm/vit_small_patch16_224.augreg_in21k",
               "--images", "2", "--out", str(tmp_path / "a"), env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0 and "not in the hub cache" in r.stderr and "no student directory" not in r.stderr


def test_a_figures_plan_of_some_runs_leaves_the_teachers_out(tmp_path):
    p = rp.plan("figures", out=tmp_path, data={"in1k": "/data/in1k"}, gpus=8, only=["sec2-deit-none"])
    assert [s.run for s in p.steps if s.run] == ["sec2-deit-none"] * 3
    assert next(s for s in p.steps if s.stage == "teachers").argv[-1] == "deit"
