"""Watching a run (hdcli.watch): the k-NN classifier, per-target signals, the eval set, ``hd plot``, trackers,
and the in-run evaluation of ``hd distill`` end to end on the demo digits."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_hd, tiny_vit

from hdcli.errors import HDError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- k-NN (pure)

def _knn_loop(bank, bank_y, queries, k, t, c):
    """DINO's eval_knn written out per query: cosine similarities, the k largest, exp(s/T) votes per class."""
    preds = []
    for q in queries:
        sims = [float(torch.dot(q / q.norm(), b / b.norm())) for b in bank]
        top = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * c
        for i in top:
            votes[int(bank_y[i])] += math.exp(sims[i] / t)
        preds.append(max(range(c), key=lambda j: votes[j]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 5, 60])
def test_knn_equals_a_loop_over_queries(k):
    from hdcli.watch.knn import knn_correct, knn_predict

    g = torch.Generator().manual_seed(k)
    bank, bank_y = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    queries, query_y = torch.randn(30, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    want = _knn_loop(bank, bank_y, queries, min(k, 50), 0.1, 4)
    got = knn_predict(bank, bank_y, queries, k=k, temperature=0.1, num_classes=4, chunk=7)
    assert torch.equal(got, want)
    assert knn_correct(bank, bank_y, queries, query_y, k=k, temperature=0.1, num_classes=4) == int((want == query_y).sum())


def test_knn_of_features_that_ignore_the_image_is_near_chance():
    """A 'student' whose features carry nothing of the image scores chance (10 % on the digits), not more:
    the k-NN does not leak labels."""
    from hdcli.watch.knn import knn_correct

    g = torch.Generator().manual_seed(0)
    bank_y, query_y = torch.randint(0, 10, (1000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    hits = knn_correct(torch.randn(1000, 48, generator=g), bank_y, torch.randn(2000, 48, generator=g), query_y)
    assert 0.07 <= hits / 2000 <= 0.13


def test_knn_matches_sklearn_on_separable_features():
    from sklearn.neighbors import KNeighborsClassifier

    from hdcli.watch.knn import knn_predict

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 3
    y = torch.randint(0, 5, (200,), generator=g)
    x = centres[y] + 0.5 * torch.randn(200, 16, generator=g)
    xn = torch.nn.functional.normalize(x, dim=1)
    sk = KNeighborsClassifier(n_neighbors=1).fit(xn[:150].numpy(), y[:150].numpy()).predict(xn[150:].numpy())
    assert torch.equal(knn_predict(x[:150], y[:150], x[150:], k=1), torch.from_numpy(sk))


# ---------------------------------------------------------------- signals (pure)

def test_grad_shares_are_the_gradient_norms_by_hand_and_sum_to_one():
    from hdcli.method.signals import grad_shares

    w = torch.tensor([1.0, -2.0, 2.0], requires_grad=True)
    other = torch.tensor([3.0], requires_grad=True)
    a = torch.tensor([3.0, 0.0, 4.0])
    losses = {"lin": (w * a).sum(), "sq": 0.5 * 2.0 * (w ** 2).sum(), "elsewhere": other.sum() * 5}
    shares = grad_shares(losses, [w])
    # ∇lin = a (norm 5), ∇sq = 2w (norm 6), 'elsewhere' does not reach w
    assert float(shares["lin"]) == pytest.approx(5 / 11) and float(shares["sq"]) == pytest.approx(6 / 11)
    assert float(shares["elsewhere"]) == 0.0
    assert float(sum(shares.values())) == pytest.approx(1.0)
    assert w.grad is None  # nothing written to .grad; the graph is still there for the step's backward
    losses["lin"].backward()
    assert torch.equal(w.grad, a)


def test_grad_shares_of_fp16_losses_use_the_gradient_scalers_scale():
    """Under fp16 mixed precision the gradients of small losses flush to zero unless the losses are scaled first
    (as the step's own backward scales them): the shares are then those of the unscaled losses."""
    from hdcli.method.signals import grad_shares

    w = torch.ones(4, dtype=torch.float16, requires_grad=True)
    # fp32 losses of fp16 activations (as under autocast): their gradients at w, 1e-9 and 3e-9, flush to 0 in fp16
    losses = {"a": (w * 1e-4).float().sum() * 1e-5, "b": (w * 3e-4).float().sum() * 1e-5}
    flushed = grad_shares(losses, [w])
    assert float(flushed["a"]) == float(flushed["b"]) == 0.0  # what an fp16 run logged before
    shares = grad_shares(losses, [w], scale=65536.0)
    assert float(shares["a"]) == pytest.approx(0.25, rel=1e-2) and float(shares["b"]) == pytest.approx(0.75, rel=1e-2)


def test_attention_agreement_and_cosine_by_hand():
    from hdcli.method.signals import attention_agreement, cosine

    r = torch.randn(2, 3, 5, 5)
    assert float(attention_agreement(r, r, 0.5, 0.5)) == pytest.approx(1.0)
    # one row, two keys: p = softmax([0, 0]) = (.5, .5), q = softmax([ln 3, 0]) = (.75, .25): Σ min = .75
    rs = torch.zeros(1, 1, 1, 2)
    rt = torch.tensor([[[[math.log(3.0), 0.0]]]])
    assert float(attention_agreement(rs, rt, 1.0, 1.0)) == pytest.approx(0.75)
    # and the teacher's own scale: r·scale = (ln 3, 0) from r = (2 ln 3, 0) with scale 1/2
    assert float(attention_agreement(rs, 2 * rt, 1.0, 0.5)) == pytest.approx(0.75)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert float(cosine(a, b)) == pytest.approx((1 / math.sqrt(2) - 1) / 2)


def test_distiller_signals_match_a_hand_computation_and_the_shared_block():
    from hdcli.method import Distiller, HybridDistill, Target
    from hdcli.method.norms import layernorm as normalize_target
    from hdcli.method.signals import attention_agreement, cosine
    from hdcli.models import vit

    student, mim, feat = tiny_vit(seed=0), tiny_vit("vit_base_patch16_224.mae", seed=1), tiny_vit(seed=2)
    hd = HybridDistill(student, mim, feat, relation_blocks=(9, 10), masking="none").eval()
    assert hd.shared_block == 8
    assert Distiller(tiny_vit(seed=3), {"f": feat}, [Target("f", "features")], masking="none").shared_block == 11
    assert Distiller(tiny_vit(seed=3), {"f": feat}, [Target("f", "block", (5,))], masking="none").shared_block == 5
    x = torch.randn(2, 3, 32, 32)
    out = hd(x, detail=True)
    assert set(out.signals) == {"cos/feature/features", "attn/mim/relations/9", "attn/mim/relations/10"}
    s_feat = vit.run_blocks(student, *vit.embed(student, x), final=True)[2]
    t_feat = vit.run_blocks(feat, *vit.embed(feat, hd.teacher_input("feature", x)), final=True)[2]
    with torch.no_grad():
        want = cosine(hd.feature_head(s_feat), normalize_target(t_feat))
    assert float(out.signals["cos/feature/features"]) == pytest.approx(float(want), abs=1e-5)
    s_in = vit.run_blocks(student, *vit.embed(student, x), enter={9})[0][9]
    t_in = vit.run_blocks(mim, *vit.embed(mim, hd.teacher_input("mim", x)), enter={9})[0][9]
    with torch.no_grad():
        want = attention_agreement(vit.relations(student.blocks[9], s_in), vit.relations(mim.blocks[9], t_in),
                                   student.blocks[9].attn.scale, mim.blocks[9].attn.scale)
    assert float(out.signals["attn/mim/relations/9"]) == pytest.approx(float(want), abs=1e-5)
    assert hd(x).signals == {}


# ---------------------------------------------------------------- the eval set

def test_eval_sizes_defaults_caps_and_held_out():
    from hdcli.watch.monitor import eval_sizes

    assert eval_sizes(None, 1_281_167, 50_000) == (10_000, 5_000)  # ImageNet: the 10,000 / 5,000
    assert eval_sizes(None, 1437, 360) == (143, 71)  # the demo digits: 1/10 and 1/20 of the train split
    assert eval_sizes([500, 400], 1437, 360) == (500, 360)  # asked for, capped by the splits
    assert eval_sizes([2000], 1437, None) == (1436, 1)  # held out of train: the queries never overlap the bank
    assert eval_sizes([100, 50], 1437, None) == (100, 50)


def test_eval_set_is_seeded_disjoint_and_split_across_ranks_in_one_order(tmp_path):
    from hdcli.watch.monitor import load_eval_set

    kw = dict(img_size=32, samples=[40, 20], seed=3, num_workers=0, max_bad_fraction=0.001)
    bank, queries, what = load_eval_set("demo", rank=0, world=1, **kw)
    assert len(bank.labels) == 40 and len(queries.labels) == 20 and "val split" in what
    parts = [load_eval_set("demo", rank=r, world=3, **kw) for r in range(3)]
    pos = torch.cat([p[0].position for p in parts])
    order = pos.argsort()
    assert torch.equal(torch.cat([p[0].images for p in parts])[order], bank.images)
    assert torch.equal(torch.cat([p[1].labels for p in parts])[torch.cat([p[1].position for p in parts]).argsort()],
                       queries.labels)
    # a folder without a val/ split: queries held out of the train images, disjoint from the bank
    from PIL import Image

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(12):
            Image.new("RGB", (40, 36), (20 * i, 100 * c, 7)).save(tmp_path / f"c{c}" / f"{i}.png")
    bank, queries, what = load_eval_set(str(tmp_path), rank=0, world=1, **{**kw, "samples": [16, 8]})
    assert "held-out" in what and len(bank.labels) == 16 and len(queries.labels) == 8
    colour = {tuple(im[:, 0, 0].tolist()) for im in bank.images}  # each image is one colour of its own
    assert len(colour) == 16 and not any(tuple(im[:, 0, 0].tolist()) in colour for im in queries.images)


def test_shard_eval_set_reads_only_what_it_needs_and_splits_across_ranks(tmp_path):
    from hdcli import data
    from hdcli.watch.monitor import embed_part, load_eval_set

    data.write_shards("demo", tmp_path / "wds", maxcount=200, shuffle=False)
    kw = dict(img_size=32, samples=[40, 20], seed=0, num_workers=0, max_bad_fraction=0.001)
    bank, queries, what = load_eval_set(str(tmp_path / "wds"), rank=0, world=1, **kw)
    assert len(bank.labels) == 40 and len(queries.labels) == 20 and "val shards" in what
    parts = [load_eval_set(str(tmp_path / "wds"), rank=r, world=2, **kw) for r in range(2)]
    pos = torch.cat([p[0].position for p in parts])
    assert sorted(pos.tolist()) == list(range(40))  # 40 in all, from each rank's own shards (not the 1-rank set)
    assert sum(len(p[1].labels) for p in parts) == 20
    probe = load_eval_set(str(tmp_path / "wds"), rank=0, world=1, positions=slice(0, 8), **kw)[1]
    assert torch.equal(probe.images, queries.images[:8])
    # a rank with nothing to embed still gathers [0, D]
    empty = type(bank)(bank.images[:0], bank.labels[:0], bank.position[:0])
    cls, avg = embed_part(empty, lambda x: (torch.ones(len(x), 7), torch.ones(len(x), 7)), torch.device("cpu"), contextlib.nullcontext, 32)
    assert cls.shape == avg.shape == (0, 7)


def test_default_schedule_keeps_evaluation_within_its_share_of_the_wall_time():
    import time

    from hdcli.config import DistillConfig
    from hdcli.tasks.distill import DistillTask

    cfg = DistillConfig()
    mon = SimpleNamespace(seconds=1.0, last_seconds=0.5)
    task = SimpleNamespace(monitor=mon, cfg=cfg, _accelerator=None, _t0=time.perf_counter() - 100.0)
    at = DistillTask.eval_at
    assert at(task, 7, n_steps=10, epoch_end=False) is False
    assert at(task, 10, n_steps=10, epoch_end=False) is True  # the last step always evaluates
    assert at(task, 5, n_steps=10, epoch_end=True) is True  # 1.5 s of 100 s ≤ 5 %
    mon.seconds = 4.9
    assert at(task, 5, n_steps=10, epoch_end=True) is False  # 5.4 s of 100 s > 5 %: this epoch is skipped
    cfg.eval.every = 3
    assert [s for s in range(1, 11) if at(task, s, n_steps=10, epoch_end=False)] == [3, 6, 9, 10]
    assert DistillTask.eval_at(SimpleNamespace(monitor=None), 10, n_steps=10, epoch_end=True) is False
    assert DistillConfig().eval.active(steps=None) and not DistillConfig().eval.active(steps=50)


# ---------------------------------------------------------------- end to end

DEMO_SCALE = ["--student", "vit_base_patch16_224", "--img-size", "32", "--patch-size", "8", "--num-workers", "0",
              "--set", "student.kwargs={embed_dim = 48, depth = 6, num_heads = 3}",
              "--set", "distill.teacher_kwargs={patch_size = 8, embed_dim = 48, depth = 6, num_heads = 3}",
              "--relation-blocks", "3,4", "--mask-blocks", "0,2,4", "--drop-path", "0", "--batch-size", "32"]
TEACHERS = "random:vit_base_patch16_224.mae,random:vit_base_patch16_clip_quickgelu_224.openai"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory) -> Path:
    """The tiny recipe (patch 4, depth 12, random teachers) for 2 epochs on the demo digits, evaluated at the
    start, every 44 steps (an epoch) and at the end."""
    out = tmp_path_factory.mktemp("watch") / "run"
    r = run_hd("distill", "--recipe", "recipes/distill/tiny-cpu.toml", "--num-workers", "0", "--epochs", "2",
               "--eval-every", "44", "--eval-samples", "1000,360", "--log-every", "22", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "k-NN eval set: 1000 train images, 360 queries from the val split of demo" in r.stderr
    return out


def test_knn_of_the_student_rises_over_a_tiny_distillation(watched_run):
    recs = records(watched_run)
    evals = [(r["step"], r["knn/student_cls"]) for r in recs if "knn/student_cls" in r]
    assert [s for s, _ in evals] == [0, 44, 88]
    first, last = evals[0][1], evals[-1][1]
    assert last >= first + 5.0, evals  # seeded: 41.1 % -> 50.6 % when written (random teachers: 37-45 %)
    start = recs[0]
    teachers = [k for k in start if k.startswith("knn/") and "student" not in k]
    # random:<a registry tag> is labelled by its registry name, as the targets are
    assert sorted(teachers) == ["knn/clip_avg", "knn/clip_cls", "knn/mae_avg", "knn/mae_cls"]
    assert not any(k in r for r in recs[1:] for k in teachers)  # the teachers once, at the start
    assert all(0 <= r["probe/head_distance_spread"] and r["probe/head_distance"] > 0 for r in recs if "eval_s" in r)


def test_per_target_signals_on_every_logged_step(watched_run):
    logged = [r for r in records(watched_run) if "lr" in r]
    assert [r["step"] for r in logged] == [22, 44, 66, 88]
    for r in logged:
        shares = {k: v for k, v in r.items() if k.startswith("share/")}
        assert set(shares) == {"share/clip/features", "share/mae/relations"}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
        assert -1 <= r["cos/clip/features"] <= 1 and 0 < r["attn/mae/relations/9"] <= 1
        assert r["part/mae/relations"] > 0


def test_the_run_writes_its_plots_and_hd_plot_compares_runs(watched_run, tmp_path):
    plots = watched_run / "plots"
    for name in ("loss.png", "lr.png", "throughput.png", "knn.png", "grad_share.png", "signals.png", "probe.png"):
        assert (plots / name).stat().st_size > 5000, name
    from PIL import Image

    assert Image.open(plots / "knn.png").size == (700, 420)
    r = run_hd("plot", str(watched_run), str(watched_run), "--label", "a", "--label", "b", "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "knn.png").stat().st_size > 5000 and "wrote 7 PNGs" in r.stderr
    r = run_hd("plot", str(tmp_path))
    assert r.returncode == 2 and "has no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_a_finetune_run_gets_its_plots_too(tmp_path, watched_run):
    r = run_hd("finetune", "demo", "--student", str(watched_run), "--epochs", "1", "--epoch-steps", "3",
               "--batch-size", "32", "--img-size", "32", "--num-workers", "0", "--linear-probe", "--out",
               str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("loss.png", "lr.png", "accuracy.png"):
        assert (tmp_path / "ft" / "plots" / name).stat().st_size > 5000, name


def test_wandb_offline_writes_its_run_directory(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    r = run_hd("distill", "--teachers", TEACHERS, *DEMO_SCALE, "--steps", "4", "--log-every", "2", "--tracker", "wandb",
               "--no-plot", "--out", str(out), env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), sorted(p.name for p in (out / "wandb").iterdir())
    assert not (out / "plots").exists()


def test_wandb_without_a_login_fails_in_one_line_before_training(tmp_path):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "cfg"), WANDB_SILENT="true")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "hdcli", "distill", "--teachers", TEACHERS, *DEMO_SCALE, "--steps", "2",
                        "--tracker", "wandb", "--no-plot", "--out", str(tmp_path / "run")], capture_output=True,
                       text=True, env={**env, "COLUMNS": "200"}, cwd=str(Path(__file__).resolve().parents[1]),
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "could not start" in r.stderr and "WANDB_MODE=offline" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "checkpoints" / "step_0000002").exists()


def test_an_unlabelled_or_unknown_eval_source_fails_in_one_line(tmp_path):
    r = run_hd("distill", "--teachers", TEACHERS, *DEMO_SCALE, "--steps", "2", "--eval-every", "1", "--eval-data",
               str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nowhere" in r.stderr
    assert not (tmp_path / "r").exists()
    r = run_hd("distill", "--eval-samples", "0,5", "--print-config")
    assert r.returncode == 2 and "eval.samples" in r.stderr


def test_metric_names_of_older_runs_are_renamed_to_todays():
    """Before one naming scheme, the hybrid by flags logged part/mim/..., part/feature/... and every other spelling
    the teacher's sanitised name; hd plot reads them as today's part/<label>/... so old and new runs overlay."""
    from hdcli.train.plots import renamed

    tiny = ["random:vit_base_patch16_224.mae", "random:vit_base_patch16_clip_quickgelu_224.openai"]
    old = [{"step": 10, "loss": 1.0, "part/mim/relations": 0.5, "share/feature/features": 0.3,
            "attn/mim/relations/9": 0.2, "knn/vit_base_patch16_224_mae_cls": 40.0, "knn/student_cls": 30.0}]
    assert renamed(old, (tiny, False)) == [{"step": 10, "loss": 1.0, "part/mae/relations": 0.5,
                                            "share/clip/features": 0.3, "attn/mae/relations/9": 0.2,
                                            "knn/mae_cls": 40.0, "knn/student_cls": 30.0}]
    three = [*tiny, "random:vit_base_patch16_dinov3"]
    old = [{"step": 1, "part/vit_base_patch16_224_mae/relations": 0.5, "cos/vit_base_patch16_dinov3/features": 0.1}]
    assert renamed(old, (three, False)) == [{"step": 1, "part/mae/relations": 0.5,
                                             "cos/vit_base_patch16_dinov3/features": 0.1}]
    today = [{"step": 1, "part/mae/relations": 0.5, "part/clip/features": 0.4}]
    assert renamed(today, (tiny, False)) == today and renamed(today, ([], False)) == today


# ------------------------------------------------------------------ small or damaged eval sets (issue 24, items 5, 9, 13)

def _monitor(source, **kw):
    from hdcli.watch.monitor import KnnMonitor

    return KnnMonitor(str(source), **{**dict(img_size=16, samples=None, k=20, temperature=0.07, seed=0, num_workers=0,
                                             probe_images=0, max_bad_fraction=0.001), **kw})


ONE_PROCESS = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), is_main_process=True)


def _folder(root: Path, n: int) -> Path:
    from PIL import Image

    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (9 * i, 50, 100 * (i % 2))).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def test_a_bank_smaller_than_k_caps_k_with_a_warning_and_an_empty_bank_says_so(tmp_path, capfd):
    mon = _monitor(_folder(tmp_path / "small", 29))  # 29 images, no val split: a bank of 2, one query
    mon._setup(ONE_PROCESS)
    assert len(mon.bank_labels) == 2 and mon.k == 2  # k = 20 would vote with 18 absent neighbours: 0 % always
    assert "the k-NN bank holds 2 images, fewer than k = 20: k is 2" in capfd.readouterr().err
    with pytest.raises(HDError, match="k-NN bank of .* is empty: its train split is too small"):
        _monitor(_folder(tmp_path / "one", 1))._setup(ONE_PROCESS)  # was: "has no labels"


def test_the_eval_set_has_the_runs_budget_of_unreadable_images(tmp_path):
    from test_data import write_jpeg_shard

    (tmp_path / "wds").mkdir()
    write_jpeg_shard(tmp_path / "wds" / "train-000000.tar", 32, corrupt={1, 4, 9, 16, 25, 30})
    with pytest.raises(HDError, match="raise max_bad_fraction"):
        _monitor(tmp_path / "wds", samples=[20, 6])._setup(ONE_PROCESS)
    mon = _monitor(tmp_path / "wds", samples=[20, 6], max_bad_fraction=0.5)  # --max-bad-fraction 0.5: the same
    mon._setup(ONE_PROCESS)
    assert len(mon.bank_labels) == 20 and mon.n_queries == 6
