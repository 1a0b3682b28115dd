"""hdcli.method against a straightforward, separately written implementation of METHOD.md (fp32, 1e-4 relative,
gradients included), plus the module contract: frozen teachers outside state_dict/DDP, early stop, shapes."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from reference import ref_ln, ref_smooth_l1, ref_weigh, rel_err

from hdcli.errors import HDError
from hdcli.method import Distiller, HybridDistill, Target

CLIP = "vit_base_patch16_clip_quickgelu_224"
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    """Student (tiny ViT-B family), MIM teacher (ViT-B family: mean/std 0.5), CLIP teacher (norm_pre, CLIP
    mean/std, wider: 64 dims, 4 heads) and a 4-head MIM teacher."""
    return {
        "student": tiny_vit(seed=0),
        "mim": tiny_vit(seed=1),
        "clip": tiny_vit(CLIP, seed=2, embed_dim=64, num_heads=4),
        "mim4": tiny_vit(seed=3, embed_dim=64, num_heads=4),
    }


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(10)
    return torch.randn(3, 3, 32, 32)


# ------------------------------------------------------------------ the reference (METHOD.md, written out)

def ref_renorm(x, cfg):
    out = torch.empty_like(x)
    for c in range(3):
        out[:, c] = (x[:, c] * IN_STD[c] + IN_MEAN[c] - cfg["mean"][c]) / cfg["std"][c]
    return out


def ref_states(model, x):
    """Hidden states entering blocks 0..L-1, the state leaving the last block, and the final features."""
    b = x.shape[0]
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
    h = torch.cat([model.cls_token.expand(b, -1, -1), t], dim=1) + model.pos_embed
    h = model.norm_pre(h)
    states = [h]
    for blk in model.blocks:
        h = blk(h)
        states.append(h)
    return states, model.norm(h)


def ref_keep(states, mask_blocks, r, strategy):
    n = states[0].shape[1] - 1
    keeps = []
    for img in range(states[0].shape[0]):
        kept = list(range(n))
        steps = mask_blocks if strategy == "progressive" else mask_blocks[-1:]
        final = n
        exact = 1 - Fraction(str(r))  # METHOD.md's n' = floor(n(1 - r) + 0.5) in exact arithmetic (45 * 0.7 = 31.5 -> 32)
        for _ in mask_blocks:
            final = math.floor(final * exact + Fraction(1, 2))
        if strategy == "none":
            steps = []
        for i in steps:
            hk = states[i][img, 1:][kept]
            m = hk.mean(0)
            s = [float(hk[j] @ m / (hk[j].norm() * m.norm())) for j in range(len(kept))]
            n_new = math.floor(len(kept) * exact + Fraction(1, 2)) if strategy == "progressive" else final
            kept = sorted(kept[j] for j in sorted(range(len(kept)), key=lambda j: s[j])[:n_new])
        keeps.append(kept)
    return keeps


def ref_relations(blk, h, heads):
    """q·kᵀ per head from the qkv weights, over all tokens, no scale. h: [T, D] -> [H, T, T]."""
    attn = blk.attn
    nh, dh = attn.num_heads, attn.head_dim
    qkv = blk.norm1(h) @ attn.qkv.weight.T + attn.qkv.bias
    r = torch.stack([qkv[:, i * dh:(i + 1) * dh] @ qkv[:, (nh + i) * dh:(nh + i + 1) * dh].T for i in range(nh)])
    return r.mean(0, keepdim=True) if heads == "mean" else r


def ref_loss(student, teachers, targets, heads, x, mask_teacher, mask_blocks, r, strategy, rel_heads):
    """Returns loss_feat, loss_rel, keep (list per image), unweighted parts."""
    with torch.no_grad():
        t_out = {name: ref_states(m, ref_renorm(x, m.pretrained_cfg)) for name, m in teachers.items()}
    keep = ref_keep(t_out[mask_teacher][0], mask_blocks, r, strategy)
    sets = [[0] + [1 + k for k in kk] for kk in keep]  # CLS + kept, positions in the full sequence
    b = x.shape[0]  # the student: embed all patches, keep CLS + kept, then the blocks
    t_emb = student.patch_embed.proj(x).flatten(2).transpose(1, 2)
    full = torch.cat([student.cls_token.expand(b, -1, -1), t_emb], 1) + student.pos_embed
    h = student.norm_pre(torch.stack([full[i, sets[i]] for i in range(b)]))
    s_enter = []
    for blk in student.blocks:
        s_enter.append(h)
        h = blk(h)
    s_enter.append(h)
    s_feat = student.norm(h)
    parts = {}
    for t in targets:
        states, feats = t_out[t.teacher]
        tm = teachers[t.teacher]
        if t.kind == "features":
            tgt = torch.stack([ref_ln(feats[i, sets[i]]) for i in range(b)])
            parts[t.name] = ref_smooth_l1(heads[t.name](s_feat), tgt)
        else:
            vals = []
            for bt, bs in zip(t.blocks, t.s_blocks, strict=True):
                if t.kind == "relations":
                    with torch.no_grad():
                        rt = torch.stack([ref_relations(tm.blocks[bt], states[bt][i], rel_heads)[:, sets[i]][:, :, sets[i]]
                                          for i in range(b)])
                    rs = torch.stack([ref_relations(student.blocks[bs], s_enter[bs][i], rel_heads) for i in range(b)])
                    vals.append(ref_smooth_l1(rs, rt))
                elif t.kind == "block":
                    tgt = torch.stack([ref_ln(states[bt + 1][i, sets[i]]) for i in range(b)])
                    vals.append(ref_smooth_l1(heads[f"{t.name}@{bt}"](s_enter[bs + 1]), tgt))
                else:  # msa
                    blk = tm.blocks[bt]
                    with torch.no_grad():
                        tgt = torch.stack([ref_ln(blk.attn(blk.norm1(states[bt][i:i + 1]))[0, sets[i]]) for i in range(b)])
                    sb = student.blocks[bs]
                    vals.append(ref_smooth_l1(heads[f"{t.name}@{bt}"](sb.attn(sb.norm1(s_enter[bs]))), tgt))
            parts[t.name] = sum(vals) / len(vals)
    return *ref_weigh(targets, parts), keep, parts


CONFIGS = {
    # name: (teachers, targets, mask teacher, mask blocks, ratio, masking, relation heads)
    "hybrid": (("mim", "clip"), [Target("clip", "features"), Target("mim", "relations", (9, 10), 1.0)],
               "mim", (0, 4, 8), 0.3, "progressive", "match"),
    "direct-alpha": (("mim", "clip"), [Target("clip", "features"), Target("mim", "relations", (9, 10), 0.5)],
                     "mim", (0, 4, 8), 0.3, "direct", "match"),
    "no-mask-tab7": (("mim", "clip"), [Target("clip", "features"), Target("mim", "relations", (0, 1, 2), 1.0, (1, 2, 3))],
                     "mim", (0, 4, 8), 0.3, "none", "match"),
    "mean-heads": (("mim4", "clip"), [Target("clip", "features"), Target("mim4", "relations", (9, 10), 1.0)],
                   "mim4", (0, 4, 8), 0.5, "progressive", "mean"),
    "block-msa-tab5": (("mim", "clip"), [Target("clip", "features"), Target("mim", "block", (9, 10), 1.0),
                                         Target("mim", "msa", (10,), 0.7)], "mim", (0, 4, 8), 0.3, "progressive", "match"),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_loss_and_gradients_equal_the_reference(models, images, config):
    names, targets, mask_teacher, mask_blocks, r, strategy, rel_heads = CONFIGS[config]
    student = copy.deepcopy(models["student"])
    teachers = {n: models[n] for n in names}
    method = Distiller(student, teachers, targets, mask_teacher=mask_teacher, mask_blocks=mask_blocks,
                       drop_ratio=r, masking=strategy, relation_heads=rel_heads)
    out = method(images)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)

    heads = {}
    for t in targets:
        if t.kind == "features":
            heads[t.name] = method.head(t.name)
        for bt in t.blocks if t.kind in ("block", "msa") else ():
            heads[f"{t.name}@{bt}"] = method.head(t.name, bt)
    feat, rel, keep, parts = ref_loss(student, teachers, targets, heads, images, mask_teacher, mask_blocks,
                                      r, strategy, rel_heads)
    (feat + rel).backward()
    ref_grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}

    assert out.keep.tolist() == keep
    assert rel_err(out.loss_feat, feat) < 1e-4
    assert rel_err(out.loss_rel, torch.as_tensor(rel)) < 1e-4 if rel != 0.0 else float(out.loss_rel) == 0.0
    assert rel_err(out.loss, feat + rel) < 1e-4
    assert all(rel_err(out.parts[k], parts[k]) < 1e-4 for k in parts)
    assert set(grads) == set(ref_grads)
    worst = max(rel_err(grads[n], ref_grads[n]) for n in grads)
    assert worst < 1e-4


@pytest.fixture(scope="module")
def hybrid(models):
    return HybridDistill(copy.deepcopy(models["student"]), models["mim"], models["clip"])


def test_trainable_parameters_are_exactly_student_and_heads(hybrid):
    own = {id(p) for p in hybrid.student.parameters()} | {id(p) for p in hybrid.heads.parameters()}
    assert {id(p) for p in hybrid.parameters()} == own


def test_teachers_are_not_in_the_state_dict(hybrid):
    keys = hybrid.state_dict().keys()
    assert all(k.startswith(("student.", "heads.")) for k in keys)
    fresh = HybridDistill(tiny_vit(seed=7), tiny_vit(seed=8), tiny_vit(CLIP, seed=9, embed_dim=64, num_heads=4))
    fresh.load_state_dict(hybrid.state_dict())  # strict: same keys both ways


def test_teachers_get_no_gradients_student_and_head_do(models, images):
    method = HybridDistill(copy.deepcopy(models["student"]), models["mim"], models["clip"])
    method(images).loss.backward()
    assert all(not p.requires_grad and p.grad is None for m in method.teachers.values() for p in m.parameters())
    assert method.feature_head.weight.grad is not None and method.feature_head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.student.parameters())


def test_feature_head_maps_student_width_to_teacher_width(hybrid):
    assert (hybrid.feature_head.in_features, hybrid.feature_head.out_features) == (48, 64)


def test_to_moves_teachers_too_and_train_keeps_them_in_eval(models, images):
    method = HybridDistill(copy.deepcopy(models["student"]), copy.deepcopy(models["mim"]), copy.deepcopy(models["clip"]))
    method.to(torch.float64).train()
    assert all(p.dtype == torch.float64 for m in method.teachers.values() for p in m.parameters())
    assert all(not m.training for m in method.teachers.values()) and method.student.training
    assert method(images.double()).loss.dtype == torch.float32


def test_mim_teacher_stops_after_the_last_relation_block(models, images, hybrid):
    ran = {"mim": set(), "clip": set()}
    hooks = [blk.register_forward_hook(lambda m, a, o, n=n, i=i: ran[n].add(i))
             for n in ran for i, blk in enumerate(models[n].blocks)]
    with torch.no_grad():
        hybrid(images)
    for h in hooks:
        h.remove()
    assert ran["mim"] == set(range(10))  # block 10 only contributes norm1 + q·kᵀ; block 11 never runs
    assert ran["clip"] == set(range(12))


def test_student_sees_only_cls_and_kept_tokens(images, hybrid):
    seen = []
    h = hybrid.student.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    with torch.no_grad():
        out = hybrid(images)
    h.remove()
    assert out.keep.shape == (3, 22)  # 64 -> 45 -> 32 -> 22
    assert seen == [(3, 23, 48)]


def test_keep_shape_is_static_across_inputs(hybrid):
    with torch.no_grad():
        shapes = {tuple(hybrid(torch.randn(2, 3, 32, 32) * s).keep.shape) for s in (0.1, 1.0, 10.0)}
    assert shapes == {(2, 22)}


def test_patch14_teacher_with_patch16_student(images):
    student = tiny_vit(img_size=64, patch_size=16)  # 4x4 grid
    mim = tiny_vit(seed=1, img_size=224, patch_size=14)  # 16x16 grid at 224 px
    clip = tiny_vit(CLIP, seed=2, img_size=64, patch_size=16)
    sizes = []
    mim.patch_embed.register_forward_pre_hook(lambda m, a: sizes.append(tuple(a[0].shape[-2:])))
    method = HybridDistill(student, mim, clip)
    out = method(F.interpolate(images, size=64))
    out.loss.backward()
    assert sizes == [(56, 56)] and out.keep.shape == (3, 6)  # 16 -> 11 -> 8 -> 6
    assert torch.isfinite(out.loss) and student.cls_token.grad is not None


def test_head_count_mismatch_is_an_error_unless_mean(models):
    with pytest.raises(HDError, match="relation_heads='mean'"):
        HybridDistill(copy.deepcopy(models["student"]), models["mim4"], models["clip"])
    HybridDistill(copy.deepcopy(models["student"]), models["mim4"], models["clip"], relation_heads="mean")


def test_block_out_of_range_names_the_depth(models):
    with pytest.raises(HDError, match="12 blocks"):
        HybridDistill(copy.deepcopy(models["student"]), models["mim"], models["clip"], relation_blocks=(10, 11, 12))


def test_images_of_the_wrong_size_are_a_user_error(hybrid):
    with pytest.raises(HDError, match="student expects"):
        hybrid(torch.randn(1, 3, 48, 48))


def test_single_teacher_baseline_distill_clip(models, images):
    method = Distiller(copy.deepcopy(models["student"]), {"clip": models["clip"]}, [Target("clip", "features")],
                       masking="none")
    out = method(images)
    assert out.keep.shape == (3, 64) and float(out.loss_rel) == 0.0 and out.loss == out.loss_feat


def test_progressive_masking_without_a_mask_teacher_is_an_error(models):
    with pytest.raises(HDError, match="mask teacher"):
        Distiller(copy.deepcopy(models["student"]), {"clip": models["clip"]}, [Target("clip", "features")])


def test_runs_under_cpu_bf16_autocast(images, hybrid):
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = hybrid(images)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_ddp_wraps_only_student_and_heads(models, images, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        method = HybridDistill(copy.deepcopy(models["student"]), models["mim"], models["clip"])
        ddp = DDP(method, find_unused_parameters=True)
        out = ddp(images)
        out.loss.backward()
        assert isinstance(out.keep, torch.Tensor) and set(out.parts) == {"feature/features", "mim/relations"}
        n_trainable = sum(p.numel() for p in method.student.parameters()) + sum(p.numel() for p in method.heads.parameters())
        assert sum(p.numel() for p in ddp.parameters()) == n_trainable
        assert method.feature_head.weight.grad is not None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiles_as_one_graph_without_host_syncs(models, images):
    method = HybridDistill(copy.deepcopy(models["student"]), models["mim"], models["clip"])
    compiled = torch.compile(method, backend="eager", fullgraph=True)  # fails on graph breaks (.item(), dynamic shapes)
    out = compiled(images)
    out.loss.backward()
    torch.testing.assert_close(out.loss, method(images).loss)
