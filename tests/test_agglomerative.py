"""Training your own RADIO / UNIC (issue 28): summary/patch losses, teacher dropping, ladder targets, student
initialisation and freezing, checked against hand computations; the tiny recipe in each variant and the
radio-like / unic-like ViT-B recipes end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_hd, tiny_vit
from reference import ref_ln, ref_smooth_l1, rel_err

from hdcli.errors import HDError
from hdcli.method import Distiller, Target
from hdcli.method import distiller as distiller_lib
from hdcli.models import vit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = REPO / "recipes/distill/tiny-cpu.toml"
MAE, CLIP = "random:vit_base_patch16_224.mae", "random:vit_base_patch16_clip_quickgelu_224.openai"


def student_and_teacher(depth=12):
    return tiny_vit(seed=0, depth=depth, drop_path_rate=0.0), tiny_vit(seed=1, depth=depth)


def final_features(model, x):
    return vit.run_blocks(model, *vit.embed(model, x), final=True)[2]


def test_summary_and_patch_losses_by_hand():
    student, teacher = student_and_teacher()
    t = Target("t", "features", summary_loss="cosine", patch_loss="mse", summary_weight=0.3)
    m = Distiller(student, {"t": teacher}, [t], masking="none").train()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    pred = m.head("t/features")(final_features(student, x))
    target = ref_ln(final_features(teacher, m.teacher_input("t", x)))
    cos = (1 - F.cosine_similarity(pred[:, :1], target[:, :1], dim=-1)).mean()  # the CLS row
    mse = (pred[:, 1:] - target[:, 1:]).pow(2).mean()  # every patch
    assert rel_err(out.parts["t/features"], 0.3 * cos + 0.7 * mse) < 1e-5


def test_a_weighted_loss_mix_by_hand_and_in_fp32_under_bf16_autocast():
    student, teacher = student_and_teacher()
    t = Target("t", "features", loss=[{"kind": "cosine", "weight": 0.9}, {"kind": "smooth_l1", "weight": 0.1}])
    m = Distiller(student, {"t": teacher}, [t], masking="none").train()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    pred = m.head("t/features")(final_features(student, x))
    target = ref_ln(final_features(teacher, m.teacher_input("t", x)))
    want = 0.9 * (1 - F.cosine_similarity(pred, target, dim=-1)).mean() + 0.1 * ref_smooth_l1(pred, target)
    assert rel_err(out.parts["t/features"], want) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x)
    assert low.loss.dtype == torch.float32 and rel_err(low.loss, out.loss) < 0.05


def test_a_ladder_learns_the_final_features_from_intermediate_blocks():
    student, teacher = student_and_teacher()
    t = Target("t", "features", student_blocks=(5, 11), head="mlp")
    m = Distiller(student, {"t": teacher}, [t], masking="none").train()
    assert sorted(m.heads) == ["t_features_s11", "t_features_s5"] and m.shared_block == 5
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    _, leaving, _ = vit.run_blocks(student, *vit.embed(student, x), leave={5, 11})
    target = ref_ln(final_features(teacher, m.teacher_input("t", x)))
    want = (ref_smooth_l1(m.heads["t_features_s5"](leaving[5]), target)
            + ref_smooth_l1(m.heads["t_features_s11"](leaving[11]), target)) / 2
    assert rel_err(out.parts["t/features"], want) < 1e-5
    out.loss.backward()
    assert student.blocks[5].mlp.fc2.weight.grad is not None and student.norm.weight.grad is None  # no final norm


def test_drop_teachers_keeps_each_images_worst_and_drops_at_the_rate():
    torch.manual_seed(0)
    losses = torch.rand(3, 20000)
    keep = distiller_lib.drop_teachers(losses, 0.5)
    assert keep.min(dim=0).values.max() <= 1 and bool((keep.sum(dim=0) >= 1).all())
    assert bool((keep[losses.argmax(dim=0), torch.arange(20000)] == 1).all())
    # a non-worst entry is dropped with probability p: 2 of 3 targets are candidates per image
    candidates = torch.ones_like(keep)
    candidates[losses.argmax(dim=0), torch.arange(20000)] = 0
    rate = float(((1 - keep) * candidates).sum() / candidates.sum())
    assert abs(rate - 0.5) < 0.015
    assert bool((distiller_lib.drop_teachers(losses, 0.0) == 1).all())


def test_teacher_dropping_averages_the_kept_image_losses(monkeypatch):
    student, a = student_and_teacher()
    b = tiny_vit(seed=2)
    seen = {}
    real = distiller_lib.drop_teachers

    def spy(losses, p):
        seen["losses"], seen["keep"] = losses, real(losses, p)
        return seen["keep"]

    monkeypatch.setattr(distiller_lib, "drop_teachers", spy)
    targets = [Target("a", "features"), Target("b", "features", weight=0.5)]
    m = Distiller(student, {"a": a, "b": b}, targets, masking="none", teacher_drop=0.5).train()
    out = m(torch.randn(6, 3, 32, 32))
    losses, keep = seen["losses"], seen["keep"]
    assert losses.shape == keep.shape == (2, 6)
    w = torch.tensor([[1.0], [0.5]])
    assert rel_err(out.loss_feat, 2 * (keep * w * losses).sum() / keep.sum()) < 1e-6
    assert rel_err(out.parts["a/features"], losses[0].mean()) < 1e-6  # the logged part: before dropping
    assert set(out.dropped) == {"a/features", "b/features"}
    assert float(out.dropped["a/features"]) == pytest.approx(1 - float(keep[0].mean()))
    assert Distiller(student, {"a": a, "b": b}, targets, masking="none", teacher_drop=0.5).eval()(
        torch.randn(2, 3, 32, 32)).dropped == {}  # evaluation never drops


def test_student_init_copies_the_weights_and_refuses_another_architecture(tmp_path):
    from timm.models import save_for_hf

    from hdcli.config import DistillConfig, load_config
    from hdcli.method.models import build_student

    source = tiny_vit(seed=5)
    save_for_hf(source, str(tmp_path / "src"), safe_serialization=True)
    cfg = load_config(DistillConfig, recipe=TINY, overrides={"student.init": f"local-dir:{tmp_path / 'src'}",
                                                             "student.freeze_blocks": 2})
    student = build_student(cfg)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in student.state_dict().items())
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"} <= frozen
    assert not any(n.startswith(("blocks.2.", "norm.")) for n in frozen)
    save_for_hf(tiny_vit(seed=5, depth=6), str(tmp_path / "shallow"), safe_serialization=True)
    cfg.student.init = f"local-dir:{tmp_path / 'shallow'}"
    with pytest.raises(HDError, match="another architecture: it has no blocks.6"):
        build_student(cfg)


@pytest.mark.parametrize("overrides, message", [
    ({"distill.targets": [{"teacher": MAE, "kind": "features", "head": "mlp3"}]}, "unknown head kind 'mlp3'"),
    ({"distill.targets": [{"teacher": MAE, "kind": "features", "loss": "huber"}]}, "unknown loss kind 'huber'"),
    ({"distill.targets": [{"teacher": MAE, "kind": "features", "loss": [{"kind": "mse", "weight": 0}]}]},
     "sum to 0"),
    ({"distill.teacher_drop": 1.0}, r"teacher_drop is a probability in \[0, 1\)"),
    ({"distill.targets": [{"teacher": MAE, "kind": "relations", "blocks": [9], "summary_loss": "cosine"}]},
     "apply to feature-like targets"),
])
def test_bad_heads_losses_and_dropping_are_one_line_when_the_config_loads(overrides, message):
    from hdcli.config import DistillConfig, load_config

    with pytest.raises(HDError, match=message):
        load_config(DistillConfig, recipe=TINY, overrides={"distill.teachers": [MAE, CLIP], "distill.masking": "none",
                                                           **overrides})


@pytest.mark.parametrize("flags, message", [
    (["--teachers", CLIP, "--set", f'distill.targets=[{{teacher = "{CLIP}", kind = "features", student_blocks = [12]}}]',
      "--masking", "none"], "ladder block 12 is out of range for the student, which has 12 blocks"),
    (["--student-init", str(REPO / "recipes")], "no config.json"),
])
def test_bad_ladders_and_inits_are_one_line_before_any_step(tmp_path, flags, message):
    out = tmp_path / "run"
    r = run_hd("distill", "--recipe", str(TINY), "--steps", "1", *flags, "--out", str(out))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_tiny_recipe_with_every_variant_trains_from_another_runs_student(tmp_path):
    """MLP and block heads, a summary/patch loss mix, a ladder, teacher dropping, the student initialised from
    another run's student with its embeddings and first two blocks frozen: the frozen weights never move."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    r = run_hd("distill", "--recipe", str(TINY), "--steps", "2", "--no-plot", "--out", str(first))
    assert r.returncode == 0, r.stderr[-3000:]
    third = "random:vit_small_patch16_224"
    targets = ("distill.targets=["
               f'{{teacher = "{MAE}", kind = "relations", blocks = [9, 10]}}, '
               f'{{teacher = "{CLIP}", kind = "features", head = "mlp", summary_loss = "cosine", '
               'patch_loss = [{kind = "cosine", weight = 0.9}, {kind = "smooth_l1", weight = 0.1}]}, '
               f'{{teacher = "{third}", kind = "features", student_blocks = [5, 11], head = {{kind = "block", heads = 3}}}}]')
    run = tmp_path / "variants"
    r = run_hd("distill", "--recipe", str(TINY), "--set", f'distill.teachers=["{MAE}", "{CLIP}", "{third}"]',
               "--set", targets, "--set", f'distill.mask_teacher="{MAE}"', "--teacher-drop", "0.5",
               "--student-init", str(first), "--freeze-blocks", "2", "--steps", "4", "--log-every", "2",
               "--no-plot", "--out", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    last = _metrics(run)[-1]
    assert {"drop/clip/features", "drop/vit_small_patch16_224/features", "part/mae/relations"} <= last.keys()
    assert all(0 <= last[k] <= 1 for k in last if k.startswith("drop/"))
    before, after = load_file(first / "student" / "model.safetensors"), load_file(run / "student" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.0.", "blocks.1."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["blocks.5.mlp.fc1.weight"], after["blocks.5.mlp.fc1.weight"])
    import timm

    assert timm.create_model(f"local-dir:{run / 'student'}", pretrained=True).embed_dim == 48


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["radio-like-vitb", "radio-like-hybrid-vitb", "unic-like-vitb",
                                    "unic-like-hybrid-vitb"])
def test_the_radio_and_unic_like_recipes_build_and_step_with_their_real_architectures(recipe):
    from hdcli import teachers
    from hdcli.config import DistillConfig
    from hdcli.config.loading import load_config
    from hdcli.method.hybrid import build
    from hdcli.method.models import build_student, build_teacher

    cfg = load_config(DistillConfig, recipe=REPO / f"recipes/distill/{recipe}.toml")
    cfg.student.drop_path = 0.0
    dc = cfg.distill
    models = {n: build_teacher("random:" + teachers.REGISTRY[n].tag, cfg, i) for i, n in enumerate(dc.teachers)}
    method = build(build_student(cfg), models, dc).train()
    out = method(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    out.loss.backward()
    assert out.keep.shape == ((2, 67) if "hybrid" in recipe else (2, 196)) and torch.isfinite(out.loss)
    assert len(out.parts) == len(dc.teachers) and all(torch.isfinite(v) for v in out.parts.values())
    assert bool(out.dropped) == recipe.startswith("unic")
    assert method.student.patch_embed.proj.weight.grad is not None
