"""OpenCLIP vision towers as teachers (``openclip:ARCH:FILE``; hdcli.models.openclip), from a tiny architecture
registered the way OpenCLIP registers its own (a JSON config) and a checkpoint file written by torch.save."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from hdcli import teachers
from hdcli.errors import HDError
from hdcli.models import vit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 16, "patch_size": 4},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("openclip")
    (d / "hd-tiny-vit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d / "hd-tiny-vit.json")
    torch.manual_seed(0)
    model = open_clip.create_model("hd-tiny-vit")
    torch.save(model.state_dict(), d / "ckpt.pt")
    return d / "ckpt.pt", model.visual.eval()


def test_a_vit_tower_gives_its_tokens_after_ln_post_and_its_own_attention(checkpoint):
    path, visual = checkpoint
    t = teachers.load(f"openclip:hd-tiny-vit:{path}")
    assert vit.family(t) == "vit" and vit.prefix_roles(t) == ("cls",) and vit.depth(t) == 3
    assert t.pretrained_cfg["mean"] == tuple(open_clip.OPENAI_DATASET_MEAN)  # the tower's own statistics
    visual.output_tokens = True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, tokens = visual(x)
        torch.testing.assert_close(t.forward_features(x)[:, 1:], tokens, rtol=1e-5, atol=1e-5)
        h, _ = vit.embed(t, x)
        entering, _, _ = vit.run_blocks(t, h, None, enter={0, 2})
        for b in (0, 2):
            block = visual.transformer.resblocks[b]
            a = block.ln_1(entering[b])
            _, weights = block.attn(a, a, a, need_weights=True, average_attn_weights=False)
            r = vit.relations(t.blocks[b], entering[b], None, 1)
            torch.testing.assert_close((r * t.blocks[b].attn.scale).softmax(-1), weights, rtol=1e-5, atol=1e-6)


def test_bad_openclip_names_are_one_line(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(HDError, match="names no checkpoint"):
        teachers.resolve("openclip:ViT-B-16")
    with pytest.raises(HDError, match="does not exist"):
        teachers.resolve(f"openclip:ViT-B-16:{tmp_path / 'nothere.bin'}")
    with pytest.raises(HDError, match="OpenCLIP has no architecture 'ViT-Q-99'"):
        teachers.load(f"openclip:ViT-Q-99:{path}")
    with pytest.raises(HDError, match="cannot load OpenCLIP ViT-B-32"):
        teachers.load(f"openclip:ViT-B-32:{path}")  # another architecture's weights


def test_an_unreadable_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(HDError, match="cannot load OpenCLIP ViT-B-16"):
        teachers.load(f"openclip:ViT-B-16:{bad}")
