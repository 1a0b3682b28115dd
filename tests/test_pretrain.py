"""hd pretrain: the MAE pieces against hand computations, and both objectives end to end on the demo
digits: the loss falls and the export loads as a teacher (and as a distillation teacher by path)."""

from __future__ import annotations

import json

import pytest
import torch

from hdcli.errors import HDError
from hdcli.tasks import pretrain

TINY_ARGS = ["--img-size", "32", "--patch-size", "8", "--model-kwargs", "{embed_dim = 24, depth = 2, num_heads = 2}",
             "--batch-size", "32", "--num-workers", "0", "--set", "train.log_every=1", "--set", "data.hflip=0.0",
             "--set", "optim.warmup_steps=0", "--set", "optim.min_lr=0.002", "--set", "data.scale=[0.9, 1.0]"]


# ---------------------------------------------------------------- pure pieces

def test_patchify_layout_is_row_major_patches_of_p_p_c():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)  # [B, C, H, W]
    p = pretrain.patchify(x, 2)  # [2, 4, 12]
    assert p.shape == (2, 4, 12)
    # patch 1 = rows 0-1, cols 2-3; entry (i, j, c) at index (i*2 + j)*3 + c
    for i in range(2):
        for j in range(2):
            for c in range(3):
                assert p[1, 1, (i * 2 + j) * 3 + c] == x[1, c, i, 2 + j]


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(pretrain.unpatchify(pretrain.patchify(x, 4), 4, (2, 3)), x)


def test_normalize_patches_gives_zero_mean_unit_unbiased_variance():
    p = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    out = pretrain.normalize_patches(p, eps=0.0)
    var = torch.tensor([1.0, 2.0, 3.0, 4.0]).var()  # unbiased: 5/3
    assert torch.allclose(out, (p - 2.5) / var.sqrt())


def test_random_keep_keeps_the_smallest_noise_sorted_and_masks_the_rest():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.4]])
    keep, mask = pretrain.random_keep(noise, 0.5)
    assert keep.tolist() == [[1, 3], [0, 3]]
    assert mask.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]


def test_masked_mse_averages_only_hidden_patches():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert pretrain.masked_mse(pred, target, mask).item() == pytest.approx((1 + 9) / 2)


def test_mae_loss_ignores_visible_patches(make_tiny_vit):
    enc = make_tiny_vit(patch_size=8, embed_dim=24, depth=2, num_heads=2).train()
    mae = pretrain.MaskedAutoencoder(enc, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    loss, pred, mask = mae(x)
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.shape == (2, 16)
    assert mask.sum(dim=1).tolist() == [12.0, 12.0]  # 75 % of 16 hidden
    target = pretrain.normalize_patches(pretrain.patchify(x, 8))
    assert loss.item() == pytest.approx(pretrain.masked_mse(pred, target, mask).item(), rel=1e-5)


def test_config_rejects_bad_mask_ratio():
    with pytest.raises(HDError, match="mask_ratio"):
        pretrain.load_config("mae", overrides={"pretrain.mask_ratio": 1.0})


def test_supervised_defaults_are_deits():
    cfg = pretrain.load_config("supervised")
    assert (cfg.optim.blr, cfg.train.epochs, cfg.data.scale, cfg.student.drop_path) == (2.5e-4, 300, (0.08, 1.0), 0.1)
    assert pretrain.load_config("mae").train.epochs == 800


# ---------------------------------------------------------------- end to end (CLI)

def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tests.conftest import run_hd

    root = tmp_path_factory.mktemp("pretrain")
    runs = {}
    for mode, extra in (("mae", ["--set", "pretrain.decoder_dim=16", "--set", "pretrain.decoder_depth=1",
                                 "--set", "pretrain.decoder_heads=2", "--blr", "0.02", "--steps", "12"]),
                        ("supervised", ["--mixup", "0", "--cutmix", "0", "--auto-augment", "none", "--reprob", "0",
                                        "--smoothing", "0", "--blr", "0.02", "--steps", "12"])):
        out = root / mode
        r = run_hd("pretrain", mode, *TINY_ARGS, *extra, "--out", str(out), env={"CI": "1"})
        assert r.returncode == 0, r.stderr
        runs[mode] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mae", "supervised"])
def test_pretrain_loss_falls(pretrained, mode):
    losses = _losses(pretrained[mode])
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mae", "supervised"])
def test_export_loads_as_teacher_with_its_mean_std(pretrained, mode):
    from hdcli import teachers

    d = pretrained[mode] / "student"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert cfg["pretrained_cfg"]["std"] == [0.229, 0.224, 0.225]
    model = teachers.load(f"local-dir:{d}")
    assert model.num_classes == 0 and not any(p.requires_grad for p in model.parameters())
    assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 17, 24)


@pytest.mark.slow
def test_export_holds_the_trained_weights(pretrained):
    from safetensors.torch import load_file

    from hdcli import teachers

    d = pretrained["mae"] / "student"
    saved = load_file(str(d / "model.safetensors"))
    model = teachers.load(f"local-dir:{d}")
    assert not any(k.startswith("decoder") or k == "mask_token" for k in saved)  # the encoder alone
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], saved["blocks.1.attn.qkv.weight"])


@pytest.mark.slow
def test_distill_from_both_pretrained_teachers_by_path(pretrained, hd, tmp_path):
    mae, sup = pretrained["mae"] / "student", pretrained["supervised"] / "student"
    r = hd("distill", "--teachers", f"local-dir:{mae},local-dir:{sup}", "--img-size", "32", "--patch-size", "8",
           "--set", "student.kwargs={embed_dim = 24, depth = 2, num_heads = 2}", "--relation-blocks", "1",
           "--mask-blocks", "0,1", "--steps", "3", "--batch-size", "16", "--num-workers", "0",
           "--out", str(tmp_path / "d"), env={"CI": "1"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "student" / "model.safetensors").is_file()


def test_pretrain_bad_data_is_one_line_error(hd, tmp_path):
    r = hd("pretrain", "mae", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "data path not found" in r.stderr and "Traceback" not in r.stderr
