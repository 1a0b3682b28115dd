"""``hd distill``'s config: the ``[distill]`` (method) and ``[eval]`` sections over the shared ones, and several
students (``[[distill.students]]``) as the configs of the single runs they equal. Torch-free at import; validating
the targets of a ``[distill]`` section asks the method (``hdcli.method.hybrid.targets_from_config``), the one
place that knows them."""

from __future__ import annotations

from dataclasses import dataclass, field

from hdcli.config.schema import (
    DataConfig,
    OptimConfig,
    StudentConfig,
    TrainConfig,
    check_choice,
    check_positive,
    check_schedule,
)
from hdcli.errors import HDError, did_you_mean
from hdcli.method.names import MASKING, METRIC_PREFIXES, RELATION_HEADS, TEACHER_DTYPES, paper_blocks


@dataclass
class MethodConfig:
    """What to distil (METHOD.md). Empty ``targets`` = the paper's hybrid: relations of ``teachers[0]`` (the MIM
    teacher, which also chooses the kept tokens) and the features of each further teacher (``teachers[1]`` in the
    paper; more for RADIO-style multi-teacher runs)."""

    teachers: list[str] = field(default_factory=lambda: ["mae", "clip"])  # MIM first; names, tags, dirs, random:ARCH
    teacher_kwargs: dict = field(default_factory=dict)  # timm kwargs for random:ARCH teachers (tiny runs)
    relation_blocks: list[int] = field(default_factory=lambda: list(paper_blocks().relations))  # 9, 10 (layers 10, 11)
    student_relation_blocks: list[int] | None = None  # default: relation_blocks
    mask_blocks: list[int] = field(default_factory=lambda: list(paper_blocks().mask))  # 0, 4, 8
    drop_ratio: float = 0.3  # 196 → 137 → 96 → 67 tokens (34% kept)
    masking: str = "progressive"  # progressive | direct | random | none (paper Tab. 8)
    alpha: float = 1.0  # weight of the relation loss
    beta: float = 2.0  # SmoothL1 beta
    relation_heads: str = "match"  # match | mean
    mask_teacher: str | None = None  # general form only: the teacher choosing kept tokens (default teachers[0])
    targets: list[dict] = field(default_factory=list)  # general form: [{teacher, kind, blocks, weight}, ...]
    target_norm: str = "layernorm"  # layernorm (paper) | standardize (UNIC) | phis (AM-RADIO): feature targets' default
    teacher_dtype: str = "auto"  # the teachers' precision: auto (bf16 on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16
    teacher_mean: list[float] | None = None  # input statistics of teachers that state none (py:, hf: without a
    teacher_std: list[float] | None = None  # preprocessor_config.json); never assumed
    teacher_drop: float = 0.0  # UNIC's teacher dropping: per image, each feature target's loss dropped with this p
    targets_cache: str | None = None  # train from a target cache (hd cache-targets): no teacher is loaded or run
    # several students from one teacher pass (docs/scale.md): names of timm archs, or tables with any of
    # STUDENT_KEYS ({arch, name, kwargs, blr, ...}); each trains as its own single-student run would
    students: list[dict | str] | None = None
    # the paper's Sec. 2 baselines (docs/method.md "Section 2"): the head of the final-feature targets, "none" |
    # "linear" (the paper's) | {blocks = k, dim, heads} (an asymmetric decoder, exported beside the student)
    decoder: str | dict = "linear"
    mask_reconstruction: bool = False  # SimMIM-style: masked positions as a mask token, loss on them only (Sec. 2.4)
    mask_ratio: float = 0.6  # mask_reconstruction: the share of patches masked (SimMIM's)
    mask_block: int | None = None  # mask_reconstruction: mask block side in patches (default: 32 px of 224, scaled)
    # a target's keys: hdcli.method.targets.Target (teacher, kind, blocks, weight, student_blocks, name, norm, ...)

    def validate(self) -> None:
        if not self.teachers:
            raise HDError("distill.teachers is empty", "name the MIM teacher first, then the feature teacher: mae,clip")
        if not 0 <= self.drop_ratio < 1:
            raise HDError(f"distill.drop_ratio must lie in [0, 1), got {self.drop_ratio}")
        check_choice(self.masking, MASKING, "distill.masking")
        check_choice(self.relation_heads, RELATION_HEADS, "distill.relation_heads")
        check_choice(self.teacher_dtype, TEACHER_DTYPES, "distill.teacher_dtype")
        if not 0 <= self.teacher_drop < 1:
            raise HDError(f"distill.teacher_drop is a probability in [0, 1), got {self.teacher_drop}",
                          "0 turns teacher dropping off (the paper); UNIC uses 0.5")
        if self.alpha < 0 or not self.beta > 0:
            raise HDError(f"distill.alpha must be ≥ 0 and distill.beta > 0, got {self.alpha}, {self.beta}")
        for what in ("relation_blocks", "mask_blocks", "student_relation_blocks"):
            blocks = getattr(self, what) or []
            if any(b < 0 for b in blocks):
                raise HDError(f"distill.{what} are 0-based block indices, got {blocks}")
        if not self.targets and len(self.teachers) < 2:
            raise HDError(f"the hybrid default needs two teachers or more (MIM first, then feature teachers), got "
                          f"{self.teachers}", "for other combinations list [[distill.targets]] (see docs/distill.md)")
        if (self.teacher_mean is None) != (self.teacher_std is None) or any(
                v is not None and (len(v) != 3 or (what == "teacher_std" and min(v) <= 0))
                for what, v in (("teacher_mean", self.teacher_mean), ("teacher_std", self.teacher_std))):
            raise HDError(f"distill.teacher_mean / teacher_std need three values each (std > 0), got "
                          f"{self.teacher_mean} / {self.teacher_std}", "e.g. --teacher-mean 0.5,0.5,0.5 --teacher-std 0.5,0.5,0.5")
        if self.mask_teacher is not None and self.mask_teacher not in self.teachers:
            raise HDError(f"distill.mask_teacher {self.mask_teacher!r} is not one of distill.teachers",
                          did_you_mean(self.mask_teacher, self.teachers))
        from hdcli.method.hybrid import (
            targets_from_config,  # the targets (kinds, norms, heads, losses): one place
        )

        targets_from_config(self)


@dataclass
class EvalConfig:
    """``[eval]``: watching a distillation while it runs (docs/distill.md "Watching a run"): k-NN top-1 of the
    student (and once of each teacher), a head-distance / NMI probe, and per-target signals on logged steps."""

    every: int | None = None  # steps between k-NN evaluations; None: every epoch (off in --steps runs); 0: off
    max_share: float = 0.05  # every-epoch schedule: an epoch's evaluation is skipped while it would take the
    #                          evaluations above this share of the run's wall time (the last step always evaluates)
    data: str | None = None  # any --data source (default: data.source); queries from its val split if it has one
    samples: list[int] | None = None  # [bank, queries]; default min(10000, N/10) and min(5000, N/20) of N train images
    k: int = 20  # neighbours (DINO's eval_knn)
    temperature: float = 0.07  # vote weight exp(similarity / T)
    probe_images: int = 64  # images of the head-distance / NMI probe at each evaluation (0: off)
    signals: bool = True  # per-target loss, gradient share, cosine and attention agreement on logged steps

    def validate(self) -> None:
        if self.every is not None and self.every < 0:
            raise HDError(f"eval.every must be ≥ 0 steps, got {self.every}", "0 turns the evaluation off")
        if self.samples is not None and (not 1 <= len(self.samples) <= 2 or min(self.samples) < 1):
            raise HDError(f"eval.samples is [bank, queries] (positive counts), got {self.samples}",
                          "e.g. --eval-samples 10000,5000")
        check_positive(self, "eval", "k", "temperature", "max_share")
        if self.probe_images < 0:
            raise HDError(f"eval.probe_images must be ≥ 0, got {self.probe_images}")

    def active(self, steps: int | None) -> bool:
        """Whether the run evaluates: ``every`` > 0, or unset in a run sized in epochs (not ``--steps``)."""
        return bool(self.every) if self.every is not None else steps is None


@dataclass
class DistillConfig:
    """``hd distill``: every setting of a run. Defaults = the paper's main setting (METHOD.md)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # what defines the method and the model: a resume may not change it (``--allow-config-change``)
    IDENTITY = ("student", "distill", "data.img_size")

    def validate(self) -> None:
        check_schedule(self)
        if self.distill.students is not None:
            student_configs(self)  # each student's own config, validated as a run of its own
            if self.train.mixed_precision == "fp16":
                raise HDError("several students train with their own optimisers, which fp16's one loss scaler cannot "
                              "serve", "use --mixed-precision bf16 (or no)")


# a [[distill.students]] entry's keys -> the config key of its single-student run they set
STUDENT_KEYS = {"arch": "student.arch", "patch_size": "student.patch_size", "kwargs": "student.kwargs",
                "drop_path": "student.drop_path", "init": "student.init", "freeze_blocks": "student.freeze_blocks", "blr": "optim.blr", "lr": "optim.lr",
                "weight_decay": "optim.weight_decay", "drop_ratio": "distill.drop_ratio",
                "relation_blocks": "distill.student_relation_blocks"}


def student_configs(cfg: DistillConfig) -> list[tuple[str, DistillConfig]]:
    """The students of a several-students run (``distill.students``), each with the config of the single-student
    run it equals: ``[student]``, ``[optim]`` and ``[distill]`` with the entry's keys (``STUDENT_KEYS``) over them.
    A name (default: its arch) names ``<run>/students/<name>/``. HDError naming the entry at fault."""
    import copy

    from hdcli.config.loading import apply_overrides, validate

    entries = cfg.distill.students
    if not entries:
        raise HDError("distill.students is empty", "name one or more student archs (--students vit_small_patch16_224,"
                      "vit_base_patch16_224), or leave it out for one student ([student])")
    out: list[tuple[str, DistillConfig]] = []
    for i, entry in enumerate(entries):
        where = f"distill.students[{i}]"
        entry = {"arch": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise HDError(f"{where} must be an arch name or a table, got {entry!r}", "e.g. {arch = \"vit_small_patch16_224\"}")
        for k in entry:
            if k not in (*STUDENT_KEYS, "name"):
                raise HDError(f"unknown key {where}.{k}", did_you_mean(k, (*STUDENT_KEYS, "name")))
        one = copy.deepcopy(cfg)
        one.distill.students = None
        try:
            apply_overrides(one, {STUDENT_KEYS[k]: v for k, v in entry.items() if k != "name"})
            validate(one)
        except HDError as e:
            raise HDError(f"{where}: {e.problem}", e.hint) from None
        name = str(entry.get("name", one.student.arch))
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise HDError(f"{where}.name {name!r} cannot name a directory", "use letters, digits, '-', '_' or '.'")
        if name in METRIC_PREFIXES:
            raise HDError(f"{where}.name {name!r} is a metric's prefix ({name}/...)", "give the student another name")
        if name in (n for n, _ in out):
            raise HDError(f"two students are named {name!r}", f"give {where} its own name = \"...\"")
        out.append((name, one))
    return out


