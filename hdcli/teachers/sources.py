"""Teachers from other sources than timm (docs/teachers.md "Bring any teacher"): ``hf:`` Transformers models (a
directory, or a hub repo through the hub cache), ``py:module:callable`` modules and ``openclip:ARCH:FILE`` towers.
Which library module is which is known in ``hdcli.models.hf`` / ``.openclip`` / ``.features``; this module finds
their files and calls them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hdcli.errors import HDError
from hdcli.teachers.hub import (
    HF_FILES,
    cached_weights,
    is_offline,
    missing_weights,
    probe_hub,
    resolve_cache_dir,
)
from hdcli.teachers.registry import HF, LOCAL_DIR, OPENCLIP, PY, TeacherSpec, hf_dir

if TYPE_CHECKING:
    from torch import nn


def load(spec: TeacherSpec, *, cache_dir, offline: bool | None, mean, std) -> nn.Module:
    """The teacher of an ``hf:``, ``py:`` or ``openclip:`` spec, in timm's layout (``hdcli.models.adapted``)."""
    if spec.tag.startswith(HF):
        return _hf_model(spec, cache_dir=cache_dir, offline=offline, mean=mean, std=std)
    if spec.tag.startswith(PY):
        return _py_model(spec, mean=mean, std=std)
    from hdcli.models import openclip

    arch, _, file = spec.tag[len(OPENCLIP):].partition(":")
    return openclip.load(arch, file)


def _hf_model(spec: TeacherSpec, *, cache_dir, offline: bool | None, mean, std) -> nn.Module:
    """A Transformers teacher (``hf:DIR`` or ``hf:ORG/NAME``): the directory, or its snapshot in the hub cache
    (downloaded when missing and online)."""
    from hdcli.models import hf

    hf.transformers()  # the extra, before any download
    d = hf_dir(spec.tag)
    if d is None:
        cache = resolve_cache_dir(cache_dir)
        weights = cached_weights(spec, cache)
        if weights is None:
            if is_offline(offline):
                raise missing_weights(spec, cache)
            probe_hub(spec, cache)
            from huggingface_hub import snapshot_download

            repo = spec.tag[len(HF):]
            d = Path(snapshot_download(repo, cache_dir=str(cache), allow_patterns=list(HF_FILES)))
        else:
            d = weights.parent
    return hf.load(d, mean=mean, std=std)


def py_callable(spec: TeacherSpec):
    """The callable of a ``py:module:callable`` teacher (its module imported; cheap: checked before any model
    is built)."""
    import importlib

    module, _, fn = spec.tag[len(PY):].rpartition(":")
    try:
        obj = getattr(importlib.import_module(module), fn)
    except ImportError as e:
        raise HDError(f"teacher {spec.name}: cannot import {module} ({e})",
                      "put the module on PYTHONPATH (or install its package)") from None
    except AttributeError:
        raise HDError(f"teacher {spec.name}: {module} has no {fn}", "name a callable that returns the model") from None
    if not callable(obj):
        raise HDError(f"teacher {spec.name}: {module}.{fn} is not callable", "name a function that returns the model")
    return obj


def _py_model(spec: TeacherSpec, *, mean, std) -> nn.Module:
    """A ``py:module:callable`` teacher: the callable called with no arguments, its model read features-only."""
    from hdcli.models import features

    try:
        model = py_callable(spec)()
    except HDError:
        raise
    except Exception as e:  # the lab's own code: one line naming it, not its traceback
        raise HDError(f"teacher {spec.name}: calling it failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
                      "the callable is called with no arguments and returns the model; --debug shows the traceback") from e
    return features.from_callable(model, name=spec.name, mean=mean, std=std)


def is_local(spec: TeacherSpec) -> bool:
    """Whether a teacher is read from files the user named (no hub cache): a directory, a callable, a checkpoint."""
    return spec.tag.startswith((LOCAL_DIR, PY, OPENCLIP)) or (spec.tag.startswith(HF) and hf_dir(spec.tag) is not None)


