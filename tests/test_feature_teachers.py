"""Features-only teachers (hdcli.models.features): timm models that are not ViTs (ConvNeXt, SAM's samvit) and a
lab's own callable (``py:module:callable``), their maps resampled to the student's grid."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from conftest import run_hd, tiny_vit

from hdcli import teachers
from hdcli.errors import HDError
from hdcli.method import Distiller, Target
from hdcli.models import features, vit

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = "vit_base_patch16_clip_quickgelu_224.openai"
MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A lab's own teacher: a strided conv giving a [B, 40, 4, 4] map of a 32-px image."""
    mean, std, img_size = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32

    def __init__(self, tokens=False):
        super().__init__()
        self.conv, self.tokens = nn.Conv2d(3, 40, 8, stride=8), tokens

    def forward(self, x):
        y = self.conv(x)
        return y.flatten(2).transpose(1, 2) if self.tokens else y


def build():
    torch.manual_seed(0)
    return Net()


def flat():
    return Net(tokens=True)


def vector():
    net = Net()
    net.forward = lambda x: x.mean((2, 3))
    return net


class NoStats(nn.Module):
    def forward(self, x):
        return x


def no_stats():
    return NoStats()
'''


@pytest.fixture
def lab_module(tmp_path, monkeypatch):
    (tmp_path / "lab_teachers.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("lab_teachers", None)


def convnext():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=0, dims=(16, 24, 32, 48)).eval()


def test_bilinear_resampling_to_the_students_grid_by_hand():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]  # [1, 1, 2, 2]
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])  # align_corners=False, 2 -> 4
    want = (w @ m[0, 0] @ w.T).flatten()
    torch.testing.assert_close(features.resample(m, (4, 4))[0, :, 0], want)
    same = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(features.resample(same, (3, 3)), same.flatten(2).transpose(1, 2))  # no-op at its grid


def test_tokens_are_read_as_a_map_with_or_without_a_summary_token():
    t = torch.randn(2, 16, 7)
    grid, first = features.as_map(t, "x")
    assert grid.shape == (2, 7, 4, 4) and first is None and torch.equal(grid[:, :, 1, 2], t[:, 6])
    grid, first = features.as_map(torch.cat([t[:, :1], t], 1), "x")
    assert torch.equal(first, t[:, 0]) and grid.shape == (2, 7, 4, 4)
    with pytest.raises(HDError, match=r"returned a tensor of shape \(2, 7\)"):
        features.as_map(torch.randn(2, 7), "x")


@pytest.mark.parametrize("make", ["convnext", "samvit"])
def test_a_timm_model_that_is_not_a_vit_gives_its_summary_then_its_map_on_the_grid(make):
    torch.manual_seed(0)
    model = convnext() if make == "convnext" else timm.create_model(
        "samvit_base_patch16", pretrained=False, img_size=64, embed_dim=48, depth=2, num_heads=3,
        global_attn_indexes=[1], window_size=2, neck_chans=32, num_classes=0).eval()
    t = features.as_teacher(model)
    assert vit.family(t) == "features" and vit.prefix_roles(t) == ("cls",) and vit.depth(t) == 0
    assert vit.fit_grid(t, (8, 8)) == ((224, 224) if make == "convnext" else (64, 64))  # its own input size
    x = torch.randn(2, 3, *t.img_size)
    with torch.no_grad():
        tokens, _ = vit.embed(t, x)
        fmap = model.forward_features(x)
        assert tokens.shape == (2, 1 + 64, fmap.shape[1])
        torch.testing.assert_close(tokens[:, 0], model.forward_head(fmap, pre_logits=True))
        torch.testing.assert_close(tokens[:, 1:], features.resample(fmap, (8, 8)))
        keep = torch.tensor([[0, 9, 63], [1, 2, 3]])
        kept, _ = vit.embed_kept(t, x, keep)
        torch.testing.assert_close(kept, vit.gather_tokens(tokens, keep, 1))


def test_a_features_only_teacher_cannot_give_relations_or_choose_the_kept_tokens():
    student, conv = tiny_vit(depth=3), features.as_teacher(convnext())
    with pytest.raises(HDError, match="gives features only .*no blocks for a relations target"):
        Distiller(student, {"c": conv}, [Target("c", "relations", (1,))], masking="none")
    with pytest.raises(HDError, match="mask teacher 'c' gives features only"):
        Distiller(student, {"c": conv, "v": tiny_vit(CLIP, seed=1, depth=3)},
                  [Target("c", "features"), Target("v", "relations", (1,))], mask_teacher="c", mask_blocks=(0,))
    method = Distiller(student, {"c": conv}, [Target("c", "features")], masking="none")
    out = method(torch.randn(2, 3, 32, 32))  # the student's CLS learns the pooled map, its patches the map
    out.loss.backward()
    assert method.head("c/features").out_features == 48 and student.blocks[0].attn.qkv.weight.grad is not None


def test_a_callable_teacher_is_a_module_with_its_own_statistics(lab_module):
    t = teachers.load("py:lab_teachers:build")
    assert t.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and t.embed_dim == 40 and t.img_size == (32, 32)
    vit.fit_grid(t, (8, 8))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fmap = t.body(x)
        torch.testing.assert_close(t.tokens(x)[:, 0], fmap.mean((2, 3)))  # no pooling of its own: the mean
    flat = teachers.load("py:lab_teachers:flat")  # [B, 16, 40] tokens: a 4 x 4 map
    vit.fit_grid(flat, (4, 4))
    with torch.no_grad():
        torch.testing.assert_close(flat.tokens(x)[:, 1:], flat.body(x))
    with pytest.raises(HDError, match="does not say how its inputs are normalised"):
        teachers.load("py:lab_teachers:no_stats")
    assert teachers.load("py:lab_teachers:no_stats", mean=[0.1] * 3, std=[0.2] * 3).embed_dim == 3
    with pytest.raises(HDError, match=r"returned a tensor of shape \(1, 3\)"):
        teachers.load("py:lab_teachers:vector")
    with pytest.raises(HDError, match="has no missing"):
        teachers.load("py:lab_teachers:missing")
    with pytest.raises(HDError, match="names no callable"):
        teachers.resolve("py:lab_teachers")


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_tiny_recipe_with_a_convnext_and_a_callable_feature_teacher_beside_mae(tmp_path, lab_module):
    from timm.models import save_for_hf

    conv = tmp_path / "convnext"
    model = convnext()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 64, 64)}
    save_for_hf(model, str(conv), safe_serialization=True)
    env = {"PYTHONPATH": str(lab_module)}
    base = ("distill", "--recipe", "recipes/distill/tiny-cpu.toml", "--steps", "2", "--eval-every", "0",
            "--log-every", "1")
    for name, second in (("convnext", f"local-dir:{conv}"), ("callable", "py:lab_teachers:build")):
        r = run_hd(*base, "--teachers", f"random:vit_base_patch16_224.mae,{second}", "--out", str(tmp_path / name),
                   env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / name / "student" / "model.safetensors").is_file()
    r = run_hd(*base, "--teachers", "random:vit_base_patch16_224.mae,py:lab_teachers:vector", "--out",
               str(tmp_path / "bad"), env=env)
    assert r.returncode != 0 and "returned a tensor of shape (1, 3)" in r.stderr and "Traceback" not in r.stderr
    r = run_hd(*base, "--teachers", f"local-dir:{conv},random:{CLIP}", "--masking", "none", "--out",
               str(tmp_path / "bad2"), env=env)
    assert r.returncode != 0 and "gives features only" in r.stderr and "Traceback" not in r.stderr


RAISING = '''
from torch import nn


def fails():
    raise RuntimeError("the lab's weights are on another disk")


def needs(path):
    return nn.Identity()


class Pair(nn.Module):
    mean, std, img_size = (0.5,) * 3, (0.5,) * 3, 32

    def forward(self, x):
        return x, x


def pair():
    return Pair()
'''


def test_a_callable_that_fails_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "lab_raising.py").write_text(RAISING)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for name, message in (("fails", "calling it failed: RuntimeError: the lab's weights are on another disk"),
                              ("needs", "calling it failed: TypeError"),
                              ("pair", "returned a tuple, not a tensor")):
            with pytest.raises(HDError, match=message):
                teachers.load(f"py:lab_raising:{name}")
    finally:
        sys.modules.pop("lab_raising", None)
