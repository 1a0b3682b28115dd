"""What paying for the teachers once saves, measured on this machine in one run (issue 25; docs/scale.md).

    .venv/bin/python benchmarks/teacher_cost.py                   # -> benchmarks/teacher_cost.json
    .venv/bin/python benchmarks/teacher_cost.py --rounds 3 --steps 4 --out /tmp/t.json

Models: ViT-S/16 teachers (random weights) and ViT-S/16 students, 224 px, batch 8, fp32, one thread (the cores
are shared: compared figures are measured next to each other, ratios are medians of neighbouring ratios).

  students.step_over_single_sum   one engine step training 2 students from one teacher pass / the sum of the
                                  2 single-student steps measured around it            target ≤ 0.75 (FLOP model ≈ 0.67)
  teachers.bf16_over_fp32         engine step with bf16 teachers / with fp32 teachers (alternating runs, median of
                                  per-round ratios of median steps): reported as it is
  teachers.param_bytes            teacher parameter bytes at fp32 and bf16
  cached.step_over_online         engine step fed from targets computed once (a target cache) / the online step
                                  next to it                                           target ≤ 0.45 (FLOP model ≈ 0.36)
  cache.views_per_s, bytes_per_view   `hd cache-targets` writing 2 views of 32 JPEGs (256x192) with these
                                  models (fp16 targets), and its bytes per view on disk
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VITS = "vit_small_patch16_224"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed groups per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "teacher_cost.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from hdcli.bench import distill as bench

    torch.set_num_threads(args.threads)

    def run(**kw) -> dict:
        cfg = bench.DistillBench(student=VITS, teachers=(VITS, VITS), batch_size=args.batch_size, dtype="fp32",
                                 steps=args.steps, warmup=1, cpu=True, breakdown=False, gemm=False, interleave=True,
                                 **kw)
        return bench.distill(cfg)

    load_before, t0 = os.getloadavg(), time.time()
    cache = cache_throughput(args.threads)  # first: quick, and a failure shows before the long rounds
    cached = []
    students, singles, dtype_ratio, steps = [], [], [], {"fp32": [], "bf16": []}
    nbytes = {}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: two students vs their single steps ...", file=sys.stderr, flush=True)
        two = run(students=2)
        students.append(two["students"]["step_over_single_sum"])
        singles.append(two["students"]["single_step_ms"])
        flop_model = two["students"]["flop_model"]
        print(f"round {r + 1}/{args.rounds}: fp32 and bf16 teachers ...", file=sys.stderr, flush=True)
        order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
        got = {d: run(teacher_dtype=d) for d in order}
        for d, res in got.items():
            steps[d].append(res["step_ms"])
            nbytes[d] = res["teacher_param_bytes"]
        dtype_ratio.append(got["bf16"]["step_ms"] / got["fp32"]["step_ms"])
        print(f"round {r + 1}/{args.rounds}: cached targets vs online ...", file=sys.stderr, flush=True)
        c = run(cached_targets=True)
        cached.append(c["cached"]["step_over_online"])
        print(f"  students {students[-1]:.3f}, bf16/fp32 teachers {dtype_ratio[-1]:.3f}, cached/online {cached[-1]:.3f}",
              file=sys.stderr, flush=True)
        cached_flops = c["cached"]["flop_model"]
    out = {
        "students": {"step_over_single_sum": statistics.median(students), "per_round": students,
                     "single_step_ms": singles, "flop_model": flop_model, "target": "<= 0.75"},
        "teachers": {"bf16_over_fp32": statistics.median(dtype_ratio), "per_round": dtype_ratio,
                     "step_ms": steps, "param_bytes": nbytes},
        "cached": {"step_over_online": statistics.median(cached), "per_round": cached, "flop_model": cached_flops,
                   "target": "<= 0.45"},
        "cache": cache,
        "config": {"models": f"{VITS} teachers (random weights) and students, 224 px", "batch_size": args.batch_size,
                   "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "torch": torch.__version__,
                   "load_before": load_before, "load_after": os.getloadavg(), "seconds": round(time.time() - t0)},
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"students.step_over_single_sum": out["students"]["step_over_single_sum"],
                      "teachers.bf16_over_fp32": out["teachers"]["bf16_over_fp32"], "param_bytes": nbytes,
                      "cached.step_over_online": out["cached"]["step_over_online"], "cache": cache}))


def cache_throughput(threads: int) -> dict:
    """Views/s written and bytes per view of a target cache of 32 synthetic JPEGs with ViT-S/16 teachers."""
    import tempfile

    import numpy as np
    from PIL import Image

    from hdcli.cache import layout, write
    from hdcli.config import DistillConfig, load_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs" / "c0"
        root.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(32):
            Image.fromarray(rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=90)
        cfg = load_config(DistillConfig, overrides={
            "data.source": str(root.parent), "train.cpu": True, "train.batch_size": 8,
            "distill.teachers": [f"random:{VITS}", f"random:{VITS}@1"], "student.arch": VITS})
        t0 = time.perf_counter()
        write.write(cfg, Path(tmp) / "cache", views=2, dtype="fp16", per_shard=16)
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "cache").glob("*.tar"))
        header = layout.read_header(Path(tmp) / "cache")
    return {"views_per_s": 64 / seconds, "bytes_per_view_on_disk": size / 64, "bytes_per_view_payload":
            header["view_bytes"], "threads": threads, "note": "includes building the models (seconds of the run)"}


if __name__ == "__main__":
    main()
