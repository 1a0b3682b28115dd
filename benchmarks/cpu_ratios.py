"""The CPU speed ratios of issue 9, measured in one run on this machine; writes them to a JSON file and prints them.

    .venv/bin/python benchmarks/cpu_ratios.py                      # -> benchmarks/cpu_ratios.json
    .venv/bin/python benchmarks/cpu_ratios.py --rounds 5 --threads 2 --out /tmp/r.json

Models: ViT-S/16 student and two ViT-S/16 teachers (random weights; their 0.5 mean/std make the teachers
re-normalise the input, as MAE/CLIP do), 224 px (196 patches: 34% kept at drop ratio 0.3), fp32.
Every step is a REAL engine step (``hdcli.bench.distill.distill``). The cores are shared with other processes,
so the compared figures are measured next to each other and each ratio is the median, over all steps of
all rounds, of the ratio of two neighbours: the engine alternates its steps between the method at drop
ratio 0.3 and the same method at drop ratio 0 (``compare_drop_ratio``), and right before each drop-0.3
step the parts, (MIM teacher pass, plain timm forward) pairs and the large matmul are timed.

Ratios (targets from the issue):
  step_keep34_over_keep100  whole step at drop ratio 0.3 / at drop ratio 0          ≤ 0.65 (FLOP model 0.58)
  mim_over_timm             MIM teacher pass (keep set + relations) / plain timm     ≤ 1.05
                            forward over the same blocks
  step_over_parts           engine step / sum of its parts timed alone              ≤ 1.10
  of_gemm                   ViT-S hybrid step FLOP/s / large-matmul FLOP/s           ≥ 0.70
plus the same of_gemm for a plain timm ViT-S training step (fwd + bwd + AdamW) for comparison.
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
TARGETS = {"step_keep34_over_keep100": ("<=", 0.65), "mim_over_timm": ("<=", 1.05),
           "step_over_parts": ("<=", 1.10), "of_gemm": (">=", 0.70)}


def timm_train_reference(batch_size: int, reps: int, gemm_size: int) -> dict:
    """Plain timm ViT-S training steps (fwd + bwd + fused AdamW), interleaved with the large matmul."""
    import timm
    import torch

    from hdcli.tools import flops

    torch.manual_seed(0)
    model = timm.create_model(VITS, num_classes=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch_size, 3, 224, 224)
    a, b = torch.randn(gemm_size, gemm_size), torch.randn(gemm_size, gemm_size)
    v = flops.dims_of(model)
    fwd = flops.encoder(v, 196, 197, v.depth)
    step_flops = batch_size * (3 * fwd - flops.patch_embed(v, 196))  # backward: 2x, patch embedding 1x

    def step():
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    samples: dict[str, list[float]] = {"timm_train": [], "gemm": []}
    for i in range(reps + 1):
        for k, fn in (("timm_train", step), ("gemm", lambda: a @ b)):
            t = time.perf_counter()
            fn()
            if i:  # the first rep warms up
                samples[k].append(time.perf_counter() - t)
    return {"samples_s": samples, "step_flops": step_flops, "gemm_flops": 2 * gemm_size**3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "cpu_ratios.json"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed engine steps of each method per round")
    ap.add_argument("--reference-reps", type=int, default=3,
                    help="(MIM teacher pass, plain timm forward) pairs timed before each step")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: on 2 shared cores a second thread mostly waits for a descheduled partner)")
    ap.add_argument("--gemm-size", type=int, default=2048)
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from hdcli.bench import distill as bench

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.time()

    def run() -> dict:
        cfg = bench.DistillBench(student=VITS, teachers=(VITS, VITS), batch_size=args.batch_size, drop_ratio=0.3,
                                 compare_drop_ratio=0.0, dtype="fp32", steps=args.steps, warmup=args.warmup,
                                 cpu=True, reference=True, reference_reps=args.reference_reps, gemm=True,
                                 gemm_size=args.gemm_size, interleave=True)
        return bench.distill(cfg)

    pooled: dict[str, list[float]] = {}
    paired: dict[str, list[float]] = {}
    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: engine steps alternating drop ratio 0.3 / 0 ...", file=sys.stderr,
              flush=True)
        a = run()
        ref = timm_train_reference(args.batch_size, args.steps, args.gemm_size)
        sa = a["samples_ms"]
        step_flops = a["flops_per_image"]["total"] * args.batch_size
        gemm_flops = 2 * a["config"]["gemm_size"] ** 3
        for k, v in sa.items():
            pooled.setdefault(k, []).extend(v)
        pooled.setdefault("timm_train", []).extend(1e3 * s for s in ref["samples_s"]["timm_train"])
        pooled.setdefault("gemm_timm", []).extend(1e3 * s for s in ref["samples_s"]["gemm"])
        # figures measured next to each other (same load): the two methods' steps alternate, and the
        # parts, the reference pairs and the matmul ran right before each drop-0.3 step
        pairs = {
            "step_keep34_over_keep100": [x / y for x, y in zip(sa["step"], sa["compare_step"], strict=True)],
            "mim_over_timm": [m / t for m, t in zip(sa["ref_mim_teacher"], sa["timm_blocks"], strict=True)],
            "step_over_parts": [s / sum(p) for s, *p in zip(sa["step"], *(sa[k] for k in bench.PARTS), strict=True)],
            "of_gemm": [step_flops * g / (s * gemm_flops) for s, g in zip(sa["step"], sa["gemm"], strict=True)],
            "timm_vit_s_train_of_gemm": [ref["step_flops"] * g / (s * ref["gemm_flops"]) for s, g in
                                         zip(ref["samples_s"]["timm_train"], ref["samples_s"]["gemm"], strict=True)],
        }
        for k, v in pairs.items():
            paired.setdefault(k, []).extend(v)
        rounds.append({"step_ms": a["step_ms"], "step_keep100_ms": a["compare"]["step_ms"],
                       **{k: statistics.median(v) for k, v in pairs.items()},
                       "breakdown_ms": a["breakdown_ms"], "load": a["config"]["load"]})

    med = {k: statistics.median(v) for k, v in pooled.items()}
    gemm_tflops = gemm_flops / (med["gemm"] / 1e3) / 1e12
    step_tflops = step_flops / (med["step"] / 1e3) / 1e12
    pmed = {k: statistics.median(v) for k, v in paired.items()}
    ratios = {
        "step_keep34_over_keep100": pmed["step_keep34_over_keep100"],
        "mim_over_timm": pmed["mim_over_timm"],
        "step_over_parts": pmed["step_over_parts"],
        "of_gemm": pmed["of_gemm"],
    }
    passed = {k: (v <= TARGETS[k][1] if TARGETS[k][0] == "<=" else v >= TARGETS[k][1]) for k, v in ratios.items()}
    out = {
        "ratios": ratios,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "passed": passed,
        "timm_vit_s_train_of_gemm": pmed["timm_vit_s_train_of_gemm"],
        "method": "median over all rounds of the ratio of two figures measured next to each other",
        "ratios_of_pooled_medians": {
            "step_keep34_over_keep100": med["step"] / med["compare_step"],
            "mim_over_timm": med["ref_mim_teacher"] / med["timm_blocks"],
            "step_over_parts": med["step"] / sum(med[k] for k in bench.PARTS),
            "of_gemm": step_tflops / gemm_tflops,
        },
        "medians_ms": med,
        "samples": {k: len(v) for k, v in pooled.items()},
        "samples_ms": {k: [round(x, 2) for x in v] for k, v in pooled.items()},
        "paired_ratios": {k: [round(x, 4) for x in v] for k, v in paired.items()},
        "gemm_tflops": gemm_tflops,
        "step_tflops": step_tflops,
        "flop_model_keep34_over_keep100": None,
        "rounds": rounds,
        "config": {"student": VITS, "teachers": [VITS, VITS], "img_size": 224, "dtype": "fp32",
                   "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_run": args.steps,
                   "reference_reps": args.reference_reps,
                   "warmup": args.warmup, "threads": args.threads, "gemm_size": args.gemm_size,
                   "device": bench.device_name(torch.device("cpu")), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "load_before": [round(x, 2) for x in load_before],
                   "load_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - t0, 1),
                   "command": " ".join([Path(sys.executable).name, *sys.argv])},
    }
    from hdcli.tools import flops

    v = flops.arch_dims(VITS)
    out["flop_model_keep34_over_keep100"] = (flops.hybrid_step(v, v, v, n_patches=196, n_keep=67).total
                                             / flops.hybrid_step(v, v, v, n_patches=196, n_keep=196).total)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    print(f"CPU ratios ({out['config']['device']}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} "
          f"steps, load {out['config']['load_before']} -> {out['config']['load_after']}):")
    for k, v in ratios.items():
        print(f"  {k:26s} {v:6.3f}   target {out['targets'][k]:7s} {'ok' if passed[k] else 'MISSED'}")
    print(f"  {'timm ViT-S train of_gemm':26s} {out['timm_vit_s_train_of_gemm']:6.3f}   (reference)")
    print("  (ratios of pooled medians: " + ", ".join(f"{k} {v:.3f}" for k, v in out["ratios_of_pooled_medians"].items())
          + ")")
    print(f"  step {med['step']:.0f} ms (keep 34%), {med['compare_step']:.0f} ms (keep 100%); "
          f"matmul {1e3 * gemm_tflops:.1f} GFLOP/s; step {1e3 * step_tflops:.1f} GFLOP/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
