"""Throughput, achieved FLOP/s and MFU of a distillation step (``hd bench distill``; ``hd bench data`` is
:mod:`hdcli.bench.data`).

``distill`` times the REAL training step: it runs ``hdcli.train.engine.train`` on a ``hdcli.tasks.distill.DistillTask``
(random weights of the real architectures, ``random:ARCH`` teachers) whose data is one synthetic uint8
batch, and reads the clock where the engine asks the task for the loss of each step. The time between two
such calls is one whole engine step (data hand-over, device copy, normalisation, teachers, student
forward + backward, clipping, AdamW, the engine's bookkeeping). The run is stopped after the last timed
step (nothing is saved). Each part is also timed alone on the same models, with the method's own code
(:mod:`hdcli.bench.parts`: MIM teacher, feature teacher, student, optimiser).

Achieved FLOP/s come from the analytic model (``hdcli.tools.flops``); MFU divides them by the device's dense
bf16 peak (``PEAK_TFLOPS`` or ``--peak-tflops``); ``of_gemm`` divides them by a large matmul measured in
the same run and dtype (an "MFU" for any device, CPUs included).

On the CPU (``interleave``, the default there) the parts, the reference and the matmul run between every
two engine steps, outside the steps' timing, so that all figures see the same load of the shared cores;
every step is timed and medians (of ratios of neighbouring figures, for the ratios) are reported. On
CUDA the parts run after the timed window and the step time is the mean over the window, synchronised
only at its ends (the host runs ahead as in training). ``compare_drop_ratio`` alternates the engine's
steps between the method and the same method at another drop ratio (``Alternate``); ``signals`` between plain
steps and logged ones (with the per-target signals); ``data`` between the synthetic batch and a real loader's
(``Mixed``).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

import torch

from hdcli.bench.parts import PARTS, Parts
from hdcli.bench.steps import Window, run_engine
from hdcli.bench.timing import device_name, loadavg, median_ms, peak_tflops
from hdcli.errors import HDError, did_you_mean

DTYPES = ("bf16", "fp16", "fp32")
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}



# ---------------------------------------------------------------- large-matmul throughput

# ---------------------------------------------------------------- what to build

@dataclass
class DistillBench:
    """Settings of ``hd bench distill`` (see the command's help; defaults = the paper's ViT-B setting)."""

    student: str = "vit_base_patch16_224"
    teachers: tuple[str, str] = ("mae", "clip")  # MIM teacher first: registry names or timm architectures
    batch_size: int | None = None  # None: 64 on CUDA, 8 on the CPU
    drop_ratio: float = 0.3
    masking: str = "progressive"
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on the CPU
    compile: bool = False
    steps: int | None = None  # None: 20 on CUDA, 3 on the CPU
    warmup: int | None = None  # None: 5 on CUDA, 1 on the CPU
    img_size: int = 224
    patch_size: int | None = None
    depth: int | None = None
    dim: int | None = None
    heads: int | None = None
    relation_heads: str = "auto"  # auto: match when head counts agree, else mean
    cpu: bool = False
    peak_tflops: float | None = None
    breakdown: bool = True
    reference: bool = False  # also time a plain timm forward over the MIM teacher's blocks
    reference_reps: int = 1  # pairs (MIM teacher part, plain timm) timed between two steps
    compare_drop_ratio: float | None = None  # alternate engine steps with a method at this drop ratio
    signals: bool = False  # alternate engine steps with and without the per-target signals (logged steps)
    data: str | None = None  # alternate engine steps fed by this source's real loader and by the synthetic batch
    students: int = 1  # N > 1: N students of the student arch, their step alternating with each one's single step
    cached_targets: bool = False  # alternate online steps with steps fed from targets computed once (a cache)
    teacher_dtype: str = "auto"  # distill.teacher_dtype: the teachers' own precision
    workers: int | None = None  # data workers of the real loader (default: hdcli.data.default_num_workers)
    decode: str = "auto"  # data.decode of the real loader
    gemm: bool = True
    gemm_size: int | None = None
    interleave: bool | None = None  # None: on the CPU yes, on CUDA no
    seed: int = 0
    sync_debug: bool = False  # CUDA: count host syncs in the timed steps (torch.cuda.set_sync_debug_mode)
    extra: dict = field(default_factory=dict)

    @property
    def per(self) -> int:
        """Engine steps per timed group: 2 when steps alternate (a drop-ratio comparison, the signals, real data),
        N + 1 with N students (all of them, then each alone), else 1."""
        if self.students > 1:
            return self.students + 1
        alternating = (self.compare_drop_ratio is not None, self.signals, self.data is not None, self.cached_targets)
        return 2 if any(alternating) else 1

    def overrides(self) -> dict:
        """timm kwargs applied to the student and both teachers (tiny configs for the CPU)."""
        kw = {"embed_dim": self.dim, "depth": self.depth, "num_heads": self.heads}
        return {k: v for k, v in kw.items() if v is not None}


def teacher_arch(name: str) -> str:
    """The architecture (timm name, with pretrained tag for registry names: it carries mean/std) of a teacher
    given as a registry name or a timm architecture. Weights are never loaded here."""
    import timm
    from timm.models import split_model_name_tag

    from hdcli import teachers

    if name.lower() in teachers.REGISTRY:
        return teachers.REGISTRY[name.lower()].tag
    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        near = did_you_mean(name, [*teachers.names(), *timm.list_models("vit_*")])
        raise HDError(f"unknown teacher architecture {name!r}: give a registry name ({', '.join(teachers.names())}) "
                      "or a timm architecture such as vit_small_patch16_224", near)
    return name


def _check(b: DistillBench, device: torch.device) -> None:
    import timm

    from hdcli.method.masking import check_drop_ratio, check_strategy
    from hdcli.method.names import RELATION_HEADS

    if not timm.is_model(b.student):
        raise HDError(f"unknown student architecture {b.student!r}",
                      did_you_mean(b.student, timm.list_models("vit_*")) or "e.g. vit_base_patch16_224")
    if len(b.teachers) != 2:
        raise HDError(f"--teachers needs two names (MIM teacher first, then the feature teacher), got {list(b.teachers)}",
                      "e.g. --teachers mae,clip")
    for what, v, lo in (("--batch-size", b.batch_size, 1), ("--steps", b.steps, 1), ("--warmup", b.warmup, 1),
                        ("--img-size", b.img_size, 1)):
        if v < lo:
            raise HDError(f"{what} must be at least {lo}, got {v}")
    check_drop_ratio(b.drop_ratio)
    check_strategy(b.masking)
    if b.dtype not in DTYPES:
        raise HDError(f"unknown dtype {b.dtype!r}", did_you_mean(str(b.dtype), DTYPES))
    if b.dtype == "fp16" and device.type != "cuda":
        raise HDError("fp16 needs a CUDA GPU", "use --dtype bf16 or fp32 on the CPU")
    heads = ("auto", *RELATION_HEADS)
    if b.relation_heads not in heads:
        raise HDError(f"unknown --relation-heads {b.relation_heads!r}", did_you_mean(b.relation_heads, heads))
    if b.compare_drop_ratio is not None:
        check_drop_ratio(b.compare_drop_ratio)
    if sum((b.compare_drop_ratio is not None, b.signals, b.data is not None, b.students > 1, b.cached_targets)) > 1:
        raise HDError("--compare-drop-ratio, --signals, --data, --students and --cached-targets each alternate the "
                      "steps", "give one of them")
    if b.students < 1:
        raise HDError(f"--students must be at least 1, got {b.students}")
    from hdcli.method.names import TEACHER_DTYPES

    if b.teacher_dtype not in TEACHER_DTYPES:
        raise HDError(f"unknown --teacher-dtype {b.teacher_dtype!r}", did_you_mean(b.teacher_dtype, TEACHER_DTYPES))
    if b.reference_reps < 1:
        raise HDError(f"reference_reps must be at least 1, got {b.reference_reps}")
    if b.gemm_size is not None and b.gemm_size < 1:
        raise HDError(f"--gemm-size must be at least 1, got {b.gemm_size}")
    if b.peak_tflops is not None and not b.peak_tflops > 0:
        raise HDError(f"--peak-tflops must be > 0, got {b.peak_tflops}")


def _config(b: DistillBench, mim_arch: str, feat_arch: str):
    """The DistillConfig of the benchmarked run: the paper's defaults, random-weight teachers, tiny overrides."""
    from hdcli.config import DistillConfig, validate
    from hdcli.method.names import paper_blocks
    from hdcli.tools import flops

    over = b.overrides()
    tkw = {**over, **({"patch_size": b.patch_size} if b.patch_size else {})}
    mim = flops.arch_dims(mim_arch, img_size=b.img_size, **tkw)
    student = flops.arch_dims(b.student, img_size=b.img_size, **tkw)
    rel_t, mask_t = paper_blocks(mim.depth)
    rel_s, _ = paper_blocks(student.depth)
    heads = b.relation_heads
    if heads == "auto":
        heads = "match" if mim.heads == student.heads else "mean"
    n = b.per * (b.warmup + b.steps) + 1  # the engine is stopped at the start of the last step
    cfg = DistillConfig()
    cfg.train.batch_size = b.batch_size
    cfg.train.steps = n
    cfg.train.log_every = n
    cfg.train.save_every = n
    cfg.train.mixed_precision = MIXED_PRECISION[b.dtype]
    cfg.train.compile = b.compile
    cfg.train.cpu = b.cpu
    cfg.train.seed = b.seed
    cfg.optim.warmup_steps = 1
    cfg.data.img_size = b.img_size
    cfg.data.num_workers = 0
    if b.data is not None:
        from hdcli.data import default_num_workers

        cfg.data.source = b.data
        cfg.data.num_workers = default_num_workers() if b.workers is None else b.workers
        cfg.data.epoch_steps = n
        cfg.data.decode = b.decode
    cfg.student.arch = b.student
    cfg.student.patch_size = b.patch_size
    cfg.student.kwargs = dict(over)
    d = cfg.distill
    # two teachers of one architecture are two random models (seeds), not one teacher listed twice
    d.teachers = [f"random:{mim_arch}", f"random:{feat_arch}" + ("@1" if feat_arch == mim_arch else "")]
    d.teacher_kwargs = dict(tkw)
    d.relation_blocks = list(rel_t)
    d.student_relation_blocks = None if tuple(rel_s) == tuple(rel_t) else list(rel_s)
    d.mask_blocks = list(mask_t)
    d.drop_ratio = b.drop_ratio
    d.masking = b.masking
    d.relation_heads = heads
    d.teacher_dtype = b.teacher_dtype
    if b.students > 1:
        d.students = [{"name": f"s{i}", "arch": b.student} for i in range(b.students)]
    validate(cfg)
    return cfg


def distill(b: DistillBench) -> dict:
    """Run the benchmark; return the JSON object of ``hd bench distill --json`` (see the module docstring).

    With ``b.interleave`` (default on the CPU, where other processes share the cores) the parts, the
    reference and the matmul run once between every two engine steps (outside their timing), so all
    figures see the same machine load; otherwise they run after the engine's timed window.
    """
    from hdcli.tools import flops

    cuda = torch.cuda.is_available() and not b.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    b.dtype = b.dtype or ("bf16" if cuda else "fp32")
    if b.teacher_dtype == "auto":  # hd distill's default, resolved so that the record says what ran
        b.teacher_dtype = "bf16" if cuda else "fp32"
    b.batch_size = (64 if cuda else 8) if b.batch_size is None else b.batch_size
    b.steps = (20 if cuda else 3) if b.steps is None else b.steps
    b.warmup = (5 if cuda else 1) if b.warmup is None else b.warmup
    _check(b, device)
    mim_arch, feat_arch = (teacher_arch(t) for t in b.teachers)
    cfg = _config(b, mim_arch, feat_arch)
    per = b.per
    interleave = ((not cuda) if b.interleave is None else b.interleave) or per == 2  # alternating: one by one
    w = Window(cuda=cuda, device=device, per=per, first=per * b.warmup, last=per * (b.warmup + b.steps),
                interleave=interleave, extras=b.breakdown or b.reference or b.gemm)

    g = torch.Generator().manual_seed(b.seed)
    images = torch.randint(0, 256, (b.batch_size, 3, b.img_size, b.img_size), dtype=torch.uint8, generator=g)
    if cuda:
        images = images.pin_memory()  # as a DataLoader with pin_memory=True hands it over
    batch = (images, torch.zeros(b.batch_size, dtype=torch.long))
    clock, task, parts, syncs, peak_mem = run_engine(b, cfg, batch, w)
    method = task.method
    step_s = [clock.step(i) for i in range(w.first, w.last, w.per)]
    step_ms = median_ms(step_s) if w.per_step else 1e3 * (clock.ends[w.last] - clock.starts[w.first]) / b.steps
    model = flops.of_method(method)
    tflops = model.total * b.batch_size / (step_ms / 1e3) / 1e12
    result: dict = {"images_per_s": b.batch_size / (step_ms / 1e3), "step_ms": step_ms, "tflops": tflops,
                    "mfu": None, "peak_mem_mb": peak_mem, "breakdown_ms": None, "gemm_tflops": None, "of_gemm": None}
    samples = {"step": [1e3 * s for s in step_s]}
    if parts is not None:
        samples.update({k: [1e3 * s for s in v] for k, v in parts.samples.items()})
        result.update(_part_figures(b, parts, step_s, step_ms, tflops, model.total * b.batch_size, paired=w.interleave))
    name = device_name(device)
    peak = b.peak_tflops or (peak_tflops(name) if cuda else None)
    result["mfu"] = tflops / peak if peak else None
    if cuda and b.sync_debug:
        where: dict[str, int] = {}
        for warning in syncs:
            key = f"{os.path.relpath(warning.filename)}:{warning.lineno}"
            where[key] = where.get(key, 0) + 1
        result["host_syncs"] = {"per_step": len(syncs) / b.steps, "where": where}
    result["teacher_param_bytes"] = sum(p.numel() * p.element_size() for m in method.teachers.values()
                                        for p in m.parameters())
    result["flops_per_image"] = model.as_dict()
    result["gflops_per_image"] = model.total / 1e9
    if b.data is not None:
        other_s = [clock.step(i) for i in range(w.first + 1, w.last, 2)]
        samples["synthetic_step"] = [1e3 * x for x in other_s]
        ratio = statistics.median(x / y for x, y in zip(step_s, other_s, strict=True))
        result["data"] = {"source": b.data, "workers": cfg.data.num_workers, "decode": b.decode,
                          "synthetic_step_ms": median_ms(other_s), "real_over_synthetic": ratio,
                          "waited_for_data": ratio > 1.05}
    elif b.signals:
        other_s = [clock.step(i) for i in range(w.first + 1, w.last, 2)]
        samples["signals_step"] = [1e3 * x for x in other_s]
        ratio = statistics.median(y / x for x, y in zip(step_s, other_s, strict=True))
        # a run computes them on one step in log_every (default 50): that step's extra time, spread over them
        result["signals"] = {"step_ms": median_ms(other_s), "signals_step_over_step": ratio,
                             "overhead_at_log_every_50": (ratio - 1) / 50}
    elif b.cached_targets:
        other_s = [clock.step(i) for i in range(w.first + 1, w.last, 2)]
        samples["cached_step"] = [1e3 * x for x in other_s]
        one = flops.of_method(method)
        result["cached"] = {"step_ms": median_ms(other_s), "flop_model": one.student / one.total,
                            "step_over_online": statistics.median(y / x for x, y in zip(step_s, other_s, strict=True))}
    elif b.students > 1:
        singles = [[clock.step(i) for i in range(w.first + k, w.last, per)] for k in range(1, per)]
        samples.update({f"single_{k}_step": [1e3 * x for x in v] for k, v in enumerate(singles)})
        one = flops.of_method(method)  # one student with its teachers; N students share the teachers
        n_flops = one.teachers + b.students * one.student
        result["students"] = {
            "n": b.students, "single_step_ms": [median_ms(v) for v in singles],
            # the N-student step against the N single-student steps around it, same load: median of the ratios
            "step_over_single_sum": statistics.median(x / sum(ys) for x, *ys in zip(step_s, *singles, strict=True)),
            "flop_model": n_flops / (b.students * one.total)}
        model = flops.StepFlops(one.mim_teacher, one.feat_teacher, b.students * one.student_fwd,
                                b.students * one.student_bwd, b.students * one.loss, one.n_patches, one.n_keep)
        tflops = model.total * b.batch_size / (step_ms / 1e3) / 1e12
        result.update(tflops=tflops)
    elif per == 2:
        other_s = [clock.step(i) for i in range(w.first + 1, w.last, 2)]
        samples["compare_step"] = [1e3 * x for x in other_s]
        other = task.model.b
        result["compare"] = {
            "drop_ratio": b.compare_drop_ratio, "n_keep": other.n_keep, "step_ms": median_ms(other_s),
            "gflops_per_image": flops.of_method(other).total / 1e9,
            # neighbouring steps, same load: the median of their ratios
            "step_over_compare": statistics.median(x / y for x, y in zip(step_s, other_s, strict=True)),
        }
    result["samples_ms"] = samples
    result["config"] = _record(b, cfg, w, method, (mim_arch, feat_arch), name=name, peak=peak,
                               gemm_size=parts.gemm_size if parts is not None and b.gemm else None)
    return result


def _part_figures(b: DistillBench, parts: Parts, step_s: list[float], step_ms: float, tflops: float,
                  step_flops: float, *, paired: bool) -> dict:
    """Breakdown, reference and matmul figures; ``paired``: parts sample j ran right before timed step j, so
    ratios are medians of neighbouring ratios."""
    med = parts.medians_ms()
    out: dict = {}
    if b.breakdown:
        out["breakdown_ms"] = {k: med[k] for k in PARTS}
        out["parts_sum_ms"] = sum(out["breakdown_ms"].values())
        out["step_over_parts"] = step_ms / out["parts_sum_ms"]
        if paired:
            sums = [sum(x) for x in zip(*(parts.samples[k] for k in PARTS), strict=True)]
            out["step_over_parts"] = statistics.median(x / y for x, y in zip(step_s, sums, strict=True))
    if b.reference:
        out["reference_ms"] = {"mim_teacher": med["ref_mim_teacher"], "timm_blocks": med["timm_blocks"]}
        out["mim_over_timm"] = statistics.median(
            m / t for m, t in zip(parts.samples["ref_mim_teacher"], parts.samples["timm_blocks"], strict=True))
    if b.gemm:
        out["gemm_tflops"] = parts.gemm_flops / (med["gemm"] / 1e3) / 1e12
        out["of_gemm"] = tflops / out["gemm_tflops"]
        if paired:
            out["of_gemm"] = statistics.median(step_flops * g / (x * parts.gemm_flops)
                                               for x, g in zip(step_s, parts.samples["gemm"], strict=True))
    return out


def _record(b: DistillBench, cfg, w: Window, method, archs: tuple[str, str], *, name: str, peak, gemm_size) -> dict:
    """The ``config`` entry of the result: what was measured, on what, and how."""
    return {
        "student": b.student, "teachers": list(b.teachers), "teacher_archs": list(archs),
        "batch_size": b.batch_size, "img_size": b.img_size, "overrides": {**b.overrides(), "patch_size": b.patch_size},
        "drop_ratio": b.drop_ratio, "masking": b.masking, "n_patches": method.num_patches, "n_keep": method.n_keep,
        "keep_fraction": method.n_keep / method.num_patches, "relation_blocks": list(cfg.distill.relation_blocks),
        "mask_blocks": list(cfg.distill.mask_blocks), "relation_heads": cfg.distill.relation_heads,
        "dtype": b.dtype, "teacher_dtype": b.teacher_dtype, "students": b.students,
        "cached_targets": b.cached_targets, "compile": b.compile,
        "steps": b.steps, "warmup": b.warmup,
        "step_time": "median over steps" if w.per_step else "mean over the window (synchronised at its ends)",
        "interleaved": bool(w.interleave and w.extras),
        "ratios": "medians of ratios of neighbouring measurements" if w.interleave else "ratios of medians",
        "breakdown": "eager (not compiled)" if b.compile else "as the step", "device": name,
        "peak_tflops": peak, "gemm_size": gemm_size,
        "peak_mem": "torch.cuda.max_memory_allocated" if w.cuda else "process peak RSS",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "pinned_input": w.cuda,
        "load": loadavg(), **b.extra,
    }


# ---------------------------------------------------------------- data
