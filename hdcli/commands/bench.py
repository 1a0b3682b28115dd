"""``hd bench``: throughput, achieved FLOP/s and MFU of a distillation step; decode speed of a data source."""

from __future__ import annotations

import json
from typing import Annotated

import typer

MODEL_PANEL = "Models"
RUN_PANEL = "Run"
TINY_PANEL = "Tiny configs (CPU)"
REPORT_PANEL = "Report"


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help="Measure the speed of a distillation step (`distill`) or of a data source (`data`).",
                            no_args_is_help=True)
    bench_app.command("distill")(distill)
    bench_app.command("data")(data)
    app.add_typer(bench_app, name="bench")


def distill(
    student: Annotated[str, typer.Option(
        "--student", help="Student architecture (timm name, random weights).", rich_help_panel=MODEL_PANEL)
    ] = "vit_base_patch16_224",
    teachers: Annotated[str, typer.Option(
        "--teachers", help="MIM teacher, then feature teacher: registry names (mae, clip, dinov3, ...) "
        "or timm architectures (vit_small_patch16_224). Random weights: nothing is downloaded.",
        rich_help_panel=MODEL_PANEL)] = "mae,clip",
    relation_heads: Annotated[str, typer.Option(
        "--relation-heads", help="auto (match when teacher and student head counts agree, else mean), match, "
        "or mean.", rich_help_panel=MODEL_PANEL)] = "auto",
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", "-b", help="Images per step (default: 64 on CUDA, 8 on the CPU).",
        rich_help_panel=RUN_PANEL, show_default=False)] = None,
    drop_ratio: Annotated[float, typer.Option(
        "--drop-ratio", help="Tokens dropped per masking step (0.3: 196 -> 67 kept; 0: all kept).",
        rich_help_panel=RUN_PANEL)] = 0.3,
    compare_drop_ratio: Annotated[float | None, typer.Option(
        "--compare-drop-ratio", help="Alternate the engine's steps with the same method at this drop ratio (e.g. 0) "
        "and report the ratio of neighbouring steps.", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    signals: Annotated[bool, typer.Option(
        "--signals", help="Alternate the engine's steps with and without the per-target signals (a logged step "
        "of hd distill) and report their ratio and its overhead at --log-every 50.", rich_help_panel=RUN_PANEL)] = False,
    students: Annotated[int, typer.Option(
        "--students", help="N > 1: N students of --student from one teacher pass; steps alternate the N-student "
        "step with each student's single step (reports their ratio).", rich_help_panel=RUN_PANEL)] = 1,
    cached_targets: Annotated[bool, typer.Option(
        "--cached-targets", help="Alternate the engine's steps with steps fed from the teacher pass's targets "
        "computed once (what a target cache gives) and report their ratio.", rich_help_panel=RUN_PANEL)] = False,
    teacher_dtype: Annotated[str, typer.Option(
        "--teacher-dtype", help="auto (bf16 on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16: the teachers' own "
        "precision (their parameter bytes are reported).", rich_help_panel=RUN_PANEL)] = "auto",
    data: Annotated[str | None, typer.Option(
        "--data", help="Also feed the real step from this source's loader (anything hd distill --data takes): "
        "steps alternate real and synthetic batches; reports whether the step waited for data.",
        rich_help_panel=RUN_PANEL, show_default=False)] = None,
    data_workers: Annotated[int | None, typer.Option(
        "--data-workers", help="Workers of the --data loader (default: CPUs − 1, at most 8).",
        rich_help_panel=RUN_PANEL, show_default=False)] = None,
    decode: Annotated[str, typer.Option("--decode", help="data.decode of the --data loader: auto, cpu, pil, gpu.",
                                        rich_help_panel=RUN_PANEL)] = "auto",
    masking: Annotated[str, typer.Option("--masking", help="progressive | direct | random | none.",
                                         rich_help_panel=RUN_PANEL)] = "progressive",
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="bf16 | fp16 | fp32 (autocast; default: bf16 on CUDA, fp32 on the CPU).",
        rich_help_panel=RUN_PANEL, show_default=False)] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the step (as `hd distill --compile`).",
                                          rich_help_panel=RUN_PANEL)] = False,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Timed steps (default: 20 on CUDA, 3 on the CPU).", rich_help_panel=RUN_PANEL,
        show_default=False)] = None,
    warmup: Annotated[int | None, typer.Option(
        "--warmup", help="Untimed steps first (compilation, allocator) (default: 5 on CUDA, 1 on the CPU).",
        rich_help_panel=RUN_PANEL, show_default=False)] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Run on the CPU even where a GPU is visible.",
                                      rich_help_panel=RUN_PANEL)] = False,
    img_size: Annotated[int, typer.Option("--img-size", help="Image size.", rich_help_panel=TINY_PANEL)] = 224,
    patch_size: Annotated[int | None, typer.Option(
        "--patch-size", help="Patch size of all three models (default: the architectures').",
        rich_help_panel=TINY_PANEL, show_default=False)] = None,
    depth: Annotated[int | None, typer.Option("--depth", help="Depth of all three models.",
                                              rich_help_panel=TINY_PANEL, show_default=False)] = None,
    dim: Annotated[int | None, typer.Option("--dim", help="Width of all three models.",
                                            rich_help_panel=TINY_PANEL, show_default=False)] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="Attention heads of all three models.",
                                              rich_help_panel=TINY_PANEL, show_default=False)] = None,
    peak: Annotated[float | None, typer.Option(
        "--peak-tflops", help="Dense bf16 peak of the device for MFU (default: built-in table for H100, H200, "
        "A100, L40S, RTX 4090).", rich_help_panel=REPORT_PANEL, show_default=False)] = None,
    breakdown: Annotated[bool, typer.Option(
        "--breakdown/--no-breakdown", help="Also time each part alone (MIM teacher, feature teacher, student "
        "forward+backward, optimiser).", rich_help_panel=REPORT_PANEL)] = True,
    reference: Annotated[bool, typer.Option(
        "--reference", help="Also time a plain timm forward over the MIM teacher's blocks (all tokens) and "
        "report mim_over_timm: the cost of the keep set and the relations.", rich_help_panel=REPORT_PANEL)] = False,
    interleave: Annotated[bool | None, typer.Option(
        "--interleave/--no-interleave", help="Time the parts between the engine's steps (same machine load) "
        "(default: on the CPU yes, on CUDA no).", rich_help_panel=REPORT_PANEL, show_default=False)] = None,
    gemm: Annotated[bool, typer.Option(
        "--gemm/--no-gemm", help="Measure a large matmul in the same dtype (gemm_tflops, of_gemm).",
        rich_help_panel=REPORT_PANEL)] = True,
    gemm_size: Annotated[int | None, typer.Option(
        "--gemm-size", help="Side of that matmul (default: 8192 on GPUs, 2048 on CPUs).",
        rich_help_panel=REPORT_PANEL, show_default=False)] = None,
    sync_debug: Annotated[bool, typer.Option(
        "--sync-debug", help="CUDA: count and locate host syncs in the timed steps (slows them; for diagnosis).",
        rich_help_panel=REPORT_PANEL)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.",
                                          rich_help_panel=REPORT_PANEL)] = False,
) -> None:
    """Time the real distillation step (hdcli.train.engine + hdcli.method) on random-weight models: images/s,
    time per part, achieved TFLOP/s (analytic FLOP count), MFU, matmul-relative efficiency, peak memory."""
    from hdcli.bench import distill as bench
    from hdcli.errors import HDError

    names = [t.strip() for t in teachers.split(",") if t.strip()]
    if len(names) != 2:
        raise HDError(f"--teachers needs two names (MIM teacher first), got {teachers!r}", "e.g. --teachers mae,clip")
    cfg = bench.DistillBench(
        student=student, teachers=(names[0], names[1]), batch_size=batch_size, drop_ratio=drop_ratio,
        masking=masking, compare_drop_ratio=compare_drop_ratio, signals=signals, students=students,
        cached_targets=cached_targets,
        teacher_dtype=teacher_dtype, data=data, workers=data_workers, decode=decode, dtype=dtype, compile=compile,
        steps=steps, warmup=warmup, img_size=img_size,
        patch_size=patch_size, depth=depth, dim=dim, heads=heads, relation_heads=relation_heads, cpu=cpu,
        peak_tflops=peak, breakdown=breakdown, reference=reference, gemm=gemm, gemm_size=gemm_size,
        interleave=interleave, sync_debug=sync_debug)
    res = bench.distill(cfg)
    if as_json:
        typer.echo(json.dumps(res))
        return
    _print_distill(res)


def _print_distill(res: dict) -> None:
    from rich.table import Table

    from hdcli import ui
    from hdcli.bench.timing import fmt_num

    c = res["config"]
    title = (f"{c['student']} ← {' + '.join(c['teachers'])} · batch {c['batch_size']} · {c['dtype']}"
             f"{' · compiled' if c['compile'] else ''} · keep {c['n_keep']}/{c['n_patches']} "
             f"({100 * c['keep_fraction']:.0f}%) · {c['device']}")
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("note", style="dim")
    t.add_row("images/s", fmt_num(res["images_per_s"], 4), "")
    t.add_row("step", f"{res['step_ms']:.1f} ms", c["step_time"])
    if res["breakdown_ms"]:
        total = res["parts_sum_ms"]
        for k, v in res["breakdown_ms"].items():
            t.add_row(f"  {k.replace('_', ' ')}", f"{v:.1f} ms", f"{100 * v / total:.0f}% of the parts, timed alone")
        t.add_row("  step / sum of parts", f"{res['step_over_parts']:.3f}", "1.0 = no hidden overhead")
    if "compare" in res:
        cmp = res["compare"]
        t.add_row(f"step at drop ratio {cmp['drop_ratio']:g}", f"{cmp['step_ms']:.1f} ms",
                  f"keep {cmp['n_keep']}/{c['n_patches']}, {cmp['gflops_per_image']:.2f} GFLOP/image")
        t.add_row("  step / that step", f"{cmp['step_over_compare']:.3f}",
                  f"FLOP model {res['gflops_per_image'] / cmp['gflops_per_image']:.3f}; neighbouring steps")
    if "cached" in res:
        ca = res["cached"]
        t.add_row("step from cached targets", f"{ca['step_ms']:.1f} ms", "no teacher runs")
        t.add_row("  cached / online", f"{ca['step_over_online']:.3f}",
                  f"FLOP model {ca['flop_model']:.3f}; neighbouring steps")
    if "students" in res:
        st = res["students"]
        t.add_row("single-student steps", ", ".join(f"{x:.1f}" for x in st["single_step_ms"]) + " ms",
                  "each student with its own teacher pass")
        t.add_row(f"  {st['n']} students / sum of singles", f"{st['step_over_single_sum']:.3f}",
                  f"FLOP model {st['flop_model']:.3f}; neighbouring steps")
    t.add_row("teacher parameters", f"{res['teacher_param_bytes'] / 2**20:,.1f} MiB", c["teacher_dtype"])
    if "data" in res:
        d = res["data"]
        t.add_row("step, synthetic batch", f"{d['synthetic_step_ms']:.1f} ms", "neighbouring steps")
        t.add_row("  real data / synthetic", f"{d['real_over_synthetic']:.3f}",
                  f"{d['source']}, {d['workers']} workers, decode {d['decode']}: "
                  + ("the step WAITED for data" if d["waited_for_data"] else "the loader kept up"))
    if "signals" in res:
        sig = res["signals"]
        t.add_row("step with per-target signals", f"{sig['step_ms']:.1f} ms", "a logged step of hd distill")
        t.add_row("  that step / step", f"{sig['signals_step_over_step']:.3f}",
                  f"{100 * sig['overhead_at_log_every_50']:.2f}% of the step at --log-every 50; neighbouring steps")
    if "mim_over_timm" in res:
        t.add_row("timm forward, MIM blocks", f"{res['reference_ms']['timm_blocks']:.1f} ms", "all tokens, no keep set")
        t.add_row("  MIM teacher / timm", f"{res['mim_over_timm']:.3f}", "cost of keep set + relations")
    t.add_row("GFLOP/image", f"{res['gflops_per_image']:.2f}", "analytic (hdcli.tools.flops)")
    t.add_row("achieved TFLOP/s", fmt_num(res["tflops"]), "")
    if res["gemm_tflops"] is not None:
        t.add_row("large matmul TFLOP/s", fmt_num(res["gemm_tflops"]), f"{c['gemm_size']}² in {c['dtype']}, same run")
        t.add_row("of matmul", f"{100 * res['of_gemm']:.1f}%", "achieved / large matmul")
    mfu = res["mfu"]
    t.add_row("MFU", f"{100 * mfu:.1f}%" if mfu is not None else "-",
              f"of {c['peak_tflops']:g} TFLOP/s dense bf16" if c["peak_tflops"] else "unknown peak: --peak-tflops")
    t.add_row("peak memory", f"{res['peak_mem_mb']:,.0f} MB", c["peak_mem"])
    if "host_syncs" in res:
        hs = res["host_syncs"]
        t.add_row("host syncs/step", f"{hs['per_step']:.1f}", ", ".join(f"{k} ×{v}" for k, v in hs["where"].items()))
    ui.stdout.print(t)


def data(
    source: Annotated[str, typer.Argument(
        help="'demo', 'fashion-mnist[:DIR]', 'cifar100:DIR', an image folder, or WebDataset shards "
        "(a directory or a pattern like 'shards/train-{000000..000009}.tar').")] = "demo",
    img_size: Annotated[int, typer.Option("--img-size", help="Output image size.", rich_help_panel=RUN_PANEL)] = 224,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.",
                                            rich_help_panel=RUN_PANEL)] = 64,
    workers: Annotated[int | None, typer.Option(
        "--workers", "-w", help="DataLoader workers (0: decode in this process) (default: CPUs − 1, at most 8).",
        rich_help_panel=RUN_PANEL, show_default=False)] = None,
    batches: Annotated[int, typer.Option("--batches", help="Timed batches.", rich_help_panel=RUN_PANEL)] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed batches first (worker start-up).",
                                        rich_help_panel=RUN_PANEL)] = 2,
    split: Annotated[str, typer.Option("--split", help="Split to read.", rich_help_panel=RUN_PANEL)] = "train",
    decode: Annotated[str, typer.Option(
        "--decode", help="Decode paths to compare, comma-separated: pil (the reference), cpu, gpu "
        "(docs/data.md).", rich_help_panel=RUN_PANEL)] = "pil,cpu,gpu",
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds (each times --batches of every path).",
                                        rich_help_panel=RUN_PANEL)] = 3,
    step_rate: Annotated[float | None, typer.Option(
        "--step-rate", help="Images/s the GPU trains (e.g. from hd bench distill): report the cores each path needs.",
        rich_help_panel=REPORT_PANEL, show_default=False)] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Decode the gpu path's batches on the CPU even where a GPU is "
                                      "visible.", rich_help_panel=RUN_PANEL)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.",
                                          rich_help_panel=REPORT_PANEL)] = False,
) -> None:
    """Decode + augment throughput (METHOD.md's training crop, uint8 out) of a data source by decode path:
    images/s, per core, and the cores a GPU needs at --step-rate."""
    from hdcli import ui
    from hdcli.bench import data as databench

    paths = tuple(p.strip() for p in decode.split(",") if p.strip())
    res = databench.data(source, img_size=img_size, batch_size=batch_size, workers=workers, batches=batches,
                     warmup=warmup, split=split, paths=paths, rounds=rounds, step_rate=step_rate, cpu=cpu)
    if as_json:
        typer.echo(json.dumps(res))
        return
    from rich.table import Table

    c = res["config"]
    t = Table(title=f"{c['source']} ({c['split']}) · {c['img_size']} px · batch {c['batch_size']} · "
              f"{res['workers']} worker(s) · {c['rounds']} rounds interleaved", header_style="bold")
    for col in ("path", "images/s", "per core", "× pil", "cores needed", "note"):
        t.add_column(col, justify="left" if col in ("path", "note") else "right")
    for p, r in res["paths"].items():
        note = ""
        if p == "gpu":
            note = f"device decode {r['device_images_per_s']:,.0f} images/s on {res['device']}"
            note += f"; {r['cpu_fallbacks']} CPU fallbacks" if r["cpu_fallbacks"] else ""
        if r["bad_samples"]:
            note += f"; {r['bad_samples']} unreadable"
        t.add_row(p, f"{r['images_per_s']:,.0f}", f"{r['per_core_images_per_s']:,.0f}",
                  f"{r['speedup']:.2f}" if "speedup" in r else "–",
                  f"{r['cores_needed']:.1f}" if "cores_needed" in r else "–", note)
    ui.stdout.print(t)
