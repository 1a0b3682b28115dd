"""Teacher registry and loading: short names -> timm tags and roles; frozen timm ViTs from the hub cache.

Weights live in the Hugging Face hub cache layout (``models--ORG--NAME/snapshots/<rev>/...`` plus
``refs/main``), so a cache filled on a login node (``hd fetch-teachers``) or by ``--from-file``
imports works on compute nodes with ``HF_HUB_OFFLINE=1``. Once a teacher's weights are in the cache
they are loaded from there without any network call (teachers are pinned to what the cache holds);
only missing weights are downloaded, after a quick reachability probe so that a machine without
network fails in seconds instead of after huggingface_hub's minute of retries.

torch/timm/huggingface_hub are imported inside the functions: the registry itself is cheap to import
(for config validation, ``hd --help``) and ``--offline`` must be set before huggingface_hub loads.
"""

from hdcli.teachers.hub import (
    cached_weights,
    default_cache_dir,
    hub_source,
    probe_hub,
    write_cache_entry,
    write_manifest,
)
from hdcli.teachers.load import (
    check_coverage,
    check_dir,
    create,
    describe,
    encoder_state_dict,
    fetch,
    import_checkpoint,
    init_from,
    load,
    load_student,
    read_checkpoint,
    student_dir,
)
from hdcli.teachers.registry import (
    HF_HUB,
    LOCAL_DIR,
    MANIFEST,
    REGISTRY,
    REGISTRY_HUB_IDS,
    ROLES,
    STATS,
    WEIGHT_FILES,
    TeacherSpec,
    names,
    resolve,
)

__all__ = [
    "HF_HUB", "LOCAL_DIR", "MANIFEST", "REGISTRY", "ROLES", "STATS", "WEIGHT_FILES", "REGISTRY_HUB_IDS", "TeacherSpec",
    "cached_weights", "check_coverage", "check_dir", "create", "default_cache_dir", "describe", "encoder_state_dict", "fetch", "hub_source",
    "import_checkpoint", "init_from", "load", "load_student", "names", "probe_hub", "read_checkpoint", "resolve", "student_dir",
    "write_cache_entry", "write_manifest",
]
