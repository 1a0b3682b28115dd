"""hd finetune: top-k counting, BatchNorm folding, config layers, the model built from a student dir,
layer decay, CIFAR-100 errors, and end-to-end fine-tuning / linear probing of a tiny student."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vit

from hdcli import data
from hdcli.errors import HDError
from hdcli.tasks import finetune as ft

# ------------------------------------------------------------------------------------------ fixtures


def write_cifar100(root: Path) -> Path:
    """The demo digits as an official cifar-100-python dir: pickles with bytes keys, rows of R, G, B planes,
    labels 0..9 of the 100 fine classes (train 1,437 / test 360 images)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, split in (("train", "train"), ("test", "val")):
        r = data.digits()[split]
        rows = r.images.transpose(0, 3, 1, 2).reshape(len(r.images), 3072)  # [N, 3*32*32] R, G, B planes
        obj = {b"batch_label": name.encode(), b"fine_labels": [int(y) for y in r.labels],
               b"coarse_labels": [0] * len(rows), b"filenames": [f"{i}.png".encode() for i in range(len(rows))],
               b"data": np.ascontiguousarray(rows)}
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                                           b"coarse_label_names": [f"super{i}".encode() for i in range(20)]},
                                          protocol=2))
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from timm.models import save_for_hf

    out = tmp_path_factory.mktemp("student") / "student"
    save_for_hf(tiny_vit(seed=3), str(out), safe_serialization=True)
    return out


def cfg_for(cifar, student, **over):
    base = {"finetune.dataset": "cifar100", "finetune.student": str(student), "data.source": str(cifar),
            "data.img_size": 32, "data.num_workers": 0}
    return ft.load_config(overrides={**base, **over})


def safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------ pure pieces


def test_fold_batchnorm_gives_the_same_outputs_as_bn_then_linear():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(6, affine=False, eps=1e-6)
    bn.running_mean.copy_(torch.randn(6))
    bn.running_var.copy_(torch.rand(6) + 0.5)
    linear = torch.nn.Linear(6, 4)
    x = torch.randn(5, 6)
    folded = ft.fold_batchnorm(bn.eval(), linear)
    by_hand = (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-6) @ linear.weight.T + linear.bias
    torch.testing.assert_close(folded(x), by_hand)
    torch.testing.assert_close(folded(x), linear(bn(x)))


def test_train_transform_is_a_function_of_the_sample_seed(cifar, student):
    t = ft.train_transform(cfg_for(cifar, student))
    img = data.digits()["train"].load(7)
    with data.seeded(11):
        a = t(img)
    np.random.seed(123)  # RandAugment picks ops with numpy: its global state must not matter
    with data.seeded(11):
        b = t(img)
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ configuration


def test_linear_probe_flag_brings_mae_linear_probe_defaults(cifar, student):
    cfg = cfg_for(cifar, student, **{"finetune.linear_probe": True})
    assert (cfg.finetune.mixup, cfg.finetune.cutmix, cfg.finetune.reprob, cfg.finetune.auto_augment) == (0, 0, 0, None)
    assert (cfg.optim.weight_decay, cfg.train.epochs, cfg.finetune.global_pool) == (0.0, 90, "token")


def test_recipe_overrides_linear_probe_defaults_and_flags_override_the_recipe(cifar, student, tmp_path):
    recipe = tmp_path / "lp.toml"
    recipe.write_text('[finetune]\nlinear_probe = true\nglobal_pool = "avg"\n[train]\nepochs = 7\n')
    cfg = ft.load_config(recipe, {"finetune.dataset": "cifar100", "finetune.student": str(student),
                                  "train.epochs": 3})
    assert cfg.finetune.linear_probe and cfg.finetune.mixup == 0  # from the linear-probe defaults
    assert cfg.finetune.global_pool == "avg" and cfg.train.epochs == 3


def test_full_finetuning_defaults_are_mae_vitb(cifar, student):
    cfg = cfg_for(cifar, student)
    f, o = cfg.finetune, cfg.optim
    assert (o.blr, o.weight_decay, o.warmup_epochs, tuple(o.betas)) == (5e-4, 0.05, 5.0, (0.9, 0.999))
    assert (f.layer_decay, f.drop_path, f.mixup, f.cutmix, f.smoothing, f.reprob, f.remode) == (
        0.65, 0.1, 0.8, 1.0, 0.1, 0.25, "pixel")
    assert f.auto_augment == "rand-m9-mstd0.5-inc1" and f.global_pool == "avg" and cfg.train.epochs == 100


def test_mixup_needs_an_even_batch(cifar, student):
    with pytest.raises(HDError, match="even batch size"):
        cfg_for(cifar, student, **{"train.batch_size": 7})


def test_unknown_dataset_suggests_the_closest(cifar, student):
    with pytest.raises(HDError) as e:
        cfg_for(cifar, student, **{"finetune.dataset": "cifar10"})
    assert "cifar100" in e.value.hint


def test_cifar_needs_a_data_dir():
    with pytest.raises(HDError, match="--data-dir"):
        ft.data_source("cifar100", None)
    assert ft.data_source("cifar100", "/x") == "cifar100:/x" and ft.data_source("demo", None) == "demo"


def test_folder_without_split_dirs_is_refused_for_evaluation(tmp_path, student):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "0.png")
    cfg = ft.load_config(overrides={"finetune.dataset": "folder", "finetune.student": str(student),
                                    "data.source": str(tmp_path)})
    with pytest.raises(HDError, match="evaluated on its training images"):
        ft.eval_source(cfg)


def test_eval_crop_is_full_for_upsampled_cifar_and_0875_elsewhere(cifar, student, tmp_path):
    assert ft.crop_pct(cfg_for(cifar, student)) == 1.0
    assert ft.crop_pct(cfg_for(cifar, student, **{"finetune.dataset": "imagenet"})) == 0.875


# ------------------------------------------------------------------------------------------ model


def test_model_loads_the_student_backbone_with_a_fresh_head_and_fc_norm(cifar, student):
    torch.manual_seed(0)
    model = ft.build_model(cfg_for(cifar, student), num_classes=100)
    sd, saved = model.state_dict(), safetensors(student)
    assert all(torch.equal(sd[k], saved[k]) for k in saved if not k.startswith("norm."))
    assert model.head.weight.shape == (100, 48) and model.head.weight.abs().max() < 1e-4  # std 2e-5 (MAE)
    assert isinstance(model.norm, torch.nn.Identity) and torch.equal(model.fc_norm.weight, torch.ones(48))
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # timm: linear up to drop_path


def test_student_missing_backbone_tensors_is_an_error(cifar, student, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((student / "config.json").read_text())
    saved = safetensors(student)
    save_file({k: v for k, v in saved.items() if not k.startswith("blocks.11.")}, str(bad / "model.safetensors"))
    with pytest.raises(HDError, match="missing blocks.11"):
        ft.build_model(cfg_for(cifar, bad), num_classes=100)


def test_layer_decay_scales_follow_depth(cifar, student):
    cfg = cfg_for(cifar, student)
    task = ft.FinetuneTask.__new__(ft.FinetuneTask)
    task.cfg = cfg
    model = ft.build_model(cfg, num_classes=100)
    groups = task.param_groups(model, 0.05)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(model.blocks[0].attn.qkv.weight)] == pytest.approx(0.65 ** 12)
    assert scale[id(model.blocks[11].mlp.fc2.weight)] == pytest.approx(0.65 ** 1)
    assert scale[id(model.patch_embed.proj.weight)] == pytest.approx(0.65 ** 13)
    assert scale[id(model.head.weight)] == 1.0
    assert decay[id(model.head.weight)] == 0.05 and decay[id(model.pos_embed)] == 0.0


def test_linear_probe_model_trains_only_a_batchnorm_linear_head(cifar, student):
    model = ft.build_model(cfg_for(cifar, student, **{"finetune.linear_probe": True}), num_classes=100)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    assert not model.head[0].affine and isinstance(model.fc_norm, torch.nn.Identity)  # token pool, final norm


# ------------------------------------------------------------------------------------------ CIFAR errors


def broken_cifar(cifar: Path, root: Path, damage: str) -> Path:
    """A copy of ``cifar`` with file ``damage`` missing ("test") or cut to 5,000 bytes ("train")."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        raw = (cifar / "cifar-100-python" / name).read_bytes()
        if name == damage == "train":
            raw = raw[:5000]
        if name != damage or damage == "train":
            (d / name).write_bytes(raw)
    return d / damage


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``hd ARGS`` in this process (the real entry point; no interpreter start): exit code, stderr."""
    from hdcli.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["test", "train"])
def test_missing_or_corrupt_cifar_file_is_one_line_naming_it(capsys, cifar, student, tmp_path, damage):
    bad = broken_cifar(cifar, tmp_path / "c", damage)
    code, err = run_cli(capsys, "finetune", "cifar100", "--data-dir", str(tmp_path / "c"), "--student", str(student),
                        "--img-size", "32", "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error:")
    assert str(bad) in err
    assert not (tmp_path / "run").exists()  # refused before the run dir was made


def test_unknown_student_is_refused_before_the_run_dir_exists(capsys, cifar, tmp_path):
    code, err = run_cli(capsys, "finetune", "cifar100", "--data-dir", str(cifar), "--student", "vit_bse_patch16_224",
                        "--out", str(tmp_path / "run"))
    assert code == 2 and "unknown student 'vit_bse_patch16_224'" in err and "vit_base_patch16_224" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ end to end


def informative_student(out: Path) -> Path:
    """A tiny student whose CLS features tell the digits apart, as a pretrained student's do.

    A randomly initialised tiny ViT pools nearly the same vector for every image (their spread across
    images is ~8% of their norm): fine-tuning it for 2 epochs stays at the majority-class baseline (~10%,
    measured for many lr / batch / layer-decay settings). Here the final norm's affine is set so that the
    CLS features are standardised over the demo training images (what BatchNorm does for a linear probe);
    the transformer weights stay random."""
    from timm.models import save_for_hf

    model = tiny_vit(seed=3)
    r = data.digits()["train"]
    x = data.normalize(torch.from_numpy(r.images).permute(0, 3, 1, 2))  # [1437, 3, 32, 32]
    with torch.no_grad():
        h = model.forward_features(x)[:, 0]  # [1437, 48] CLS after the final norm (affine 1, 0)
        mu, sigma = h.mean(0), h.std(0)  # [48]
        model.norm.weight.copy_(1 / sigma)
        model.norm.bias.copy_(-mu / sigma)
    save_for_hf(model, str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def finetuned(cifar, tmp_path_factory):
    """The real CLI: 2 epochs on the CIFAR-100-format digits; head + backbone train (layer decay 0.01)."""
    from conftest import run_hd

    root = tmp_path_factory.mktemp("ft")
    student = informative_student(root / "student")
    out = root / "run"
    r = run_hd("finetune", "cifar100", "--data-dir", str(cifar), "--student", str(student), "--epochs", "2",
               "--img-size", "32", "--out", str(out), "--batch-size", "16", "--lr", "1e-2", "--warmup-epochs", "0.1",
               "--layer-decay", "0.01", "--global-pool", "token", "--mixup", "0", "--cutmix", "0", "--aa", "none",
               "--reprob", "0", "--smoothing", "0", "--drop-path", "0", "--set", "data.scale=[1.0, 1.0]",
               "--set", "data.hflip=0", "--num-workers", "0")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_cli_finetunes_tiny_student_above_chance_and_writes_results(finetuned):
    res = json.loads((finetuned / "results.json").read_text())
    assert {"dataset", "top1", "top5", "best_top1", "epochs"} <= res.keys()
    assert res["dataset"] == "cifar100" and res["epochs"] == 2 and res["eval_images"] == 360
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    assert res["best_top1"] == max(h["top1"] for h in res["history"])
    # 10 of the 100 classes occur (36 of 360 test images each): the majority class alone gives 10%
    assert res["top1"] > 20.0, res


@pytest.mark.slow
def test_exported_student_is_the_evaluated_model(finetuned):
    import timm

    model = timm.create_model(f"local-dir:{finetuned / 'student'}", pretrained=True).eval()
    r = data.digits()["val"]
    x = data.normalize(torch.from_numpy(r.images).permute(0, 3, 1, 2))  # eval crop 1.0 at 32 px: the images as is
    with torch.no_grad():
        top1 = (model(x).argmax(1) == torch.from_numpy(r.labels)).float().mean().item() * 100
    assert top1 == pytest.approx(json.loads((finetuned / "results.json").read_text())["top1"], abs=1e-6)


@pytest.mark.slow
def test_linear_probe_leaves_the_backbone_bitwise_unchanged(cifar, student, tmp_path):
    import timm

    cfg = cfg_for(cifar, student, **{"finetune.linear_probe": True, "train.epochs": 2, "data.epoch_steps": 4,
                                     "train.batch_size": 32, "optim.warmup_epochs": 0.0})
    result = ft.finetune(cfg, tmp_path / "run")
    exported, saved = safetensors(tmp_path / "run" / "student"), safetensors(student)
    assert all(torch.equal(exported[k], v) for k, v in saved.items())
    head = {k for k in exported if k not in saved}
    assert head == {"head.weight", "head.bias"}
    assert result["results"]["linear_probe"] and result["results"]["epochs"] == 2
    # the exported (BatchNorm folded) model is a plain timm ViT that reloads with its classifier
    model = timm.create_model(f"local-dir:{tmp_path / 'run' / 'student'}", pretrained=True).eval()
    assert model.head.out_features == 100 and model.pretrained_cfg["mean"] == pytest.approx(data.IMAGENET_MEAN)


def test_a_config_claiming_fewer_blocks_than_the_weights_hold_is_refused(tmp_path):
    """config.json says depth 2, model.safetensors holds 4 blocks: fine-tuning must not drop blocks 2 and 3."""
    from timm.models import save_for_hf

    big, small = tmp_path / "big", tmp_path / "student"
    save_for_hf(tiny_vit(seed=3, depth=4), str(big), safe_serialization=True)
    save_for_hf(tiny_vit(seed=3, depth=2), str(small), safe_serialization=True)
    (small / "model.safetensors").write_bytes((big / "model.safetensors").read_bytes())
    with pytest.raises(HDError, match=r"does not fit its own config.json: unexpected blocks\.2\."):
        ft.build_model(ft.load_config(overrides={"finetune.dataset": "demo", "finetune.student": str(small),
                                                 "data.img_size": 32}), 10)
    from hdcli import teachers

    with pytest.raises(HDError, match=r"does not fit its own config.json: unexpected blocks\.2\."):
        teachers.load_student(str(small))  # analyze and export load through the same check


def test_linear_probing_follows_a_student_that_pools_by_averaging(tmp_path):
    """global_pool="avg": norm is Identity and fc_norm is the final norm; token pooling would miss norm.*"""
    from timm.models import save_for_hf

    student = tiny_vit(seed=5, global_pool="avg")
    save_for_hf(student, str(tmp_path / "student"), safe_serialization=True)
    cfg = ft.load_config(overrides={"finetune.dataset": "demo", "finetune.student": str(tmp_path / "student"),
                                    "data.img_size": 32, "finetune.linear_probe": True})
    model = ft.build_model(cfg, 10)
    torch.testing.assert_close(model.fc_norm.weight, student.fc_norm.weight)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                               student.forward_head(student.forward_features(x), pre_logits=True))


def test_token_pooling_of_an_averaging_student_trains_a_fresh_final_norm(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(tiny_vit(seed=5, global_pool="avg"), str(tmp_path / "student"), safe_serialization=True)
    cfg = ft.load_config(overrides={"finetune.dataset": "demo", "finetune.student": str(tmp_path / "student"),
                                    "data.img_size": 32, "finetune.global_pool": "token"})
    model = ft.build_model(cfg, 10)  # its fc_norm goes unused: not "does not fit its own config.json"
    assert isinstance(model.norm, torch.nn.LayerNorm)
