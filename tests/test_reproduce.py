"""Paper reproduction: recipes/paper/*, recipes/paper_results.toml, hdcli.paper.reproduce (plan, smoke chain), hdcli.paper.report."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from hdcli.config import DistillConfig, load_config
from hdcli.errors import HDError
from hdcli.paper import execute
from hdcli.paper import reproduce as rp
from hdcli.paper.report import fmt_diff, load_paper, read_detectron2, read_mmseg, record, report, runs_of
from hdcli.tools import flops

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "paper"
TABLE1_RUNS = ["distill-deit-vitb", "distill-mae-vitb", "distill-clip-vitb", "hybrid-mae-deit-vitb",
               "hybrid-mae-clip-vitb", "hybrid-mae-clip-vitl"]


def recipe(run: str) -> DistillConfig:
    return load_config(DistillConfig, recipe=RECIPES / f"{run}.toml")


# ---------------------------------------------------------------- the paper's numbers and the recipes

def test_paper_results_hold_every_row_of_tables_1_to_8():
    paper = load_paper()
    assert {n: len(t.rows) for n, t in paper.items()} == {
        "table1": 15, "table2": 8, "table3": 5, "table4": 5, "table5": 4, "table6": 3, "table7": 6, "table8": 6}
    main = next(r for r in paper["table1"].rows if r.run == "hybrid-mae-clip-vitb")
    assert main.paper == {"in1k": 85.1, "coco_box": 50.6, "coco_mask": 44.4, "ade20k": 51.5}
    vitl = next(r for r in paper["table2"].rows if r.run == "hybrid-mae-clip-vitl")
    assert vitl.paper == {"cifar100": 94.5, "cars": 95.6, "inat19": 85.3, "mean": 91.8}
    rand = next(r for r in paper["table8"].rows if r.cells[0] == "Random")
    assert (rand.cells[1], rand.paper) == ("35%", {"coco_box": 49.2, "coco_mask": 43.3})


def test_table2_means_are_the_means_of_the_printed_columns():
    for row in load_paper()["table2"].rows:
        p = row.paper
        assert abs((p["cifar100"] + p["cars"] + p["inat19"]) / 3 - p["mean"]) <= 0.051, row.cells


def test_every_trained_row_has_a_recipe_citing_its_table_and_every_recipe_is_used():
    paper = load_paper()
    runs = {r.run: [] for t in paper.values() for r in t.rows if r.run}
    for t in paper.values():
        for r in t.rows:
            if r.run:
                runs[r.run].append(t.number)
    assert {p.stem for p in RECIPES.glob("*.toml") if not p.stem.startswith("sec2-")} == set(runs)  # sec2: figures
    for run, tables in runs.items():
        text = (RECIPES / f"{run}.toml").read_text()
        for n in tables:
            assert f"Tab. {n}" in text, (run, n)
        recipe(run)  # loads and validates


def test_main_row_recipe_resolves_to_method_md_defaults_exactly():
    c, d = recipe("hybrid-mae-clip-vitb"), DistillConfig()
    assert c.distill == d.distill and c.optim == d.optim and c.student == d.student
    assert (c.data.img_size, c.data.scale, c.data.hflip) == (d.data.img_size, d.data.scale, d.data.hflip)
    assert c.train.epochs == d.train.epochs and c.train.accum_steps == d.train.accum_steps
    # METHOD.md "Defaults (paper's main setting)", written out
    from hdcli.teachers import resolve

    dc = c.distill
    assert [resolve(t).tag for t in dc.teachers] == ["vit_base_patch16_224.mae", "vit_base_patch16_clip_quickgelu_224.openai"]
    assert (dc.relation_blocks, dc.mask_blocks, dc.drop_ratio, dc.masking) == ([9, 10], [0, 4, 8], 0.3, "progressive")
    assert (dc.alpha, dc.beta, dc.targets) == (1.0, 2.0, [])
    o = c.optim
    assert (o.betas, o.weight_decay, o.warmup_epochs, o.clip_grad, o.lr) == ((0.9, 0.95), 0.05, 40.0, 3.0, None)
    assert math.isclose(o.blr * c.train.batch_size * rp.REF_WORLD / 256, 6e-4)  # lr 6e-4 at global batch 1024
    assert (c.train.epochs, c.student.arch, c.student.drop_path) == (300, "vit_base_patch16_224", 0.2)
    assert (c.data.img_size, c.data.scale, c.data.hflip) == (224, (0.2, 1.0), 0.5)


def test_main_rows_train_300_epochs_vitl_40_on_in21k_and_ablations_100():
    for run in TABLE1_RUNS:
        assert recipe(run).train.epochs == (40 if run.endswith("vitl") else 300), run
    assert rp.DISTILL_DATA == {"hybrid-mae-clip-vitl": "in21k"}
    for run in runs_of("ablations"):
        assert recipe(run).train.epochs == 100, run


def test_vitl_recipe_uses_the_papers_blocks_for_depth_24():
    from hdcli.method.names import paper_blocks

    c = recipe("hybrid-mae-clip-vitl")
    rel, mask = paper_blocks(24)
    assert (tuple(c.distill.relation_blocks), tuple(c.distill.mask_blocks)) == (rel, mask) == ((21, 22), (0, 8, 16))
    assert (c.distill.teachers, c.student.arch) == (["mae-l", "clip-l"], "vit_large_patch16_224")


def test_single_teacher_baselines_distil_features_only_without_masking():
    for name in ("deit", "mae", "clip"):
        dc = recipe(f"distill-{name}-vitb").distill
        assert (dc.teachers, dc.masking, dc.targets) == ([name], "none", [{"teacher": name, "kind": "features"}])


def test_table8_recipes_keep_the_printed_fractions_of_196_patches():
    keep = {run: flops.config_keep(recipe(run), 196) for run in
            ("abl-mask-progressive-50", "abl-mask-progressive-30", "abl-mask-progressive-10", "abl-mask-random",
             "abl-mask-direct", "abl-hybrid-mae-deit")}
    assert keep == {"abl-mask-progressive-50": 25, "abl-mask-progressive-30": 67, "abl-mask-progressive-10": 142,
                    "abl-mask-random": 67, "abl-mask-direct": 67, "abl-hybrid-mae-deit": 196}


def test_table7_rows_distil_relations_at_paper_layer_minus_one():
    blocks = {r.cells[0]: recipe(r.run).distill.relation_blocks for r in load_paper()["table7"].rows}
    assert blocks == {"1-11": list(range(11)), "1,2,3": [0, 1, 2], "5,6,7": [4, 5, 6], "9,10,11": [8, 9, 10],
                      "10,11": [9, 10], "11": [10]}


# ---------------------------------------------------------------- the plan

def test_fit_batch_keeps_the_global_batch_of_8_gpus():
    assert rp.fit_batch(128, 1, 8) == (128, 1)
    assert rp.fit_batch(128, 1, 1) == (128, 8)
    assert rp.fit_batch(128, 1, 2) == (128, 4)
    assert rp.fit_batch(128, 1, 16) == (64, 1)
    assert rp.fit_batch(128, 1, 3) == (128, 3)  # 1024 / 3 does not divide: nearest accumulation (1152)


def test_distill_flops_equals_the_flop_model_of_the_hybrid_step():
    from hdcli.tools import flops

    c = recipe("hybrid-mae-clip-vitb")
    ref = flops.hybrid_step(rp.arch_dims("mae"), rp.arch_dims("clip"), rp.arch_dims("vit_base_patch16_224"),
                            n_patches=196, n_keep=67)
    assert rp.distill_flops(c) == ref.teachers + ref.student_fwd + ref.student_bwd


def test_dry_run_lists_distill_finetune_and_export_for_every_table1_row(tmp_path):
    p = rp.plan("table1", out=tmp_path, data={"in1k": "/data/in1k", "in21k": "/data/in21k"}, gpus=8)
    text = execute.format_plan(p)
    stages = {}
    for s in p.steps:
        stages.setdefault(s.run, []).append(s.stage)
        assert s.command() in text
    for run in TABLE1_RUNS:
        assert stages[run][:4] == ["distill", "finetune:in1k", "export:detectron2", "export:mmseg"], run
        distill = next(s for s in p.steps if s.run == run and s.stage == "distill")
        assert distill.gpu_hours > 0 and f"recipes/paper/{run}.toml" in distill.argv
    assert stages[""] == ["teachers", "report"]
    assert "ASSUMED" in text and "remaining:" in text


def test_dry_run_on_one_gpu_accumulates_and_on_two_nodes_uses_srun(tmp_path):
    one = rp.plan("table1", out=tmp_path, gpus=1, only=["hybrid-mae-clip-vitb"])
    argv = next(s.argv for s in one.steps if s.stage == "distill")
    assert argv[:3] == ["hd", "--offline", "distill"] and argv[argv.index("--accum-steps") + 1] == "8"
    two = rp.plan("table1", out=tmp_path, gpus=8, nodes=2, only=["hybrid-mae-clip-vitb"])
    argv = next(s.argv for s in two.steps if s.stage == "distill")
    assert argv[:3] == ["srun", "--nodes", "2"] and "--num_processes 16 --num_machines 2" in argv[-1]
    assert "--batch-size 64" in argv[-1] and "$SLURM_NODEID" in argv[-1]


def test_bench_json_sets_the_tflops_of_the_estimate(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"tflops": 100.0, "config": {"device": "NVIDIA H100"}}))
    fast = rp.plan("table2", out=tmp_path, gpus=8, only=["hybrid-mae-clip-vitb"], bench=str(bench))
    slow = rp.plan("table2", out=tmp_path, gpus=8, only=["hybrid-mae-clip-vitb"], tflops=50.0)
    h = [next(s.gpu_hours for s in p.steps if s.stage == "distill") for p in (fast, slow)]
    assert math.isclose(h[1], 2 * h[0]) and "NVIDIA H100" in execute.format_plan(fast)


def test_a_finished_stage_is_marked_done_and_skipped(tmp_path):
    student = tmp_path / "hybrid-mae-clip-vitb" / "distill" / "student" / "model.safetensors"
    student.parent.mkdir(parents=True)
    student.write_bytes(b"")
    p = rp.plan("table1", out=tmp_path, gpus=8, only=["hybrid-mae-clip-vitb"])
    distill = next(s for s in p.steps if s.stage == "distill")
    assert distill.is_done and re.search(r"^\[distill\] [\d.,]+ GPU-h \| done, skipped$", execute.format_plan(p), re.M)
    assert not next(s for s in p.steps if s.stage == "finetune:in1k").is_done


def test_missing_data_variable_stops_before_anything_runs(tmp_path):
    p = rp.plan("table2", out=tmp_path / "out", gpus=8, data={"in1k": str(tmp_path)})
    with pytest.raises(HDError, match="DATA_CIFAR"):
        execute.execute(p)
    assert not (tmp_path / "out").exists()


def test_smoke_and_full_runs_never_share_an_out_dir(tmp_path):
    (tmp_path / "reproduce.json").write_text(json.dumps({"scale": "smoke"}))
    with pytest.raises(HDError, match="SCALE=smoke"):
        execute.execute(rp.plan("table1", out=tmp_path, gpus=8, data={"in1k": str(tmp_path)}))


def test_weak_mae_row_needs_its_teacher_and_renames_it_in_the_command(tmp_path):
    p = rp.plan("ablations", out=tmp_path, gpus=8, only=["abl-hybrid-weakmae-clip"])
    assert "MAE_IN100" in next(s.skip for s in p.steps if s.stage == "distill")
    p = rp.plan("ablations", out=tmp_path, gpus=8, only=["abl-hybrid-weakmae-clip"], mae_in100="/t/mae100")
    argv = next(s.argv for s in p.steps if s.stage == "distill")
    assert argv[argv.index("--teachers") + 1] == "/t/mae100,clip"


# ---------------------------------------------------------------- the report

def test_fmt_diff_is_ours_minus_paper_with_a_sign():
    assert (fmt_diff(85.4, 85.1), fmt_diff(83.9, 85.1), fmt_diff(85.08, 85.1), fmt_diff(None, 85.1)) == \
        ("+0.3", "-1.2", "+0.0", "—")


def finetuned(run_dir: Path, key: str, top1: float, epochs: int = 100, total: int = 100) -> None:
    d = run_dir / f"ft-{key}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"top1": top1, "best_top1": top1 + 1, "epochs": epochs,
                                                "total_epochs": total, "dataset": key}))


def test_report_puts_our_numbers_beside_the_papers_with_the_difference(tmp_path):
    run = tmp_path / "hybrid-mae-clip-vitb"
    finetuned(run, "in1k", 84.93)
    record(run, box_ap=51.0, mask_ap=44.4, miou=50.0)
    text = report("table1", tmp_path)
    assert "| Hybrid Distill† | ViT-B | ✓ | 85.1 | 84.9 | -0.2 | 50.6 | 51.0 | +0.4 | 44.4 | 44.4 | +0.0 | " \
           "51.5 | 50.0 | -1.5 |" in text
    assert "| DeiT [36] | ViT-B |  | 81.8 | — | — | 46.9 | — | — |" in text
    assert "| MAE [13] | ViT-L |  | 85.9 | — | — | 54.0 | — | — | 47.1 | — | — | — | — | — |" in text
    assert "SCALE=smoke" not in text


def test_report_table2_means_our_three_sets_and_flags_unfinished_runs(tmp_path):
    run = tmp_path / "distill-clip-vitb"
    for key, v in (("cifar100", 91.0), ("cars", 94.0), ("inat19", 80.0)):
        finetuned(run, key, v, epochs=50 if key == "inat19" else 100)
    text = report("table2", tmp_path)
    assert "| Distill-CLIP | ViT-B | 91.6 | 91.0 | -0.6 | 94.3 | 94.0 | -0.3 | 81.6 | 80.0* | -1.6 | 89.2 | 88.3* | -0.9 |" in text
    assert "distill-clip-vitb: inat19 not finished (epoch 50/100)" in text


def test_read_detectron2_takes_the_last_evaluation(tmp_path):
    lines = [{"iteration": 10, "total_loss": 1.0}, {"iteration": 100, "bbox/AP": 40.0, "segm/AP": 35.0},
             {"iteration": 150, "total_loss": 0.5}, {"iteration": 200, "bbox/AP": 50.6, "segm/AP": 44.4}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_detectron2(tmp_path) == {"box_ap": 50.6, "mask_ap": 44.4}


def test_read_mmseg_reads_percent_or_fraction_from_the_newest_log(tmp_path):
    vis = tmp_path / "20240101_000000" / "vis_data"
    vis.mkdir(parents=True)
    (vis / "scalars.json").write_text(json.dumps({"mIoU": 48.0, "step": 16000}) + "\n"
                                      + json.dumps({"mIoU": 51.5, "step": 160000}) + "\n")
    assert read_mmseg(tmp_path) == 51.5
    old = tmp_path / "old.log.json"
    old.write_text(json.dumps({"mode": "val", "mIoU": 0.476}) + "\n")
    assert math.isclose(read_mmseg(old), 47.6)


def test_report_cli_writes_the_file_and_record_rejects_fractions(hd, tmp_path):
    run = tmp_path / "abl-hybrid-mae-deit"
    run.mkdir()
    bad = hd("report", "record", str(run), "--coco-box", "0.5", "--coco-mask", "0.44")
    assert bad.returncode == 2 and "not a percentage" in bad.stderr
    ok = hd("report", "record", str(run), "--coco-box", "50.1", "--coco-mask", "43.8")
    assert ok.returncode == 0, ok.stderr
    r = hd("report", "ablations", "--runs", str(tmp_path), "--out", str(tmp_path / "abl.md"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "abl.md").read_text()
    for table in range(3, 9):
        assert f"### Table {table}:" in text
    assert "| 10,11 | 50.0 | 50.1 | +0.1 | 43.9 | 43.8 | -0.1 |" in text


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_smoke_table1_runs_the_whole_chain_and_reports_every_row(hd, tmp_path):
    out = tmp_path / "smoke"
    r = hd("reproduce", "table1", "--scale", "smoke", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (out / "table1.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| Method", "| ---"))]
    assert [re.split(r" \| ", row)[:2] for row in rows] == \
        [[f"| {r.cells[0]}", r.cells[1]] for r in load_paper()["table1"].rows]
    for row in rows[-6:]:  # the six trained rows carry our (smoke) IN-1k top-1
        assert re.match(r"\| [^|]+ \| ViT-[BL] \| ✓ \| [\d.]+ \| \d+\.\d \| [+-]\d+\.\d \|", row), row
    assert "SCALE=smoke" in text
    for run in TABLE1_RUNS:
        assert (out / run / "export" / "detectron2.pth").is_file() and (out / run / "export" / "mmseg.pth").is_file()
    again = rp.plan("table1", out=out, scale="smoke")
    assert all(s.is_done for s in again.steps if s.stage != "report" and not s.skip)


@pytest.mark.slow
def test_make_reproduce_dry_run_prints_the_plan(tmp_path):
    r = subprocess.run(["make", "-o", "install", "reproduce-table1", "DRY_RUN=1", "GPUS=1", f"OUT={tmp_path}",
                        "DATA_IN1K=/data/in1k", "RUNS=hybrid-mae-clip-vitb"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    distill = next(line for line in r.stdout.splitlines() if line.startswith("  hd --offline distill"))
    assert "--data /data/in1k" in distill and "--accum-steps 8" in distill
    assert re.search(r"^  hd --offline finetune imagenet .*--data-dir /data/in1k", r.stdout, re.M)
    assert not (tmp_path / "hybrid-mae-clip-vitb").exists()


def test_finetune_recipes_are_found_by_data_set_and_size(tmp_path):
    for name in ("imagenet-vitb.toml", "in1k_vitl.toml", "cifar100.toml", "cars-large.toml", "inat19-base.toml"):
        (tmp_path / name).write_text("")
    found = {(k, a): rp.finetune_recipe(k, a, tmp_path) for k in ("in1k", "cifar100", "cars", "inat19")
             for a in ("vit_base_patch16_224", "vit_large_patch16_224")}
    assert {k: v.name if v else None for k, v in found.items()} == {
        ("in1k", "vit_base_patch16_224"): "imagenet-vitb.toml", ("in1k", "vit_large_patch16_224"): "in1k_vitl.toml",
        ("cifar100", "vit_base_patch16_224"): "cifar100.toml", ("cifar100", "vit_large_patch16_224"): None,
        ("cars", "vit_base_patch16_224"): None, ("cars", "vit_large_patch16_224"): "cars-large.toml",
        ("inat19", "vit_base_patch16_224"): "inat19-base.toml", ("inat19", "vit_large_patch16_224"): None}
