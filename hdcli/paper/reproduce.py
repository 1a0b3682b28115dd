"""The paper's experiments as one resumable chain: ``hd reproduce table1|table2|ablations`` (``make reproduce-*``).

    p = plan("table1", out="runs/paper", data={"in1k": "/data/in1k-wds"}, gpus=8)
    print(execute.format_plan(p))     # DRY_RUN=1: every command with its estimated GPU-hours (hdcli.paper.execute)
    execute.execute(p)                # runs what is not done yet, in order

Per run (one per trained row of paper_results.toml, ``recipes/paper/<run>.toml``) the stages are

    distill   hd distill --recipe recipes/paper/<run>.toml --data ... --out OUT/<run>/distill --resume auto
    finetune  hd finetune <set> --student OUT/<run>/distill --out OUT/<run>/ft-<set> --resume auto   (Tab. 1, 2)
    export    hd export OUT/<run>/distill --format detectron2|mmseg --out OUT/<run>/export/...       (Tab. 1, 3-8)
    coco      detectron2 ViTDet Mask R-CNN  -> OUT/<run>/coco.json     (only where detectron2 is installed)
    ade20k    mmseg UperNet                 -> OUT/<run>/ade20k.json   (only where mmseg is installed)

then ``hd report <target> --runs OUT --out OUT/<target>.md``. A stage is skipped when its result exists
(``student/model.safetensors``, ``results.json`` + ``student/``, the export file, the json); training
stages always pass ``--resume auto``, so an interrupted one continues from its newest checkpoint.

``scale="smoke"`` runs the identical chain with tiny models (the recipe's architectures at width 48/64,
random teachers as in recipes/distill/tiny-cpu.toml), the demo digits for every data set and a few steps
per stage, on the CPU, in-process (one interpreter for all stages).

GPU-hours come from the analytic FLOP model (``hdcli.tools.flops``: model FLOPs of every step) divided by an
achieved TFLOP/s per GPU: measured by ``hd bench distill --json`` on your GPU (``bench=``), given
(``tflops=``), or else an assumption that the plan labels as such.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from hdcli import config
from hdcli.errors import HDError, did_you_mean
from hdcli.paper import downstream, figures, report
from hdcli.teachers.registry import RANDOM, random_arch
from hdcli.tools import flops

REPO = report.REPO
PAPER_RECIPES = REPO / "recipes" / "paper"
FINETUNE_RECIPES = REPO / "recipes" / "finetune"
FIGURES = "figures"  # the paper's Figures 1-3 (Sec. 2; hdcli.paper.figures)
TARGETS = (*report.REPORTS, FIGURES)
SCALES = ("full", "smoke")
DEFAULT_OUT = {"full": "runs/paper", "smoke": "runs/paper-smoke"}

# Data a stage reads: key -> (make variable, hd finetune dataset, training images per epoch).
DATA = {
    "in1k": ("DATA_IN1K", "imagenet", 1_281_167),
    "in21k": ("DATA_IN21K", None, 14_197_122),  # ImageNet-21k (fall11, all 21,841 classes)
    "cifar100": ("DATA_CIFAR", "cifar100", 50_000),
    "cars": ("DATA_CARS", "cars", 8_144),
    "inat19": ("DATA_INAT", "inat19", 265_213),
}
DISTILL_DATA = {"hybrid-mae-clip-vitl": "in21k"}  # paper Sec. 4.1: ViT-L on ImageNet-21k; the rest on IN-1k
TABLE_FINETUNE = {"table1": ("in1k",), "table2": ("cifar100", "cars", "inat19"), "ablations": ()}
TABLE_EXPORTS = {"table1": ("detectron2", "mmseg"), "table2": (), "ablations": ("detectron2",)}
TABLE_DOWNSTREAM = {"table1": ("coco", "ade20k"), "table2": (), "ablations": ("coco",)}
WEAK_MAE = "teachers/mae-in100"  # placeholder teacher of recipes/paper/abl-hybrid-weakmae-clip.toml
REF_WORLD = 8  # recipes give the per-GPU batch for 8 GPUs (the paper's 8 V100s): global batch = 8 x batch_size

# Achieved TFLOP/s per GPU assumed when no measurement is given (labelled as an assumption in the plan).
ASSUMED_PEAK, ASSUMED_MFU, ASSUMED_GPU = 989.0, 0.30, "H100 SXM (989 dense bf16 TFLOP/s)"


# Tiny stand-ins for SCALE=smoke (the recipes' architectures at test size, as recipes/distill/tiny-cpu.toml).
SMOKE_IMG, SMOKE_PATCH, SMOKE_STEPS, SMOKE_BATCH = 32, 4, 3, 16


def smoke_dims(depth: int) -> dict:
    """Tiny width/heads for an architecture of ``depth`` blocks (depth kept so block indices stay valid)."""
    return {"embed_dim": 48, "depth": depth, "num_heads": 3} if depth <= 12 else \
        {"embed_dim": 64, "depth": depth, "num_heads": 4}


# ---------------------------------------------------------------- the plan

@dataclass
class Step:
    """One command of the chain."""

    run: str  # the run it belongs to ("" for the teachers check and the report)
    stage: str  # teachers | distill | finetune:<set> | export:<fmt> | coco | ade20k | report
    argv: list[str]  # argv[0]: hd | accelerate | srun | python | bash
    done: Path | None = None  # exists = finished (None: always runs)
    gpu_hours: float | None = None
    estimate: str = ""  # how gpu_hours was estimated, where it is not the plain FLOP model
    skip: str = ""  # why it will not run (tool missing, variable unset); empty = it runs
    after: Callable[[], None] | None = None  # turns the tool's own output into coco.json / ade20k.json
    needs: tuple[str, ...] = ()  # data keys it reads

    @property
    def is_done(self) -> bool:
        return self.done is not None and self.done.exists()

    def command(self) -> str:
        return join(self.argv)


PLACEHOLDERS = ("$DATA_", "$DETECTRON2_DIR", "$MMSEG_DIR")


def join(argv: list[str]) -> str:
    """shlex.join, except that unset-variable placeholders ($DATA_IN1K, ...) stay expandable: "$DATA_IN1K"."""
    return " ".join(f'"{a}"' if a.startswith(PLACEHOLDERS) and not any(c in a for c in "'\"`\\")
                    else shlex.quote(a) for a in argv)


@dataclass
class Plan:
    target: str
    scale: str
    out: Path
    gpus: int
    nodes: int
    tflops: float
    tflops_source: str
    data: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)  # run -> where it appears in the paper

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def report(self) -> Path:
        """What the last step writes: ``<target>.md``, or the figures' directory."""
        return self.out / (FIGURES if self.target == FIGURES else f"{self.target}.md")


def fit_batch(per_device: int, accum: int, world: int, ref_world: int = REF_WORLD) -> tuple[int, int]:
    """Per-device batch and accumulation steps giving the recipe's global batch (written for ``ref_world``
    GPUs) on ``world`` GPUs: 1 GPU -> (128, 8) for 128 x 8; 16 GPUs -> (64, 1). Where the global batch does
    not divide, the nearest accumulation is used (lr = blr x batch / 256 follows the batch)."""
    target = per_device * accum * ref_world
    if target % world:
        return per_device, max(1, round(target / (per_device * world)))
    per_world = target // world
    a = max(1, math.ceil(per_world / per_device))
    while per_world % a:
        a += 1
    return per_world // a, a


def launcher(world: int, nodes: int, *, offline: bool = True) -> list[str]:
    """The command prefix of a training stage on ``world`` GPUs (before the hd subcommand)."""
    hd = ["hd", "--offline"] if offline else ["hd"]
    if world <= 1:
        return hd
    acc = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(world)]
    if nodes > 1:
        acc += ["--num_machines", str(nodes), "--machine_rank", "$SLURM_NODEID",
                "--main_process_ip", "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)",
                "--main_process_port", "${MASTER_PORT:-29500}"]
    return acc + ["-m", "hdcli", *hd[1:]]


def _wrap_nodes(argv: list[str], nodes: int) -> list[str]:
    """On several nodes, one launcher per node under srun (inside a SLURM allocation)."""
    if nodes <= 1:
        return argv
    inner = " ".join(a if a.startswith(("$SLURM", "$(", "${")) else shlex.quote(a) for a in argv)
    return ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "bash", "-c", inner]


@cache
def arch_dims(arch: str, **kwargs):
    """ViTDims of a timm architecture or teacher name (meta device: no weights)."""
    from hdcli import teachers

    if arch == WEAK_MAE or arch.startswith(("local-dir:", "/", ".")):
        arch = "vit_base_patch16_224.mae"  # a teacher directory: the estimate assumes an MAE ViT-B/16
    elif arch.startswith(RANDOM):
        arch = random_arch(arch)[0]
    else:
        arch = teachers.resolve(arch).tag
    return flops.arch_dims(arch, **kwargs)


def student_dims(cfg, img_size: int | None = None):
    kw = dict(cfg.student.kwargs)
    if cfg.student.patch_size:
        kw["patch_size"] = cfg.student.patch_size
    return arch_dims(cfg.student.arch, img_size=img_size or cfg.data.img_size, **kw)


def distill_flops(cfg) -> int:
    """Model FLOPs per image of one distillation step of ``cfg`` (teachers and student named as in its recipe)."""
    return flops.distill_step(cfg, lambda name: arch_dims(name, img_size=cfg.data.img_size), student_dims(cfg))




def _load_bench(path: str | os.PathLike) -> tuple[float, str]:
    obj = report.read_json(Path(path))
    if not obj or not isinstance(obj.get("tflops"), int | float) or obj["tflops"] <= 0:
        raise HDError(f"{path} is not the output of `hd bench distill --json` (no 'tflops')",
                      "run: hd bench distill --json > bench.json on one GPU of the cluster")
    dev = (obj.get("config") or {}).get("device", "?")
    return float(obj["tflops"]), f"measured by hd bench distill on {dev} ({path})"


FT_ALIASES = {"in1k": ("imagenet", "in1k", "in-1k"), "cifar100": ("cifar100", "cifar-100", "cifar"),
              "cars": ("cars",), "inat19": ("inat19", "inat-19", "inat")}
SIZE_ALIASES = {"b": ("vitb", "vit-b", "vit_b", "base"), "l": ("vitl", "vit-l", "vit_l", "large")}


def finetune_recipe(dataset_key: str, arch: str, root: Path = FINETUNE_RECIPES) -> Path | None:
    """The recipes/finetune recipe of a data set for a ViT-B or ViT-L student: the file whose name holds the
    data set (imagenet/in1k, cifar100, cars, inat19) and the size (vitb/base, vitl/large); for ViT-B also
    one that names no size. None if there is none (hd finetune's defaults then apply)."""
    size = "l" if "large" in arch else "b"
    files = sorted(root.glob("*.toml")) if root.is_dir() else []

    def has(stem: str, words) -> bool:
        return any(re.search(rf"(^|[-_.]){re.escape(w)}($|[-_.])", stem) for w in words)

    ours = [f for f in files if has(f.stem.lower(), FT_ALIASES[dataset_key])]
    sized = [f for f in ours if has(f.stem.lower(), SIZE_ALIASES[size])]
    if sized:
        return sized[0]
    unsized = [f for f in ours if not any(has(f.stem.lower(), w) for w in SIZE_ALIASES.values())]
    return unsized[0] if unsized and size == "b" else None


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def plan(target: str, *, out: str | os.PathLike | None = None, scale: str = "full",
         data: dict[str, str | None] | None = None, gpus: int | None = None, nodes: int = 1,
         only: list[str] | None = None, mae_in100: str | None = None, detectron2_dir: str | None = None,
         mmseg_dir: str | None = None, bench: str | None = None, tflops: float | None = None,
         paper_path: str | None = None) -> Plan:
    """Every step of ``target`` (table1 | table2 | ablations) in order; nothing runs."""
    from hdcli.config import DistillConfig

    if target not in TARGETS:
        raise HDError(f"unknown target {target!r}", did_you_mean(target, TARGETS))
    if scale not in SCALES:
        raise HDError(f"unknown scale {scale!r}", did_you_mean(scale, SCALES))
    if nodes < 1 or (gpus is not None and gpus < 1):
        raise HDError(f"GPUS and NODES must be ≥ 1, got {gpus} and {nodes}")
    smoke = scale == "smoke"
    if gpus is None:
        gpus = _visible_gpus() or REF_WORLD
    if smoke:
        gpus, nodes = 1, 1
    out = Path(out or DEFAULT_OUT[scale])
    p = Plan(target, scale, out, gpus, nodes, *_throughput(tflops, bench), {k: v for k, v in (data or {}).items() if v})
    if target == FIGURES:
        runs = figures.runs()
    else:
        paper = report.load_paper(paper_path)
        runs = report.runs_of(target, paper)
    if only:
        bad = [r for r in only if r not in runs]
        if bad:
            raise HDError(f"{', '.join(bad)} is not a run of {target}", did_you_mean(bad[0], runs))
        runs = [r for r in runs if r in only]
    cfgs = {r: config.load_config(DistillConfig, recipe=PAPER_RECIPES / f"{r}.toml") for r in runs}

    if not smoke:  # pretrained teachers must be in the hub cache (compute nodes run offline)
        names = list(dict.fromkeys([*(t for c in cfgs.values() for t in c.distill.teachers if t != WEAK_MAE),
                                    *(figures.BASELINES if target == FIGURES and not only else ())]))
        p.steps.append(Step("", "teachers", ["hd", "fetch-teachers", "--offline", *names],
                            gpu_hours=0.0, estimate="verifies the hub cache; download first with "
                            f"`hd fetch-teachers {' '.join(names)}` on a machine with internet"))
    for r, cfg in cfgs.items():
        run_dir = out / r
        distill = _distill_step(p, r, cfg, run_dir, mae_in100)
        p.steps.append(distill)
        if target == FIGURES:
            p.labels[r] = figure_labels(r)
            p.steps += [_analyze_step(p, r, [str(run_dir / "distill")], metric, skip=distill.skip)
                        for metric in figures.METRICS]
            continue
        p.labels[r] = report.row_labels(r, paper)
        student = student_dims(cfg, 224) if not smoke else None
        for key in TABLE_FINETUNE[target]:
            p.steps.append(_finetune_step(p, r, cfg, run_dir, key, skip=distill.skip))
        for fmt in TABLE_EXPORTS[target]:
            f = run_dir / "export" / f"{fmt}.pth"
            p.steps.append(Step(r, f"export:{fmt}", ["hd", "export", str(run_dir / "distill"), "--format", fmt,
                                                     "--out", str(f)], f, 0.0, skip=distill.skip))
        for task in TABLE_DOWNSTREAM[target]:
            st = downstream.stage(task, run_dir, cfg, student, gpus, p.tflops, smoke=smoke,
                                  detectron2_dir=detectron2_dir, mmseg_dir=mmseg_dir)
            p.steps.append(Step(r, task, st.argv, st.done, st.gpu_hours, st.note, skip=distill.skip or st.why,
                                after=st.after))
    if target == FIGURES and not only:  # the pretrained teachers' own curves (Fig. 1a, 2b, 3a)
        why = "smoke runs have no pretrained teachers to measure" if smoke else ""
        p.steps += [_analyze_step(p, figures.TEACHER_RUN, list(figures.BASELINES), metric, skip=why)
                    for metric in figures.METRICS]
    p.steps.append(Step("", "report", ["hd", "report", target, "--runs", str(out), "--out", str(p.report)],
                        gpu_hours=0.0))
    return p


ANALYZE_IMAGES = {"full": 1000, "smoke": 16}  # images per analysis (ImageNet-1k's; the demo's)


def figure_labels(run: str) -> list[str]:
    """Where a run appears in Figures 1-3: ["Fig. 1(b) 2 attention layers", ...]."""
    return [f"Fig. {name[-1]}({panel.letter}) {c.label}" for name, (_m, _t, panels) in figures.FIGURES.items()
            for panel in panels for c in panel.curves if c.source == run]


def _analyze_step(p: Plan, run: str, models: list[str], metric: str, *, skip: str = "") -> Step:
    """``hd analyze`` of a run's student (and decoder) or of the pretrained teachers, into ``<OUT>/<run>/analyze/``."""
    smoke = p.scale == "smoke"
    dest = p.out / run / figures.ANALYZE
    argv = ["hd", *(() if smoke else ("--offline",)), "analyze", metric.replace("_", "-"), *models,
            "--data", "demo" if smoke else p.data.get("in1k", f"${DATA['in1k'][0]}"),
            "--images", str(ANALYZE_IMAGES[p.scale]), "--out", str(dest)]
    if smoke:
        argv += ["--device", "cpu"]
    return Step(run, f"analyze:{metric}", argv, dest / f"{metric}.json", None if smoke else 0.0,
                "" if smoke else "a forward pass of the analysed images", skip=skip,
                needs=() if smoke else ("in1k",))


def _throughput(tflops: float | None, bench: str | None) -> tuple[float, str]:
    """Achieved TFLOP/s per GPU for the GPU-hour estimates, and where the figure comes from."""
    if tflops is not None:
        if tflops <= 0:
            raise HDError(f"--tflops must be > 0, got {tflops}")
        return tflops, f"given: {tflops:g} TFLOP/s per GPU"
    if bench:
        return _load_bench(bench)
    tflops = ASSUMED_PEAK * ASSUMED_MFU
    return tflops, (f"ASSUMED {tflops:.0f} TFLOP/s per GPU = {ASSUMED_MFU:.0%} MFU of an {ASSUMED_GPU}; "
                    "measure yours with `hd bench distill --json > bench.json` and pass BENCH=bench.json")


def _weights(run: Path) -> Path:
    """The file a finished training run leaves: its export's weights."""
    from hdcli.rundir import STUDENT
    from hdcli.teachers import WEIGHT_FILES

    return run / STUDENT / WEIGHT_FILES[0]


def _fit(argv: list[str], batch: int, accum: int, world: int) -> None:
    """Add --batch-size/--accum-steps to ``argv`` where the recipe's (for REF_WORLD GPUs) must change."""
    bs, acc = fit_batch(batch, accum, world)
    if bs != batch:
        argv += ["--batch-size", str(bs)]
    if acc != accum:
        argv += ["--accum-steps", str(acc)]


def _distill_step(p: Plan, r: str, cfg, run_dir: Path, mae_in100: str | None) -> Step:
    smoke = p.scale == "smoke"
    recipe = PAPER_RECIPES / f"{r}.toml"
    distill_dir = run_dir / "distill"
    dkey = DISTILL_DATA.get(r, "in1k")
    argv = [*launcher(p.world, p.nodes, offline=not smoke), "distill", "--recipe", _rel(recipe),
            "--data", "demo" if smoke else p.data.get(dkey, f"${DATA[dkey][0]}"),
            "--out", str(distill_dir), "--resume", "auto"]
    skip = ""
    if WEAK_MAE in cfg.distill.teachers and not smoke:
        if mae_in100:
            argv += rename_teachers(cfg.distill, {WEAK_MAE: mae_in100})
        else:
            skip = "needs the ImageNet-100 MAE teacher: set MAE_IN100=DIR (docs/reproduce.md)"
    if smoke:
        argv += _smoke_distill(cfg)
    else:
        _fit(argv, cfg.train.batch_size, cfg.train.accum_steps, p.world)
    est = None if smoke else flops.gpu_hours(distill_flops(cfg) * DATA[dkey][2] * cfg.train.epochs, p.tflops)
    return Step(r, "distill", _wrap_nodes(argv, p.nodes), _weights(distill_dir), est, skip=skip,
                needs=() if smoke else (dkey,))


def _finetune_step(p: Plan, r: str, cfg, run_dir: Path, key: str, *, skip: str) -> Step:
    smoke = p.scale == "smoke"
    ft_dir = run_dir / f"ft-{key}"
    ft_recipe = finetune_recipe(key, cfg.student.arch)
    argv = [*launcher(p.world, p.nodes, offline=not smoke), "finetune", "demo" if smoke else DATA[key][1]]
    if ft_recipe is not None:
        argv += ["--recipe", _rel(ft_recipe)]
    if not smoke:
        argv += ["--data-dir", p.data.get(key, f"${DATA[key][0]}")]
    argv += ["--student", str(run_dir / "distill"), "--out", str(ft_dir), "--resume", "auto"]
    est, note = None, ""
    if smoke:
        argv += _smoke_finetune()
    else:
        ft = config.read_toml(ft_recipe) if ft_recipe else {}
        _fit(argv, ft.get("train", {}).get("batch_size", 128), ft.get("train", {}).get("accum_steps", 1), p.world)
        epochs = ft.get("train", {}).get("epochs", 100)
        img = ft.get("data", {}).get("img_size", 224)
        d = student_dims(cfg, img)
        grid = img // flops.patch_of(d)
        est = flops.gpu_hours(flops.classifier_step(d, grid * grid) * DATA[key][2] * epochs, p.tflops)
        if ft_recipe is None:
            note = f"no recipes/finetune recipe for {key}: hd finetune's defaults (MAE ViT-B, 100 epochs)"
    return Step(r, f"finetune:{key}", _wrap_nodes(argv, p.nodes), _weights(ft_dir), est, note, skip=skip,
                needs=() if smoke else (key,))


def _smoke_distill(cfg) -> list[str]:
    """Flags that turn a paper recipe into its tiny CPU twin (same teachers' architectures, random weights)."""
    s_depth = arch_dims(cfg.student.arch).depth
    tiny_teachers = []
    for t in cfg.distill.teachers:
        tag = "vit_base_patch16_224.mae" if t == WEAK_MAE else _tag(t)
        tiny_teachers.append(f"random:{tag}")
    t_depth = max(arch_dims(t).depth for t in tiny_teachers)
    sk, tk = {**cfg.student.kwargs, **smoke_dims(s_depth)}, {"patch_size": SMOKE_PATCH, **smoke_dims(t_depth)}
    decoder = cfg.distill.decoder  # an attention decoder at the tiny width
    tiny_decoder = ["--set", f"distill.decoder={_inline({**decoder, 'dim': sk['embed_dim'], 'heads': sk['num_heads']})}"] \
        if isinstance(decoder, dict) else []
    return [*rename_teachers(cfg.distill, dict(zip(cfg.distill.teachers, tiny_teachers, strict=True))), "--img-size", str(SMOKE_IMG), "--patch-size", str(SMOKE_PATCH),
            "--steps", str(SMOKE_STEPS), "--batch-size", str(SMOKE_BATCH), "--num-workers", "0", "--cpu",
            "--mixed-precision", "no", "--save-every", str(SMOKE_STEPS), "--log-every", "1",
            "--set", f"student.kwargs={_inline(sk)}", "--set", f"distill.teacher_kwargs={_inline(tk)}",
            "--set", "optim.warmup_steps=1", *tiny_decoder]


def rename_teachers(dc, new: dict[str, str]) -> list[str]:
    """Flags replacing teachers by other names (smoke: random twins; Tab. 4 ⋆: the MAE_IN100 dir), with the
    targets and the mask teacher that name them rewritten to match."""
    flags = ["--teachers", ",".join(new.get(t, t) for t in dc.teachers)]
    if dc.targets:
        targets = [{**t, "teacher": new.get(t["teacher"], t["teacher"])} for t in dc.targets]
        flags += ["--set", f"distill.targets={config.toml_value(targets)}"]
    if dc.mask_teacher:
        flags += ["--set", f"distill.mask_teacher={config.toml_value(new.get(dc.mask_teacher, dc.mask_teacher))}"]
    return flags


def _smoke_finetune() -> list[str]:
    return ["--img-size", str(SMOKE_IMG), "--steps", str(SMOKE_STEPS), "--epoch-steps", str(SMOKE_STEPS),
            "--batch-size", str(SMOKE_BATCH), "--num-workers", "0", "--cpu", "--mixed-precision", "no",
            "--log-every", "1", "--set", "optim.warmup_steps=1", "--set", "finetune.eval_batch_size=120"]


def _tag(name: str) -> str:
    from hdcli import teachers

    return teachers.resolve(name).tag


def _inline(d: dict) -> str:
    return "{" + ", ".join(f"{k} = {config.toml_value(v)}" for k, v in d.items()) + "}"


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a planning machine without a working CUDA stack plans for 8
        return 0
