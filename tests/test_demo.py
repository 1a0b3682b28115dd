"""hd demo: the report pieces on hand-written results, and ``hd demo --quick`` end to end (every stage,
every report section, the table on stdout, finished stages skipped on a re-run)."""

from __future__ import annotations

import json
import re
import time

import pytest

from hdcli.paper import demo


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_spread_is_the_population_std_over_heads():
    assert demo.spread([1.0, 3.0]) == pytest.approx(1.0)
    assert demo.spread([2.0, 2.0, 2.0]) == 0.0


def test_summary_rows_read_results_and_analysis(tmp_path):
    _write(tmp_path / "eval" / "student-probe" / "results.json", {"top1": 81.25})
    _write(tmp_path / "eval" / "student-finetune" / "results.json", {"top1": 90.5})
    per_head = [[1.0, 3.0]] * 12
    entry = {"per_head": per_head, "per_block": [2.0] * 11 + [4.0]}
    _write(tmp_path / "analysis" / "head_distance.json", {"models": {"student": entry}})
    _write(tmp_path / "analysis" / "nmi.json", {"models": {"student": {"per_head": per_head,
                                                                       "per_block": [0.1] * 11 + [0.25]}}})
    rows = demo.summary_rows(tmp_path)
    assert [r["model"] for r in rows] == list(demo.MODELS)
    table = demo.table_rows(rows)
    # mean head distance (11·2 + 4)/12, spread at blocks 9, 10 = 1.0, NMI of the last block
    assert table[0] == [demo.LABELS["student"], "✓", "81.2", "90.5", f"{26 / 12:.2f}", "1.00", "0.250"]
    assert table[1][2:] == ["–"] * 5  # nothing for the MAE teacher yet


def test_quick_scale_is_a_few_steps_per_stage():
    q = demo.QUICK
    assert max(q.mae_steps, q.sup_steps, q.distill_steps) <= 5 and q.epoch_steps <= 3
    assert demo.FULL.model == q.model  # same models, fewer steps


def test_stage_plan_covers_the_chain(tmp_path):
    names = [s.name for s in demo.stages(tmp_path, demo.QUICK)]
    assert names[:3] == ["pretrain-mae", "pretrain-sup", "distill"]
    assert names[-1] == "analyze"
    assert {f"{k}-{m}" for k in ("probe", "finetune") for m in demo.MODELS} <= set(names)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from tests.conftest import run_hd

    out = tmp_path_factory.mktemp("demo") / "demo"
    t0 = time.perf_counter()
    r = run_hd("demo", "--quick", "--out", str(out), env={"CI": "1"})
    return out, r, time.perf_counter() - t0


@pytest.mark.slow
def test_quick_demo_succeeds(quick_run):
    out, r, seconds = quick_run
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_quick_demo_report_has_every_section(quick_run):
    out, r, _ = quick_run
    report = (out / "report.md").read_text()
    for section in ("# hd demo report", "## Results (in the shape of the paper's Table 1)", "## Setup",
                    "## Watching the distillation", "## Attention analysis", "## Stages", "## Reading it"):
        assert section in report, section
    for label in demo.LABELS.values():
        assert re.search(rf"^\| {re.escape(label)} \|", report, re.M), label
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file(), image
    assert len(re.findall(r"!\[", report)) == 3 and "](student/plots/knn.png)" in report
    # the k-NN curve: the student at steps 0, 2, 4 (QUICK: every 2 of 4 steps) and both teachers' lines
    assert re.findall(r"^\| (\d+) \| \d", report, re.M) == ["0", "2", "4"]
    assert re.search(r"^\| teacher mae \| \d", report, re.M) and re.search(r"^\| teacher sup \| \d", report, re.M)


@pytest.mark.slow
def test_quick_demo_accuracies_are_numbers(quick_run):
    out, _, _ = quick_run
    for row in demo.table_rows(demo.summary_rows(out)):
        for cell in row[2:]:
            float(cell)  # no "–": every stage wrote its numbers


@pytest.mark.slow
def test_quick_demo_prints_the_table_on_stdout(quick_run):
    _, r, _ = quick_run
    assert "hd demo" in r.stdout and "LP top-1" in r.stdout
    assert all(label in r.stdout for label in demo.SHORT_LABELS.values())


@pytest.mark.slow
def test_rerun_skips_finished_stages(quick_run, hd):
    out, _, first = quick_run
    r = hd("demo", "--quick", "--out", str(out), env={"CI": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("skipped") == len(demo.stages(out, demo.QUICK))
    log = json.loads((out / demo.STAGES_FILE).read_text())
    assert all(s["skipped"] for s in log.values())


@pytest.mark.slow
def test_other_settings_in_the_same_dir_are_refused(quick_run, hd):
    out, _, _ = quick_run
    r = hd("demo", "--out", str(out), "--seed", "1")
    assert r.returncode == 2
    assert "other settings" in r.stderr and "--force" in r.stderr
