"""hdcli.tools.flops against hand computations and torch.utils.flop_counter; hd bench's JSON contract.

No timing assertions here: speed targets live in benchmarks/ (docs/performance.md).
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import TINY, tiny_vit

from hdcli.bench import distill as bench
from hdcli.errors import HDError
from hdcli.method import HybridDistill
from hdcli.tools import flops

CLIP = "vit_base_patch16_clip_quickgelu_224"
TINY_ARGS = ["--img-size", "32", "--patch-size", "4", "--dim", "48", "--depth", "12", "--heads", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def hybrid(drop_ratio: float, **kw) -> HybridDistill:
    return HybridDistill(tiny_vit(seed=0, **kw), tiny_vit(seed=1, **kw), tiny_vit(CLIP, seed=2, **kw),
                         drop_ratio=drop_ratio)


def counted_step(method: HybridDistill, batch: int, img: int) -> int:
    """FLOPs torch's counter sees in one forward + backward of the method, per image."""
    x = torch.randn(batch, 3, img, img)

    def step():
        method(x).loss.backward()

    n, _ = flops.count_flops(step)
    return n // batch


# ------------------------------------------------------------------ hand computations

def test_vit_b_forward_is_the_textbook_count():
    # per block 24·T·D² + 4·T²·D (qkv 6TD², proj 2TD², MLP 16TD², q·kᵀ and attn·v 2T²D each), T = 197
    t, d = 197, 768
    per_block = 24 * t * d * d + 4 * t * t * d
    patch = 2 * 196 * (3 * 16 * 16) * d
    assert flops.encoder(flops.vit_dims(768, 12, 12), 196, 197, 12) == 12 * per_block + patch


def test_mim_teacher_stops_at_the_last_relation_block():
    v = flops.vit_dims(48, 12, 3, patch=4)
    s = flops.hybrid_step(v, v, v, n_patches=64, n_keep=64)  # nothing dropped: mask blocks not entered
    # blocks 0..9 on all 65 tokens, then q·kᵀ entering blocks 9 and 10 on the same 65 tokens
    assert s.mim_teacher == flops.encoder(v, 64, 65, 10) + 2 * flops.relations(v, 65)


def test_student_backward_is_twice_forward_except_patch_embedding():
    v = flops.vit_dims(48, 12, 3, patch=4)
    s = flops.hybrid_step(v, v, v, n_patches=64, n_keep=22)
    pe = flops.patch_embed(v, 64)
    assert s.student_bwd == 2 * (s.student_fwd - pe) + pe


def test_keep_fraction_cuts_the_vit_b_step_to_about_0_58():
    b = flops.vit_dims(768, 12, 12)
    full = flops.hybrid_step(b, b, b, n_patches=196, n_keep=196)
    kept = flops.hybrid_step(b, b, b, n_patches=196, n_keep=67)
    assert kept.total / full.total == pytest.approx(0.583, abs=0.002)


def test_dims_of_reads_timm_modules():
    m = tiny_vit(CLIP, embed_dim=64, num_heads=4)
    assert flops.dims_of(m) == flops.ViTDims(dim=64, depth=12, heads=4, head_dim=16, mlp_hidden=256, patch_in=48)


# ------------------------------------------------------------------ against torch.utils.flop_counter

@pytest.mark.parametrize("config", [
    dict(drop_ratio=0.3, batch=2, img=32, kw={}),
    dict(drop_ratio=0.0, batch=2, img=32, kw={}),
    dict(drop_ratio=0.3, batch=1, img=224, kw=dict(img_size=224, patch_size=16, embed_dim=384, num_heads=6)),
], ids=["tiny-keep34", "tiny-keep100", "vit-s-keep34"])
def test_flop_model_within_5_percent_of_flop_counter(config):
    method = hybrid(config["drop_ratio"], **config["kw"])
    counted = counted_step(method, config["batch"], config["img"])
    model = flops.of_method(method, recompute=True).total
    assert abs(model - counted) / counted <= 0.05


def test_flop_model_counts_every_matmul_of_the_step():
    method = hybrid(0.3)
    counted = counted_step(method, 2, TINY["img_size"])
    model = flops.of_method(method, recompute=True)
    assert model.total - model.loss == counted  # the loss is the only elementwise term


# ------------------------------------------------------------------ bench

def test_peak_table_matches_device_names():
    assert [bench.peak_tflops(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200",
                                           "NVIDIA A100-SXM4-80GB", "NVIDIA L40S", "NVIDIA GeForce RTX 4090",
                                           "Tesla T4")] == [989.0, 756.0, 989.0, 312.0, 362.0, 165.0, None]


@pytest.fixture(scope="module")
def tiny_bench():
    cfg = bench.DistillBench(img_size=32, patch_size=4, dim=48, depth=12, heads=3, batch_size=2, steps=2, warmup=1,
                             gemm_size=128, reference=True, peak_tflops=2.0, cpu=True, compare_drop_ratio=0.0)
    return bench.distill(cfg)


def test_distill_result_has_the_issue_schema(tiny_bench):
    r = tiny_bench
    assert {"images_per_s", "step_ms", "tflops", "mfu", "peak_mem_mb", "breakdown_ms", "gemm_tflops", "of_gemm",
            "config"} <= set(r)
    assert set(r["breakdown_ms"]) == {"mim_teacher", "feat_teacher", "student", "optimizer"}
    assert all(r[k] > 0 for k in ("images_per_s", "step_ms", "tflops", "peak_mem_mb", "gemm_tflops", "of_gemm"))


def test_distill_keeps_the_paper_token_count(tiny_bench):
    c = tiny_bench["config"]
    assert (c["n_patches"], c["n_keep"], c["relation_blocks"], c["mask_blocks"]) == (64, 22, [9, 10], [0, 4, 8])


def test_distill_derived_figures_are_consistent(tiny_bench):
    r = tiny_bench
    assert r["images_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
    assert r["tflops"] == pytest.approx(r["flops_per_image"]["total"] * 2 / (r["step_ms"] / 1e3) / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops"] / 2.0)


def test_of_gemm_is_the_median_of_neighbouring_step_and_matmul(tiny_bench):
    r, s = tiny_bench, tiny_bench["samples_ms"]
    step_flops, gemm_flops = r["flops_per_image"]["total"] * 2, 2 * 128**3
    per_step = [(step_flops / t) / (gemm_flops / g) for t, g in zip(s["step"], s["gemm"], strict=True)]
    assert r["of_gemm"] == pytest.approx(statistics.median(per_step))


def test_compare_alternates_with_the_all_tokens_method(tiny_bench):
    cmp = tiny_bench["compare"]
    assert (cmp["n_keep"], len(tiny_bench["samples_ms"]["compare_step"])) == (64, 2)
    assert cmp["gflops_per_image"] > tiny_bench["gflops_per_image"]


@pytest.mark.slow
def test_cli_bench_distill_json(hd):
    res = hd("bench", "distill", *TINY_ARGS, "--batch-size", "2", "--steps", "2", "--warmup", "1", "--gemm-size",
             "64", "--signals", "--json", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["config"]["student"] == "vit_base_patch16_224" and out["breakdown_ms"]["student"] > 0
    # --signals: odd steps are logged steps (per-target signals): their ratio to the neighbouring plain steps
    sig, s = out["signals"], out["samples_ms"]
    assert len(s["signals_step"]) == len(s["step"]) == 2
    assert sig["signals_step_over_step"] == pytest.approx(statistics.median(
        y / x for x, y in zip(s["step"], s["signals_step"], strict=True)), rel=1e-6)
    assert sig["overhead_at_log_every_50"] == pytest.approx((sig["signals_step_over_step"] - 1) / 50)


def test_unknown_teacher_names_the_registry_and_suggests():
    with pytest.raises(HDError, match="unknown teacher architecture 'mea'") as e:
        bench.teacher_arch("mea")
    assert "mae" in e.value.hint


def test_bench_data_compares_the_decode_paths_interleaved(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    for i, a in enumerate(load_sample_images().images):  # real photos, as JPEG files
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(a).save(tmp_path / "c" / f"{i}.jpg", quality=90)
    from hdcli.bench import data as databench

    r = databench.data(str(tmp_path), img_size=64, batch_size=2, workers=0, batches=2, warmup=1, rounds=2,
                   step_rate=1000.0, cpu=True)
    assert set(r["paths"]) == {"pil", "cpu", "gpu"} and r["workers"] == 0 and r["config"]["batch_size"] == 2
    for res in r["paths"].values():
        assert len(res["samples_s"]) == 2 and res["images_per_s"] > 0
        assert res["cores_needed"] == pytest.approx(1000.0 / res["per_core_images_per_s"])
        assert res["speedup"] == pytest.approx(statistics.median(
            a / b for a, b in zip(r["paths"]["pil"]["samples_s"], res["samples_s"], strict=True)))
    assert r["paths"]["pil"]["speedup"] == 1.0
    assert r["paths"]["gpu"]["device_images_per_s"] > 0 and r["paths"]["gpu"]["cpu_fallbacks"] == 0
    with pytest.raises(HDError, match="unknown decode path 'nvjpeg'"):
        databench.data("demo", paths=("nvjpeg",))


def test_bench_distill_with_real_data_alternates_loader_and_synthetic_steps():
    cfg = bench.DistillBench(img_size=32, patch_size=8, dim=48, depth=4, heads=3, batch_size=4, steps=2, warmup=1,
                             cpu=True, breakdown=False, gemm=False, data="demo", workers=0)
    r = bench.distill(cfg)
    d, s = r["data"], r["samples_ms"]
    assert len(s["step"]) == len(s["synthetic_step"]) == 2 and d["source"] == "demo" and d["workers"] == 0
    assert d["real_over_synthetic"] == pytest.approx(statistics.median(
        x / y for x, y in zip(s["step"], s["synthetic_step"], strict=True)), rel=1e-6)
    assert d["waited_for_data"] == (d["real_over_synthetic"] > 1.05)
    with pytest.raises(HDError, match="each alternate the steps"):
        bench.distill(bench.DistillBench(cpu=True, data="demo", signals=True))
