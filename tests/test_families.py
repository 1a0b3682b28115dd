"""Model families (hdcli.models.vit, docs/teachers.md): tiny configs of the real timm classes of DINOv2-reg, SigLIP 2,
AIMv2 (VisionTransformer), DINOv3, EVA-02 CLIP and PE (Eva), against hand computations from their own weights; and
the whole method (loss + gradients) against a separately written loop over timm's own modules."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from reference import ref_ln, ref_smooth_l1, ref_weigh, rel_err

from hdcli.errors import HDError
from hdcli.method import Distiller, Target, match_prefix
from hdcli.models import vit
from hdcli.tools import analyze

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {  # short name: timm architecture (tiny: img 32, patch 4, dim 48, 3 heads, 4 blocks)
    "dinov2-reg": "vit_base_patch14_reg4_dinov2",  # VisionTransformer, CLS + 4 registers, no_embed_class, layer scale
    "siglip2": "vit_base_patch16_siglip_224",  # VisionTransformer, no class token, MAP head
    "aimv2": "aimv2_large_patch14_224",  # VisionTransformer, no class token, RmsNorm, SwiGLU, no qkv bias
    "dinov3": "vit_base_patch16_dinov3",  # Eva: RoPE (rotate-half), CLS + 4 storage tokens, dynamic size
    "eva02-clip": "eva02_base_patch16_clip_224",  # Eva: RoPE (interleaved), separate q/k/v, attention scale norm
    "pe": "vit_pe_core_base_patch16_224",  # Eva with AttentionRope, norm_pre, MAP head
}
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny(arch: str, seed: int, **kw):
    """A tiny model of ``arch`` whose every parameter is perturbed (zero biases, 1e-5 layer scales and unit norms
    would hide mistakes)."""
    m = tiny_vit(arch, seed=seed, **{"depth": 4, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def family_models():
    return {name: tiny(arch, seed=i) for i, (name, arch) in enumerate(FAMILIES.items())}


def entering(model, x, i):
    """What timm's own forward_features gives block i: (hidden state, rope keyword or None)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("x", args[0])
        seen.setdefault("rope", kwargs.get("rope"))

    h = model.blocks[i].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model.forward_features(x)
    h.remove()
    return seen["x"], seen["rope"]


# ------------------------------------------------------------------ q·kᵀ by hand

def hand_rope(t, rope, half):
    """RoPE on t [.., n, dh] with rope [n, 2·dh] = (sin, cos) concatenated; rotate-half or interleaved pairs."""
    sin, cos = rope.chunk(2, -1)
    if half:
        a, b = t.chunk(2, -1)
        rot = torch.cat([-b, a], -1)
    else:
        rot = torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
    return t * cos + rot * sin


def hand_qkv(block, x):
    """q, k, v [B, H, T, dh] of the block's attention from its weights (its own biases and q/k norms, no RoPE)."""
    attn = block.attn
    h, dh = attn.num_heads, attn.head_dim
    a = x if type(block).__name__.endswith("PostNorm") else block.norm1(x)
    if getattr(attn, "qkv", None) is not None:
        bias = attn.qkv.bias
        if bias is None and getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        out = a @ attn.qkv.weight.T + (0 if bias is None else bias)
        q, k, v = out.split(h * dh, dim=-1)
    else:
        q, k, v = attn.q_proj(a), attn.k_proj(a), attn.v_proj(a)
    q, k, v = (t.reshape(*t.shape[:2], h, dh).transpose(1, 2) for t in (q, k, v))
    return attn.q_norm(q), attn.k_norm(k), v


def hand_relations(block, x, rope, prefix):
    """q·kᵀ per head, no scale, with RoPE on the tokens after ``prefix``. x [B, T, D] -> [B, H, T, T]."""
    q, k, _ = hand_qkv(block, x)
    if rope is not None:
        half = bool(getattr(block.attn, "rotate_half", False))
        q = torch.cat([q[:, :, :prefix], hand_rope(q[:, :, prefix:], rope, half)], 2)
        k = torch.cat([k[:, :, :prefix], hand_rope(k[:, :, prefix:], rope, half)], 2)
    return torch.einsum("bhtd,bhsd->bhts", q, k)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_relations_equal_a_hand_computation_from_the_models_own_q_and_k(family_models, name):
    m = family_models[name]
    x, rope = entering(m, torch.randn(2, 3, 32, 32), 2)
    assert (rope is not None) == (vit.family(m) == "eva")
    with torch.no_grad():
        got = vit.relations(m.blocks[2], x, rope, vit.num_prefix(m))
        torch.testing.assert_close(got, hand_relations(m.blocks[2], x, rope, vit.num_prefix(m)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_relations_are_the_logits_of_the_blocks_own_fused_attention(family_models, name):
    m = family_models[name]
    blk = m.blocks[1]
    x, rope = entering(m, torch.randn(2, 3, 32, 32), 1)
    with torch.no_grad():
        r = vit.relations(blk, x, rope, vit.num_prefix(m))
        _, _, v = hand_qkv(blk, x)
        o = (r * blk.attn.scale).softmax(-1) @ v  # [B, H, T, dh]
        o = blk.attn.proj(blk.attn.norm(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)))
        torch.testing.assert_close(o, vit.msa(blk, x, rope), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_taps_leave_the_forward_unchanged_and_run_blocks_is_forward_features(family_models, name):
    m = family_models[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = m.forward_features(x)
        with analyze.attention_tap(m, lambda b, a: None) as fired:
            during = m.forward_features(x)
        h, rope = vit.embed(m, x)
        enter, _, feats = vit.run_blocks(m, h, rope, enter={3}, final=True)
    assert fired == set(range(4)) and torch.equal(before, during)
    torch.testing.assert_close(feats, before)
    torch.testing.assert_close(enter[3], entering(m, x, 3)[0])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kept_tokens_keep_their_prefix_and_their_original_rope_positions(family_models, name):
    m = family_models[name]
    p = vit.num_prefix(m)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 9, 33, 63], [2, 3, 40, 41, 50]])
    rows = torch.cat([torch.arange(p).expand(2, -1), p + keep], 1)  # prefix + kept in the full sequence
    with torch.no_grad():
        h, rope = vit.embed(m, x)
        kept, kept_rope = vit.embed_kept(m, x, keep)
        torch.testing.assert_close(kept, torch.stack([h[i, rows[i]] for i in range(2)]))
        full = vit.relations(m.blocks[0], h, rope, p)
        part = vit.relations(m.blocks[0], kept, kept_rope, p)
    want = torch.stack([full[i][:, rows[i]][:, :, rows[i]] for i in range(2)])
    torch.testing.assert_close(part, want, rtol=1e-4, atol=1e-4)


def test_prefix_tokens_are_matched_by_role():
    cls_reg, cls, none = ("cls", "reg", "reg", "reg", "reg"), ("cls",), ()
    assert match_prefix(cls, cls) == ((0,), (0,), False)  # the paper: CLS with CLS
    assert match_prefix(cls_reg, cls) == ((0,), (0,), False)  # registers dropped by default
    assert match_prefix(cls_reg, cls_reg, registers=True) == ((0, 1, 2, 3, 4), (0, 1, 2, 3, 4), False)
    assert match_prefix(none, cls, pooled=True) == ((), (0,), True)  # SigLIP: its pooled summary -> student CLS
    assert match_prefix(none, cls) == ((), (), False)
    assert match_prefix(cls, none, pooled=True) == ((), (), False)  # a no-CLS student: patches only
    with pytest.raises(HDError, match="as many register tokens"):
        match_prefix(cls_reg, cls, registers=True)


# ------------------------------------------------------------------ the whole method vs a separate loop


def ref_teacher_input(model, x, size):
    cfg = model.pretrained_cfg
    out = torch.stack([(x[:, c] * IN_STD[c] + IN_MEAN[c] - cfg["mean"][c]) / cfg["std"][c] for c in range(3)], 1)
    if out.shape[-1] != size:
        out = F.interpolate(out, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out


def ref_teacher(model, x):
    """timm's own forward, watched: entering states of every block, the patches' rope, final features, pooled."""
    states, rope = [], {}

    def hook(module, args, kwargs):
        states.append(args[0])
        rope.setdefault("r", kwargs.get("rope"))

    hs = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in model.blocks]
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    for h in hs:
        h.remove()
    return states, rope["r"], feats, pooled


def ref_keep(states, p, mask_blocks, r):
    n = states[0].shape[1] - p
    exact = 1 - Fraction(str(r))
    keeps = []
    for img in range(states[0].shape[0]):
        kept = list(range(n))
        for i in mask_blocks:
            hk = states[i][img, p:][kept]
            m = hk.mean(0)
            s = [float(hk[j] @ m / (hk[j].norm() * m.norm())) for j in range(len(kept))]
            n_new = math.floor(len(kept) * exact + Fraction(1, 2))
            kept = sorted(kept[j] for j in sorted(range(len(kept)), key=lambda j: s[j])[:n_new])
        keeps.append(kept)
    return keeps


def ref_prefix(teacher, student, registers, pooled):
    """Matched prefix positions written out: CLS is timm's token 0, registers follow it."""
    tc, sc = teacher.cls_token is not None, student.cls_token is not None
    t_pos, s_pos = ([0], [0]) if tc and sc else ([], [0]) if pooled and sc else ([], [])
    if registers:
        t_pos += list(range(int(tc), teacher.num_prefix_tokens))
        s_pos += list(range(int(sc), student.num_prefix_tokens))
    return t_pos, s_pos, pooled and sc and not tc


def ref_student(student, x, keeps):
    """The student image by image: timm's embedding, prefix + kept tokens (their rope rows), its blocks."""
    p = student.num_prefix_tokens
    t = student.patch_embed(x)
    out = student._pos_embed(t)
    full, rope = out if isinstance(out, tuple) else (out, None)
    full = student.norm_pre(full)
    per = []
    for i, kept in enumerate(keeps):
        h = full[i:i + 1, list(range(p)) + [p + k for k in kept]]
        r = None if rope is None else rope[kept]
        states = []
        for blk in student.blocks:
            states.append(h)
            h = blk(h) if r is None else blk(h, rope=r)
        states.append(h)
        per.append((states, r, student.norm(h)))
    return per


def ref_loss(student, teachers, targets, heads, x, mask_teacher, mask_blocks, r, size):
    t_out = {n: ref_teacher(m, ref_teacher_input(m, x, size[n])) for n, m in teachers.items()}
    keeps = ref_keep(t_out[mask_teacher][0], teachers[mask_teacher].num_prefix_tokens, mask_blocks, r)
    s_out = ref_student(student, x, keeps)
    parts = {}
    for t in targets:
        tm = teachers[t.teacher]
        states, rope, feats, pooled = t_out[t.teacher]
        pt = tm.num_prefix_tokens
        t_pos, s_pos, use_pool = ref_prefix(tm, student, t.registers, t.pooled and t.kind == "features")
        vals = []
        for bt, bs in (zip(t.blocks, t.s_blocks, strict=True) if t.blocks else [(None, None)]):
            tv, sv = [], []
            for i, kept in enumerate(keeps):
                rows = t_pos + [pt + k for k in kept]
                s_states, s_rope, s_feat = s_out[i]
                s_rows = s_pos + list(range(student.num_prefix_tokens, student.num_prefix_tokens + len(kept)))
                if t.kind == "features":
                    f = feats[i, rows]
                    tv.append(torch.cat([pooled[i:i + 1], f]) if use_pool else f)
                    sv.append(heads[t.name](s_feat[0, s_rows]))
                else:  # relations
                    with torch.no_grad():
                        tv.append(hand_relations(tm.blocks[bt], states[bt][i:i + 1, rows],
                                                 None if rope is None else rope[kept], len(t_pos))[0])
                    sv.append(hand_relations(student.blocks[bs], s_states[bs][:, s_rows], s_rope, len(s_pos))[0])
            tv, sv = torch.stack(tv), torch.stack(sv)
            if t.kind == "features":
                if t.norm == "standardize":  # the first batch sets the running statistics
                    flat = tv.reshape(-1, tv.shape[-1])
                    tv = (tv - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-6)
                else:
                    tv = ref_ln(tv)
            vals.append(ref_smooth_l1(sv, tv))
        parts[t.name] = sum(vals) / len(vals)
    return *ref_weigh(targets, parts), keeps, parts


TINY64 = dict(img_size=64, patch_size=8, embed_dim=48, num_heads=3, depth=4)
SETUPS = {
    # name: (student (arch, kwargs), {teacher: (arch, kwargs)}, targets, mask teacher, input size per teacher)
    "dinov2reg-patch7-teacher-patch8-student": (  # the /14 teacher of a /16 student, at tiny scale
        ("vit_base_patch16_224", TINY64),
        {"mae": ("vit_base_patch16_224", TINY64), "dinov2": ("vit_base_patch14_reg4_dinov2", {**TINY64, "patch_size": 7})},
        [Target("dinov2", "features"), Target("mae", "relations", (2, 3))], "mae", {"mae": 64, "dinov2": 56}),
    "siglip-teacher-pooled-into-cls-student": (
        ("vit_base_patch16_224", {}),
        {"mae": ("vit_base_patch16_224", {}), "siglip": ("vit_base_patch16_siglip_224", {})},
        [Target("siglip", "features"), Target("mae", "relations", (2, 3))], "mae", {"mae": 32, "siglip": 32}),
    "register-student-dinov3-teacher": (
        ("vit_base_patch16_224", {"reg_tokens": 4}),
        {"dinov3": ("vit_base_patch16_dinov3", {})},
        [Target("dinov3", "features", registers=True), Target("dinov3", "relations", (2, 3), 0.5)], "dinov3",
        {"dinov3": 32}),
    "three-teachers-eva02-pe-aimv2": (
        ("vit_base_patch16_224", {}),
        {"eva02": ("eva02_base_patch16_clip_224", {}), "pe": ("vit_pe_core_base_patch16_224", {}),
         "aimv2": ("aimv2_large_patch14_224", {})},
        [Target("eva02", "relations", (2, 3)), Target("pe", "features"),
         Target("aimv2", "features", weight=0.5, norm="standardize")], "eva02", {"eva02": 32, "pe": 32, "aimv2": 32}),
    "dinov3-student-vit-and-siglip-teachers": (
        ("vit_base_patch16_dinov3", {}),
        {"mae": ("vit_base_patch16_224", {}), "siglip": ("vit_base_patch16_siglip_224", {})},
        [Target("siglip", "features"), Target("mae", "relations", (2, 3))], "mae", {"mae": 32, "siglip": 32}),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_loss_and_gradients_equal_a_separate_loop(setup):
    (s_arch, s_kw), t_specs, targets, mask_teacher, size = SETUPS[setup]
    student = tiny(s_arch, 100, **s_kw).train()
    teachers = {n: tiny(a, 200 + i, **kw) for i, (n, (a, kw)) in enumerate(t_specs.items())}
    img = s_kw.get("img_size", 32)
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(5))
    method = Distiller(student, teachers, targets, mask_teacher=mask_teacher, mask_blocks=(0, 1, 2), drop_ratio=0.3)
    student.eval()  # drop path off in both passes (the method's student is the same module)
    out = method(x)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)

    heads = {t.name: method.head(t.name) for t in targets if t.kind == "features"}
    feat, rel, keep, parts = ref_loss(student, teachers, targets, heads, x, mask_teacher, (0, 1, 2), 0.3, size)
    (feat + rel).backward()
    ref_grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}

    assert out.keep.tolist() == keep
    assert all(rel_err(out.parts[k], parts[k]) < 1e-4 for k in parts), (out.parts, parts)
    assert rel_err(out.loss, feat + rel) < 1e-4
    assert set(grads) == set(ref_grads)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) < 1e-4


def test_relations_need_attention_that_exposes_q_and_k():
    parallel = tiny_vit("vit_small_patch16_18x2_224", depth=4)  # ParallelThingsBlock: two attentions side by side
    with pytest.raises(HDError, match="cannot expose q·kᵀ"):
        Distiller(tiny_vit(depth=4), {"p": parallel}, [Target("p", "relations", (2,))], masking="none")
    # its final features are fine
    Distiller(tiny_vit(depth=4), {"p": parallel}, [Target("p", "features")], masking="none")


def test_a_relation_target_cannot_be_standardised():
    with pytest.raises(HDError, match="feature-like"):
        Distiller(tiny_vit(depth=4), {"t": tiny_vit(depth=4)}, [Target("t", "relations", (2,), norm="phis")],
                  masking="none")


# ------------------------------------------------------------------ end to end: hd distill with every family

SMOKE = ("--recipe", "recipes/distill/tiny-cpu.toml", "--steps", "3", "-b", "8", "--log-every", "3",
         "--relation-blocks", "1,2", "--mask-blocks", "0,1,2", "--no-plot")


def _metrics(run):
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_hd_distill_runs_every_family_as_teacher_and_student(tmp_path):
    """Smoke runs of `hd distill --teachers random:...` (tiny overrides, as the tests above): (A) a DINOv2-reg MIM
    teacher, DINOv3 and SigLIP 2 feature teachers, a register student, standardised targets; (B) an EVA-02 MIM
    teacher, PE and AIMv2 feature teachers plus run A's student as a local-dir teacher (its own saved architecture,
    not teacher_kwargs), a DINOv3 (Eva) student, PHI-S targets. Then analyze, export and finetune their students."""
    import timm
    from conftest import run_hd

    a, b = tmp_path / "a", tmp_path / "b"
    kw = "distill.teacher_kwargs={patch_size = 4, embed_dim = 48, depth = %d, num_heads = 3}"
    r = run_hd("distill", *SMOKE, "--out", str(a), "--eval-every", "3", "--eval-samples", "40,20",
               "--teachers", "random:vit_base_patch14_reg4_dinov2,random:vit_base_patch16_dinov3,"
               "random:vit_base_patch16_siglip_224", "--set", kw % 4,
               "--set", "student.kwargs={embed_dim = 48, depth = 4, num_heads = 3, reg_tokens = 4}",
               "--target-norm", "standardize")
    assert r.returncode == 0, r.stderr[-3000:]
    last = _metrics(a)[-1]
    assert {k for k in last if k.startswith("part/")} == {
        "part/vit_base_patch14_reg4_dinov2/relations", "part/vit_base_patch16_dinov3/features",
        "part/vit_base_patch16_siglip_224/features"}
    assert "knn/vit_base_patch16_siglip_224_cls" in _metrics(a)[0]  # a no-CLS teacher: its pooled summary
    assert timm.create_model(f"local-dir:{a / 'student'}", pretrained=True).num_prefix_tokens == 5

    r = run_hd("distill", *SMOKE, "--out", str(b), "--student", "vit_base_patch16_dinov3",
               "--teachers", f"random:eva02_base_patch16_clip_224,random:vit_pe_core_base_patch16_224,"
               f"random:aimv2_large_patch14_224,local-dir:{a / 'student'}", "--set", kw % 3,
               "--set", "student.kwargs={embed_dim = 48, depth = 4, num_heads = 3}", "--target-norm", "phis")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len([k for k in _metrics(b)[-1] if k.startswith("part/")]) == 4

    r = run_hd("analyze", "head-distance", str(b / "student"), "--images", "2", "--out", str(tmp_path / "an"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_hd("export", str(b / "student"), "--format", "detectron2", "--out", str(tmp_path / "d2"))
    assert r.returncode == 2 and "RoPE" in r.stderr and "--format timm" in r.stderr
    r = run_hd("finetune", "demo", "--student", str(a / "student"), "--steps", "2", "-b", "8", "--img-size", "32",
               "--linear-probe", "--no-plot", "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("teachers, message", [
    ("random:vit_small_patch16_18x2_224,random:vit_base_patch16_clip_quickgelu_224", "cannot expose q·kᵀ"),
    # a timm model of another family gives features only (hdcli.models.features): not relations
    ("random:beit_base_patch16_224,random:vit_base_patch16_clip_quickgelu_224", "gives features only"),
])
def test_a_teacher_that_cannot_give_its_targets_fails_in_one_line_before_any_step(tmp_path, teachers, message):
    from conftest import run_hd

    r = run_hd("distill", *SMOKE, "--out", str(tmp_path / "run"), "--teachers", teachers,
               "--set", "distill.teacher_kwargs={patch_size = 4, embed_dim = 48, depth = 4, num_heads = 3}")
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr
    assert "training" not in r.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["hybrid-mae-dinov3-vitb", "hybrid-mae-siglip2-vitb", "hybrid-mae-clip-dinov3-vitb"])
def test_the_family_recipes_build_and_step_with_their_real_architectures(recipe):
    """Each recipe's method, with random weights of the registry tags' real ViT-B architectures at 224 px: one
    forward + backward (PHI-S of width 768, DINOv3's RoPE, SigLIP 2's MAP summary)."""
    from conftest import REPO

    from hdcli import teachers
    from hdcli.config import DistillConfig
    from hdcli.config.loading import load_config
    from hdcli.method.hybrid import build
    from hdcli.method.models import build_student, build_teacher

    cfg = load_config(DistillConfig, recipe=REPO / f"recipes/distill/{recipe}.toml")
    cfg.student.drop_path = 0.0
    dc = cfg.distill
    models = {n: build_teacher("random:" + teachers.REGISTRY[n].tag, cfg, i) for i, n in enumerate(dc.teachers)}
    method = build(build_student(cfg), models, dc)
    out = method(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    out.loss.backward()
    assert out.keep.shape == (2, 67) and torch.isfinite(out.loss)
    assert len(out.parts) == len(dc.teachers) and all(torch.isfinite(v) for v in out.parts.values())
    assert method.student.patch_embed.proj.weight.grad is not None


def test_a_global_target_norm_leaves_relations_as_they_are():
    from hdcli.config import DistillConfig
    from hdcli.config.loading import load_config
    from hdcli.method.hybrid import build

    cfg = load_config(DistillConfig, overrides={
        "distill.teachers": ["a", "b"], "distill.target_norm": "standardize", "distill.masking": "none",
        "distill.targets": [{"teacher": "a", "kind": "relations", "blocks": [2]}, {"teacher": "b", "kind": "features"}]})
    m = build(tiny_vit(depth=4), {"a": tiny_vit(depth=4), "b": tiny_vit(depth=4)}, cfg.distill)
    assert [t.norm for t in m.targets] == ["layernorm", "standardize"]


def test_rope_teachers_and_running_norms_run_under_cpu_bf16_autocast():
    teachers = {"dinov3": tiny("vit_base_patch16_dinov3", 1), "siglip": tiny("vit_base_patch16_siglip_224", 2)}
    method = Distiller(tiny("vit_base_patch16_224", 3, reg_tokens=4), teachers,
                       [Target("dinov3", "relations", (2, 3)), Target("dinov3", "features", norm="phis"),
                        Target("siglip", "features", norm="standardize")], mask_teacher="dinov3", mask_blocks=(0, 1, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(torch.randn(2, 3, 32, 32))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(b.dtype in (torch.float64, torch.long) for b in method.norms.buffers())  # statistics in fp64


@pytest.mark.slow
def test_running_statistics_of_two_ranks_are_those_of_the_whole_batch(tmp_path):
    """--target-norm standardize with 2 ranks × batch 8 gives the losses of 1 process × batch 16: each step's
    statistics are all-reduced over the ranks (DDP's buffer broadcast alone would keep only rank 0's)."""


    from conftest import one_and_two_ranks

    args = ("distill", "--recipe", "recipes/distill/tiny-cpu.toml", "--steps", "4", "--log-every", "1",
            "--drop-path", "0", "--num-workers", "0", "--no-plot", "--target-norm", "standardize",
            "--set", "optim.warmup_steps=2", "--blr", "8e-3")
    one, two = one_and_two_ranks(args, tmp_path, 29523)
    l1, l2 = ([x["loss"] for x in _metrics(run) if "loss" in x] for run in (one, two))
    assert len(l1) == len(l2) == 4 and max(abs(a - b) for a, b in zip(l1, l2, strict=True)) <= 1e-4, (l1, l2)
