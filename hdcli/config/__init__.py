"""Run configuration: dataclass sections whose defaults are the paper's numbers (METHOD.md), TOML recipes
that list only what differs, CLI overrides on top, and the resolved config written to ``<run>/config.toml``.

- :mod:`~hdcli.config.schema`: every config dataclass, the presets and the loaders of each command;
- :mod:`~hdcli.config.loading`: the TOML/CLI machinery (coerce, merge, overrides, validate, write).

Both are torch-free. The names below are the package's API (``from hdcli import config``).
"""

from hdcli.config.distill import (
    MASKING,
    RELATION_HEADS,
    STUDENT_KEYS,
    DistillConfig,
    EvalConfig,
    MethodConfig,
    student_configs,
)
from hdcli.config.loading import (
    apply_overrides,
    coerce,
    dump_config,
    from_dict,
    identity_changes,
    load_config,
    merge,
    parse_assignments,
    read_toml,
    save_config,
    sections,
    to_dict,
    toml_value,
    valid_keys,
    validate,
)
from hdcli.config.schema import (
    ERASE_MODES,
    FT_DATASETS,
    GLOBAL_POOLS,
    LINEAR_PROBE_DEFAULTS,
    MIXED_PRECISION,
    MIXUP_MODES,
    MODES,
    SUPERVISED_DEFAULTS,
    TRACKERS,
    DataConfig,
    FinetuneConfig,
    FinetuneSection,
    OptimConfig,
    PretrainConfig,
    PretrainSection,
    StudentConfig,
    TrainConfig,
    check_choice,
    load_finetune,
    load_pretrain,
)

__all__ = [
    "ERASE_MODES", "FT_DATASETS", "GLOBAL_POOLS", "LINEAR_PROBE_DEFAULTS", "MASKING", "MIXED_PRECISION",
    "MIXUP_MODES", "MODES", "RELATION_HEADS", "STUDENT_KEYS", "SUPERVISED_DEFAULTS", "TRACKERS", "DataConfig",
    "DistillConfig", "EvalConfig", "FinetuneConfig", "FinetuneSection", "MethodConfig", "OptimConfig", "PretrainConfig",
    "PretrainSection", "StudentConfig", "TrainConfig", "check_choice", "apply_overrides", "coerce", "dump_config",
    "from_dict", "identity_changes", "load_config", "load_finetune", "load_pretrain", "merge", "parse_assignments", "read_toml",
    "save_config", "sections", "student_configs", "to_dict", "toml_value", "valid_keys", "validate",
]
