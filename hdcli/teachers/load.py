"""Loading models: frozen teachers by name, tag, ``local-dir:`` or a run's ``student/``; importing checkpoint
files into the cache; ``hd fetch-teachers``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hdcli.errors import HDError, did_you_mean
from hdcli.rundir import CHECKPOINTS, STUDENT

if TYPE_CHECKING:
    from torch import nn

from hdcli.teachers import sources
from hdcli.teachers.hub import (
    cached_weights,
    hub_source,
    is_offline,
    missing_weights,
    probe_hub,
    resolve_cache_dir,
    sha256,
    write_cache_entry,
    write_manifest,
)
from hdcli.teachers.registry import (
    HF,
    HF_HUB,
    LOCAL_DIR,
    OPENCLIP,
    PY,
    REGISTRY,
    WEIGHT_FILES,
    TeacherSpec,
    hf_dir,
    names,
    resolve,
)


def _build(spec: TeacherSpec, *, cache_dir, offline: bool | None, **kwargs) -> nn.Module:
    """timm.create_model(pretrained=True) for ``spec``: cached weights from the cache, else a download."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    cache = resolve_cache_dir(cache_dir)
    tag, overlay = spec.tag, None
    if tag.startswith(LOCAL_DIR):
        read_model_config(tag.removeprefix(LOCAL_DIR))
    if not tag.startswith(LOCAL_DIR):
        weights = cached_weights(spec, cache)
        if weights is not None and tag.startswith(HF_HUB):
            tag = LOCAL_DIR + str(weights.parent)  # the snapshot holds config.json + weights: no network
        elif weights is not None:
            overlay = {"file": str(weights)}  # timm's own file path: same filter fn, no network
        elif is_offline(offline):
            raise missing_weights(spec, cache)
        else:
            probe_hub(spec, cache)
    try:
        return _create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay,
                             cache_dir=str(cache) if cache_dir else None, **kwargs)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise missing_weights(spec, cache, why="not found while loading") from e
    except HDError:
        raise
    except Exception as e:  # a weights file cut by an interrupted copy or download (issue 10)
        from pickle import UnpicklingError

        from safetensors import SafetensorError

        msg = str(e).strip()
        if isinstance(e, SafetensorError | UnpicklingError | EOFError) or "PytorchStreamReader" in msg:
            raise HDError(f"cannot read the weights of teacher '{spec.name}' ({spec.tag}): "
                          f"{(msg.splitlines() or [type(e).__name__])[0][:200]}",
                          "the file is truncated or corrupt (an interrupted copy or download?): copy or fetch "
                          "it again") from e
        raise


def _create_model(tag: str, **kwargs) -> nn.Module:
    """timm.create_model with timm's user-facing failures turned into HDErrors."""
    import timm

    from hdcli.models.vit import SUPPORTED

    try:
        return timm.create_model(tag, **kwargs)
    except TypeError as e:  # e.g. a ResNet: its constructor takes no img_size / patch_size
        if "unexpected keyword argument" not in str(e):
            raise
        arg = str(e).split("unexpected keyword argument")[-1].strip(" '\"")
        if arg in ("img_size", "patch_size", "drop_path_rate", "global_pool"):  # what hd passes to every ViT
            raise HDError(f"{tag} is not a Vision Transformer (timm's model takes no {arg})",
                          f"hd distils, fine-tunes and analyses a {SUPPORTED}, or a save_for_hf dir of one") from None
        raise HDError(f"timm's {tag} takes no argument {arg!r}",
                      "check student.kwargs / distill.teacher_kwargs (e.g. embed_dim, depth, num_heads)") from None
    except ValueError as e:
        if "source prefix" in str(e) or "model source" in str(e):
            raise HDError(str(e).splitlines()[0], "prefix a directory with local-dir:") from e
        raise
    except RuntimeError as e:
        msg = str(e).strip()
        if msg.startswith("Unknown model"):
            raise HDError(f"timm has no model '{tag}'", did_you_mean(tag, timm.list_models())) from e
        if (why := _load_error(msg)) is not None:
            raise HDError(f"the weights do not fit {tag}: {why}",
                          "check the img_size/patch_size/architecture overrides and the checkpoint") from e
        raise


def _load_error(msg: str) -> str | None:
    """A one-line summary of torch's load_state_dict error (missing/unexpected keys, size mismatches)."""
    if "Error(s) in loading state_dict" not in msg and "size mismatch" not in msg:
        return None
    lines = [ln.strip() for ln in msg.splitlines()[1:] if ln.strip()] or [msg.splitlines()[0]]
    why = "; ".join(lines)
    return why if len(why) <= 300 else why[:297] + "..."


def load(name: str | TeacherSpec, *, cache_dir: str | os.PathLike | None = None, offline: bool | None = None,
         img_size: int | tuple[int, int] | None = None, patch_size: int | None = None, mean=None, std=None,
         **timm_kwargs) -> nn.Module:
    """A frozen (``requires_grad=False``), eval-mode timm model without classifier (``num_classes=0``).

    Weights come from the hub cache (``cache_dir``, default ``HF_HUB_CACHE``) or a local directory;
    missing ones are downloaded unless ``offline`` (default: ``HF_HUB_OFFLINE``), in which case an HDError
    names the tag, the cache and the ways out. ``img_size``/``patch_size`` rebuild the model at another
    resolution / patch size; timm resamples the position (and patch) embeddings while loading (a /14
    teacher at 196 px gives the 14x14 grid of a /16 student at 224 px). Mean/std stay in
    ``model.pretrained_cfg["mean"/"std"]``. ``hf:`` (Transformers) and ``py:`` (a callable) teachers come in timm's
    layout (``hdcli.models.hf``, ``hdcli.models.features``), as do timm models that are not ViTs (features only);
    ``mean``/``std``: their input statistics where they state none.
    """
    from hdcli.models import features

    spec = resolve(name)
    if spec.tag.startswith((HF, PY, OPENCLIP)):
        model = sources.load(spec, cache_dir=cache_dir, offline=offline, mean=mean, std=std)
    else:
        if spec.tag.startswith(LOCAL_DIR):  # the classifier is dropped (num_classes=0)
            check_dir(spec.tag.removeprefix(LOCAL_DIR), dropped=("head.",), who=f"teacher '{spec.name}'", num_classes=0)
        model = features.as_teacher(_build(spec, cache_dir=cache_dir, offline=offline, num_classes=0,
                                  img_size=img_size, patch_size=patch_size, **timm_kwargs))
    model.requires_grad_(False)
    return model.eval()


def create(arch: str, *, pretrained: bool = False, cache_dir: str | os.PathLike | None = None,
           offline: bool | None = None, **timm_kwargs) -> nn.Module:
    """A trainable timm model (students, fine-tuning, benchmarks): random init unless ``pretrained``,
    where ``arch`` may be anything :func:`resolve` accepts and weights load as in :func:`load`."""
    if pretrained:
        return _build(resolve(arch), cache_dir=cache_dir, offline=offline, **timm_kwargs)
    tag = arch
    if not (arch.startswith(LOCAL_DIR) or arch.startswith(HF_HUB)):
        tag = resolve(arch).tag if arch.lower() in REGISTRY else arch
    return _create_model(tag, pretrained=False, **{k: v for k, v in timm_kwargs.items() if v is not None})



_HEAD_PREFIXES = ("head.", "head_dist.", "visual.head.", "module.visual.head.")
_HEAD_KEYS = ("visual.proj", "module.visual.proj")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The tensors of a checkpoint file: safetensors, a torch state dict (``{"model": ...}``,
    ``{"state_dict": ...}``, DDP ``module.`` prefixes — timm's ``load_state_dict`` unwraps them; EMA weights
    win where present, timm's convention) or a TorchScript archive (OpenAI's CLIP ``.pt`` files)."""
    import argparse
    import zipfile

    import torch
    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise HDError(f"checkpoint file {path} does not exist", "give NAME=PATH with an existing file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        # MAE/DeiT training checkpoints carry their argparse.Namespace beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:
        raise HDError(f"cannot read {path} as a checkpoint: {str(e).splitlines()[0][:200]}",
                      "give a safetensors file or a torch state dict (.pth/.bin/.pt)") from e
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HDError(f"{path} holds no tensors at its top level (or under 'model'/'state_dict')",
                      "give a state dict file")
    return dict(sd)


def encoder_state_dict(sd: Mapping) -> dict:
    """``sd`` without heads and, for MAE pre-training checkpoints, without decoder and mask token."""
    mae_decoder = any(k.startswith("decoder") for k in sd)
    out = {}
    for k, v in sd.items():
        if k.startswith(_HEAD_PREFIXES) or k in _HEAD_KEYS:
            continue
        if mae_decoder and (k.startswith("decoder") or k == "mask_token"):
            continue
        out[k] = v
    return out


def import_checkpoint(name: str | TeacherSpec, path: str | os.PathLike, *,
                      cache_dir: str | os.PathLike | None = None, **timm_kwargs) -> Path:
    """Convert a checkpoint file for the timm tag of ``name`` and write it into the hub cache as that tag's
    repo (``model.safetensors`` + ``config.json``, ``refs/main`` pointing at it). Returns the weights path.

    The conversion is timm's own pretrained loading with the file as the source, so the architecture's
    checkpoint filter (MAE, OpenAI CLIP ``visual.*``, DeiT, timm) applies, then a strict load: any tensor
    missing or left over is an error. ``timm_kwargs`` are architecture overrides (tests build tiny models).
    """
    spec = resolve(name)
    src = hub_source(spec) if not spec.tag.startswith((LOCAL_DIR, HF_HUB)) else None
    if src is None:
        raise HDError(f"--from-file needs a registry name or a timm tag with a hub repo, not '{spec.name}'",
                      f"e.g. --from-file mae=PATH; registry: {', '.join(names())}")
    repo, files, _ = src
    if files[0] not in WEIGHT_FILES:
        raise HDError(f"{spec.tag} loads a non-timm file ({files[0]}) from the hub; it cannot be imported",
                      "save the model with timm's save_for_hf and load it as a directory instead")
    raw = encoder_state_dict(read_checkpoint(path))
    kwargs = {k: v for k, v in timm_kwargs.items() if v is not None}
    kwargs["num_classes"] = 0
    import timm

    try:  # timm's pretrained path with the file's tensors as the source: its filter fn, a strict load
        model = timm.create_model(spec.tag, pretrained=True,
                                  pretrained_cfg_overlay={"state_dict": raw, "num_classes": 0}, **kwargs)
    except RuntimeError as e:
        if (why := _load_error(str(e))) is None:
            raise
        raise HDError(f"{Path(path).name} does not fit {spec.tag}: {why}",
                      "is it a checkpoint of this architecture (MAE .pth, CLIP visual.*, DeiT, timm, safetensors)?"
                      ) from e
    model.pretrained_cfg.pop("state_dict", None)  # don't keep a second copy of the weights around
    return write_cache_entry(model, repo, resolve_cache_dir(cache_dir))


def describe(spec: TeacherSpec, model: nn.Module, weights: Path | None, cache_dir: Path,
             source: str) -> dict:
    """One manifest record: what was loaded, its size and shape, and which file (path relative to the
    cache where it lies inside it, so a copied cache keeps a valid manifest) with its sha256."""
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
    patch_embed = getattr(model, "patch_embed", None)
    file = None
    if weights is not None:
        file = str(weights)
        if weights.is_relative_to(cache_dir):
            file = str(weights.relative_to(cache_dir))
    src = hub_source(spec)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "name": spec.name,
        "tag": spec.tag,
        "role": spec.role,
        "hub_id": src[0] if src else None,
        "revision": weights.parent.name if (weights is not None and src) else None,
        "source": source,
        "file": file,
        "sha256": sha256(weights) if weights is not None else None,
        "params": sum(p.numel() for p in model.parameters()),
        "embed_dim": getattr(model, "embed_dim", getattr(model, "num_features", None)),
        "num_heads": getattr(attn, "num_heads", None),
        "depth": len(blocks) if blocks is not None else None,
        "patch_size": list(patch_embed.patch_size) if patch_embed is not None else None,
        "img_size": list(patch_embed.img_size) if patch_embed is not None else None,
        "mean": list(cfg.get("mean", ())) or None,
        "std": list(cfg.get("std", ())) or None,
    }


def fetch(teachers: Iterable[str], *, cache_dir: str | os.PathLike | None = None, offline: bool | None = None,
          from_files: Mapping[str, str | os.PathLike] | None = None, progress=None) -> list[dict]:
    """Put each teacher into the hub cache (download, or import from ``from_files[name]``), load it once to
    verify, and record it in ``<cache_dir>/teachers.json``. With ``offline`` only verifies the cache.
    Returns the manifest records in order. ``progress(name, i, n)`` is called before each teacher."""
    cache = resolve_cache_dir(cache_dir)
    from_files = dict(from_files or {})
    wanted = list(dict.fromkeys([*teachers, *from_files]))
    if not wanted:
        raise HDError("no teachers given", f"name some, e.g. `hd fetch-teachers mae,clip`; registry: {', '.join(names())}")
    specs = [resolve(n) for n in wanted]  # all names checked before any download
    offline = is_offline(offline)
    for spec in specs:  # fail fast, before minutes of downloads, on anything that cannot work
        if spec.name in from_files or sources.is_local(spec) or cached_weights(spec, cache):
            continue
        if offline:
            raise missing_weights(spec, cache)
        probe_hub(spec, cache)
    records = []
    for i, spec in enumerate(specs):
        if progress is not None:
            progress(spec.name, i, len(specs))
        if spec.name in from_files:
            import_checkpoint(spec, from_files[spec.name], cache_dir=cache)
            source = f"file:{Path(from_files[spec.name]).expanduser().resolve()}"
        else:
            source = "local-dir" if sources.is_local(spec) else "hub"
        model = load(spec, cache_dir=cache, offline=offline)
        if sources.is_local(spec):
            local = Path(spec.tag[len(LOCAL_DIR):]) if spec.tag.startswith(LOCAL_DIR) else (hf_dir(spec.tag) or Path())
            weights = next((local / f for f in WEIGHT_FILES if (local / f).is_file()),
                           None)
        else:
            weights = cached_weights(spec, cache)
        records.append(describe(spec, model, weights, cache, source))
        del model
    write_manifest(cache, records)
    return records


def read_model_config(d: str | os.PathLike) -> dict:
    """``d/config.json`` of a ``save_for_hf`` dir; HDError when it is cut or not timm's (before timm reads it)."""
    path = Path(d) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HDError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                      "the file is truncated or was not written by timm/hd: copy or export the model again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HDError(f"cannot read {path}: {e}", "copy or export the model again") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise HDError(f"{path} names no architecture", "a timm save_for_hf config.json has \"architecture\": \"vit_...\"")
    return cfg


def student_dir(student: str) -> Path | None:
    """The directory holding the student's ``config.json`` + weights, or None for a hub name/tag.

    Accepts ``local-dir:PATH``, a ``student/`` dir, or a run dir holding ``student/``. A string that
    looks like a path but is not an existing directory is an error.
    """
    explicit = student.startswith("local-dir:")
    raw = student[len("local-dir:"):] if explicit else student
    path = Path(raw).expanduser()
    looks_like_path = explicit or path.exists() or os.sep in raw or raw.startswith((".", "~"))
    if not looks_like_path:
        return None
    if not path.is_dir():
        raise HDError(f"no student directory at {path}",
                      "give a run dir, its student/ dir, or local-dir:PATH holding config.json + model.safetensors")
    for cand in (path, path / STUDENT):
        if (cand / "config.json").is_file():
            if not any((cand / f).is_file() for f in WEIGHT_FILES):
                raise HDError(f"{cand} has config.json but no {WEIGHT_FILES[0]}", "the export needs the weights too")
            read_model_config(cand)
            return cand
    if (path / CHECKPOINTS).is_dir():
        raise HDError(f"the run {path} has no student/ yet", "distill writes student/ when it finishes or saves")
    raise HDError(f"{path} holds no config.json", "give a run dir, its student/ dir, or local-dir:PATH")


def load_student(student: str, *, cache_dir: str | None = None) -> nn.Module:
    """The student as a timm model in eval mode, its own config kept (classifier included).
    Names that are not paths go through the teacher registry / hub cache (``hdcli.teachers.load``)."""
    import timm

    d = student_dir(student)
    if d is None:
        return load(student, cache_dir=cache_dir)
    check_dir(d, who="the student")
    try:
        model = timm.create_model(f"local-dir:{d.resolve()}", pretrained=True)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        raise HDError(f"cannot load the student from {d}: {str(e).splitlines()[0]}",
                      "is it a timm save_for_hf dir (config.json + model.safetensors)?") from e
    return model.eval()


def check_coverage(model: nn.Module, weights: str | os.PathLike, *, fresh: tuple[str, ...] = (),
                   dropped: tuple[str, ...] = (), who: str = "the model") -> None:
    """HDError unless ``weights`` (a safetensors file) and ``model`` hold the same tensors: every tensor of the
    model but the ``fresh`` prefixes (new layers) comes from the file, and every tensor of the file but the
    ``dropped`` prefixes (a replaced classifier, a final norm the pooling leaves unused) goes into the model.

    timm loads non-strictly when the class count changes, so a ``config.json`` that claims fewer blocks than
    the file holds would otherwise drop the rest silently."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            have = set(f.keys())
    except Exception as e:  # SafetensorError: cut or not a safetensors file
        raise HDError(f"cannot read the weights of {who} ({weights}): {str(e).splitlines()[0][:200]}",
                      "the file is truncated or corrupt (an interrupted copy?): copy or write it again") from None
    own = set(model.state_dict())
    missing = sorted(k for k in own - have if not k.startswith(fresh))
    unexpected = sorted(k for k in have - own if not k.startswith(dropped))
    if missing or unexpected:
        parts = [f"{what} {', '.join(keys[:4])}" + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise HDError(f"{who} in {Path(weights).parent} does not fit its own config.json: {'; '.join(parts)}",
                      "config.json and model.safetensors must come from the same save (hd writes both)")


def init_from(model: nn.Module, name: str, *, cache_dir: str | None = None) -> None:
    """Copy the weights of the pretrained model ``name`` (``local-dir:DIR``, a run dir or its ``student/``, a
    registry name or hub tag) into ``model`` (a student of the same architecture, e.g. continued or domain
    distillation). HDError naming the first tensor that differs in name or shape; nothing is copied then."""
    source = encoder_state_dict(load_student(name, cache_dir=cache_dir).state_dict())
    own = encoder_state_dict(model.state_dict())
    order = {k: i for i, k in enumerate(own)}  # the student's own order first, then what only the source has
    for k in sorted(own.keys() | source.keys(), key=lambda k: (k not in own, order.get(k, 0))):
        if k not in source:
            raise HDError(f"student.init {name!r} is another architecture: it has no {k} (the student's "
                          f"{tuple(own[k].shape)})", "init from a model of the student's architecture and size")
        if k not in own:
            raise HDError(f"student.init {name!r} is another architecture: its {k} {tuple(source[k].shape)} has no "
                          "place in the student", "init from a model of the student's architecture and size")
        if tuple(own[k].shape) != tuple(source[k].shape):
            raise HDError(f"student.init {name!r} is another architecture: {k} is {tuple(source[k].shape)} there, "
                          f"{tuple(own[k].shape)} in the student", "init from a model of the student's architecture, "
                          "size and image size")
    model.load_state_dict(source, strict=False)


def check_dir(d: str | os.PathLike, *, fresh: tuple[str, ...] = (), dropped: tuple[str, ...] = (),
              who: str = "the model", **timm_kwargs) -> None:
    """:func:`check_coverage` of a ``save_for_hf`` dir before its weights are loaded: the model its
    config.json (+ ``timm_kwargs``) builds, made on the meta device (no memory, no init), against its file."""
    import timm
    import torch

    d = Path(d)
    if not (d / WEIGHT_FILES[0]).is_file():
        return  # pytorch_model.bin: timm's strict load is the check
    try:
        with torch.device("meta"):
            model = timm.create_model(f"local-dir:{d.resolve()}", pretrained=False, **timm_kwargs)
    except Exception:
        return  # a config timm cannot build: its own error comes with the real load
    check_coverage(model, d / WEIGHT_FILES[0], fresh=fresh, dropped=dropped, who=who)
