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

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hdcli import __version__
from hdcli.errors import HDError, closest, did_you_mean

if TYPE_CHECKING:
    from torch import nn

ROLES = ("mim", "feature")
MANIFEST = "teachers.json"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repo, in order


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher as the user named it: ``name`` (as given), ``tag`` (what timm loads), ``role``.

    ``role`` is "mim" (relations + keep sets come from it), "feature" (final features), or None
    for anything outside the registry (the recipe then says what it is used for).
    """

    name: str
    tag: str
    role: str | None = None


# Paper Sec. 4.1 / METHOD.md defaults. OpenAI CLIP was trained with QuickGELU, hence the quickgelu tags.
REGISTRY: dict[str, TeacherSpec] = {
    "mae": TeacherSpec("mae", "vit_base_patch16_224.mae", "mim"),
    "mae-l": TeacherSpec("mae-l", "vit_large_patch16_224.mae", "mim"),
    "clip": TeacherSpec("clip", "vit_base_patch16_clip_quickgelu_224.openai", "feature"),
    "clip-l": TeacherSpec("clip-l", "vit_large_patch14_clip_quickgelu_224.openai", "feature"),
    "deit": TeacherSpec("deit", "deit_base_patch16_224.fb_in1k", "feature"),
}

# The hub repos timm's pretrained_cfg names for the registry tags (the quickgelu CLIP tags share the
# plain CLIP repos). Kept here so that cache checks (`--list`, `--offline`, the no-network probe) need
# no timm import; tests/test_teachers.py checks them against timm.
_REGISTRY_HUB_IDS: dict[str, str] = {
    "mae": "timm/vit_base_patch16_224.mae",
    "mae-l": "timm/vit_large_patch16_224.mae",
    "clip": "timm/vit_base_patch16_clip_224.openai",
    "clip-l": "timm/vit_large_patch14_clip_224.openai",
    "deit": "timm/deit_base_patch16_224.fb_in1k",
}


def names() -> list[str]:
    """The registry's short names, in registry order."""
    return list(REGISTRY)


# ----------------------------------------------------------------------------------------------------------
# resolving names


def resolve(name: str | TeacherSpec) -> TeacherSpec:
    """Map what the user wrote to a :class:`TeacherSpec`.

    Accepted: a registry short name (case-insensitive); ``local-dir:PATH`` or a plain directory
    holding ``config.json`` + weights (timm's ``save_for_hf`` layout, e.g. a run's ``student/``);
    ``hf-hub:ORG/NAME``; any timm model name with or without a pretrained tag.
    """
    if isinstance(name, TeacherSpec):
        return name
    raw = str(name).strip()
    if not raw:
        raise HDError("empty teacher name", f"use one of: {', '.join(names())}, a timm tag or a directory")
    if raw.lower() in REGISTRY:
        return REGISTRY[raw.lower()]
    if raw.startswith(HF_HUB):
        return TeacherSpec(raw, raw, None)
    # timm names never hold a path separator; anything path-like must be a model directory
    if raw.startswith((LOCAL_DIR, ".", "~")) or "/" in raw or os.sep in raw or Path(raw).is_dir():
        path = Path(raw[len(LOCAL_DIR):] if raw.startswith(LOCAL_DIR) else raw).expanduser()
        if not path.is_dir():
            raise HDError(f"teacher directory {path} does not exist",
                          "give a directory holding model.safetensors + config.json (timm's save_for_hf layout)")
        if not (path / "config.json").is_file():
            raise HDError(f"{path} has no config.json, so timm cannot tell which model it holds",
                          "a run's student/ directory or timm's save_for_hf output has one")
        return TeacherSpec(raw, LOCAL_DIR + str(path.resolve()), None)
    return TeacherSpec(raw, _check_timm_tag(raw), None)


def _unknown(tag: str, near: list[str]) -> HDError:
    return HDError(f"unknown teacher '{tag}': not in the registry ({', '.join(names())}) and not a timm model",
                   f"did you mean: {', '.join(near)}? `hd fetch-teachers --list` shows the registry")


def _check_timm_tag(tag: str) -> str:
    """``tag`` if timm knows the model (and its pretrained tag, when one is given), else an HDError."""
    if not re.fullmatch(r"\w+(\.[\w-]+)?", tag):  # timm names are [a-z0-9_]+(.[a-z0-9_]+): no timm import needed
        raise _unknown(tag, closest(tag, names()))
    import timm
    from timm.models import split_model_name_tag

    arch, pretrained_tag = split_model_name_tag(tag)
    if not timm.is_model(arch):
        raise _unknown(tag, closest(tag, names()) + difflib.get_close_matches(arch, timm.list_models(), n=2,
                                                                               cutoff=0.85))
    tags = timm.list_pretrained(f"{arch}.*") if pretrained_tag else []
    if pretrained_tag and tag not in tags:
        raise HDError(f"timm has no pretrained weights '{tag}'",
                      (did_you_mean(tag, tags) if tags else f"{arch} has no pretrained tags in timm"))
    return tag


# ----------------------------------------------------------------------------------------------------------
# the hub cache


def default_cache_dir() -> Path:
    """The hub cache huggingface_hub uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ~/.cache/huggingface/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_source(spec: str | TeacherSpec) -> tuple[str, tuple[str, ...], str | None] | None:
    """(repo id, weight file names to look for, revision) of a teacher's hub repo; None for local dirs
    and timm tags whose weights only come from a URL."""
    spec = resolve(spec)
    if spec.tag.startswith(LOCAL_DIR):
        return None
    if spec.tag.startswith(HF_HUB):
        repo, _, rev = spec.tag[len(HF_HUB):].partition("@")
        return repo, ("open_clip_model.safetensors", *WEIGHT_FILES, "open_clip_pytorch_model.bin"), rev or None
    if spec.name in REGISTRY and REGISTRY[spec.name] == spec:
        return _REGISTRY_HUB_IDS[spec.name], WEIGHT_FILES, None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.tag)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, rev = cfg.hf_hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILES
    return repo, files, rev or None


def cached_weights(spec: str | TeacherSpec, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The weights file of ``spec`` in the hub cache (the snapshot ``refs/main`` points at), or None."""
    from huggingface_hub import try_to_load_from_cache

    src = hub_source(spec)
    if src is None:
        return None
    repo, files, rev = src
    cache = _cache_dir(cache_dir)
    if _is_hf_hub(spec) and not isinstance(try_to_load_from_cache(repo, "config.json", cache_dir=cache,
                                                                      revision=rev), str):
        return None  # hf-hub: repos need their config.json too
    for filename in files:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=rev)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _is_hf_hub(spec: str | TeacherSpec) -> bool:
    return resolve(spec).tag.startswith(HF_HUB)


def _ways_out(spec: TeacherSpec) -> str:
    copy = (f"run `hd fetch-teachers {spec.name} --cache-dir DIR` on a machine with internet and copy DIR here "
            f"as HF_HUB_CACHE or --cache-dir")
    if spec.tag.startswith(HF_HUB):
        return copy
    return (f"two ways out: {copy}, or import a checkpoint file with "
            f"`hd fetch-teachers {spec.name} --from-file {spec.name}=PATH`")


def _missing(spec: TeacherSpec, cache: Path, why: str = "offline mode") -> HDError:
    return HDError(f"teacher '{spec.name}' ({spec.tag}) is not in the hub cache {cache} ({why})",
                   _ways_out(spec))


def probe_hub(spec: TeacherSpec, cache_dir: str | os.PathLike | None = None) -> None:
    """One HEAD request without retries (timeout ``HF_HUB_ETAG_TIMEOUT``, default 10 s) before a download:
    an unreachable hub becomes an HDError in seconds rather than after huggingface_hub's retries."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    src = hub_source(spec)
    if src is None:
        return
    repo, files, rev = src
    cache = _cache_dir(cache_dir)
    url = hf_hub_url(repo, files[0], revision=rev)
    try:
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RemoteEntryNotFoundError:
        pass  # another weight file name may exist; the download tries them
    except RepositoryNotFoundError as e:
        raise HDError(f"the hub has no repo {repo} for teacher '{spec.name}' ({spec.tag}), or it is gated/private",
                      "log in with `hf auth login` if it is gated, else check the name") from e
    except OfflineModeIsEnabled as e:
        raise _missing(spec, cache) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise HDError(f"the hub answered HTTP {status} for teacher '{spec.name}' ({spec.tag}); "
                      f"nothing downloaded into {cache}", _ways_out(spec)) from e
    except Exception as e:  # network errors (DNS, refused, timeout, proxy) come from the HTTP client
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HDError(f"cannot reach the hub ({constants.ENDPOINT}: {reason}) to download teacher "
                      f"'{spec.name}' ({spec.tag}) into {cache}", _ways_out(spec)) from e


# ----------------------------------------------------------------------------------------------------------
# building models


def _build(spec: TeacherSpec, *, cache_dir, offline: bool | None, **kwargs) -> nn.Module:
    """timm.create_model(pretrained=True) for ``spec``: cached weights from the cache, else a download."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    cache = _cache_dir(cache_dir)
    tag, overlay = spec.tag, None
    if not tag.startswith(LOCAL_DIR):
        weights = cached_weights(spec, cache)
        if weights is not None and tag.startswith(HF_HUB):
            tag = LOCAL_DIR + str(weights.parent)  # the snapshot holds config.json + weights: no network
        elif weights is not None:
            overlay = {"file": str(weights)}  # timm's own file path: same filter fn, no network
        elif _is_offline(offline):
            raise _missing(spec, cache)
        else:
            probe_hub(spec, cache)
    try:
        return _create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay,
                             cache_dir=str(cache) if cache_dir else None, **kwargs)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise _missing(spec, cache, why="not found while loading") from e
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

    try:
        return timm.create_model(tag, **kwargs)
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
         img_size: int | tuple[int, int] | None = None, patch_size: int | None = None, **timm_kwargs) -> nn.Module:
    """A frozen (``requires_grad=False``), eval-mode timm model without classifier (``num_classes=0``).

    Weights come from the hub cache (``cache_dir``, default ``HF_HUB_CACHE``) or a local directory;
    missing ones are downloaded unless ``offline`` (default: ``HF_HUB_OFFLINE``), in which case an HDError
    names the tag, the cache and the ways out. ``img_size``/``patch_size`` rebuild the model at another
    resolution / patch size; timm resamples the position (and patch) embeddings while loading (a /14
    teacher at 196 px gives the 14x14 grid of a /16 student at 224 px). Mean/std stay in
    ``model.pretrained_cfg["mean"/"std"]``.
    """
    spec = resolve(name)
    model = _build(spec, cache_dir=cache_dir, offline=offline, num_classes=0,
                   img_size=img_size, patch_size=patch_size, **timm_kwargs)
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


# ----------------------------------------------------------------------------------------------------------
# importing checkpoint files (--from-file)

# Raw checkpoint keys that are not part of the encoder a teacher runs: classifier / projection heads
# (timm `head`, DeiT `head_dist`, OpenAI CLIP `visual.proj`, OpenCLIP `visual.head`) and, in MAE
# pre-training checkpoints, the decoder and its mask token.
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
    return write_cache_entry(model, repo, _cache_dir(cache_dir))


def write_cache_entry(model: nn.Module, repo_id: str, cache_dir: Path) -> Path:
    """Save ``model`` (timm ``save_for_hf``: model.safetensors + config.json) as the ``main`` snapshot of
    ``repo_id`` in the hub cache layout huggingface_hub reads: blobs/<sha256>, snapshots/<rev>/<file> as
    relative symlinks to the blobs (copies where symlinks fail), refs/main = <rev>. ``rev`` is derived from
    the file hashes (a local revision, not a hub commit). Returns the snapshot's weights path."""
    from huggingface_hub.file_download import repo_folder_name
    from timm.models import save_for_hf

    cache_dir.mkdir(parents=True, exist_ok=True)
    repo_dir = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repo_dir, prefix=".hd-import-") as tmp:
        save_for_hf(model, tmp, safe_serialization=True)
        hashes = {f: sha256(Path(tmp) / f) for f in ("model.safetensors", "config.json")}
        rev = hashlib.sha1("".join(hashes[f] for f in sorted(hashes)).encode()).hexdigest()
        snap = repo_dir / "snapshots" / rev
        snap.mkdir(parents=True, exist_ok=True)
        for f, h in hashes.items():
            blob = repo_dir / "blobs" / h
            os.replace(Path(tmp) / f, blob)
            link = snap / f
            if link.is_symlink() or link.exists():
                link.unlink()
            try:
                link.symlink_to(os.path.relpath(blob, snap))
            except OSError:
                shutil.copyfile(blob, link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(rev)
    return snap / "model.safetensors"


# ----------------------------------------------------------------------------------------------------------
# fetching and the manifest


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(Path(path).resolve(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    cache = _cache_dir(cache_dir)
    from_files = dict(from_files or {})
    wanted = list(dict.fromkeys([*teachers, *from_files]))
    if not wanted:
        raise HDError("no teachers given", f"name some, e.g. `hd fetch-teachers mae,clip`; registry: {', '.join(names())}")
    specs = [resolve(n) for n in wanted]  # all names checked before any download
    offline = _is_offline(offline)
    for spec in specs:  # fail fast, before minutes of downloads, on anything that cannot work
        if spec.name in from_files or spec.tag.startswith(LOCAL_DIR) or cached_weights(spec, cache):
            continue
        if offline:
            raise _missing(spec, cache)
        probe_hub(spec, cache)
    records = []
    for i, spec in enumerate(specs):
        if progress is not None:
            progress(spec.name, i, len(specs))
        if spec.name in from_files:
            import_checkpoint(spec, from_files[spec.name], cache_dir=cache)
            source = f"file:{Path(from_files[spec.name]).expanduser().resolve()}"
        else:
            source = "local-dir" if spec.tag.startswith(LOCAL_DIR) else "hub"
        model = load(spec, cache_dir=cache, offline=offline)
        if spec.tag.startswith(LOCAL_DIR):
            local = Path(spec.tag[len(LOCAL_DIR):])
            weights = next((local / f for f in ("model.safetensors", "pytorch_model.bin") if (local / f).is_file()),
                           None)
        else:
            weights = cached_weights(spec, cache)
        records.append(describe(spec, model, weights, cache, source))
        del model
    write_manifest(cache, records)
    return records


def write_manifest(cache_dir: Path, records: list[dict]) -> Path:
    """Merge ``records`` into ``<cache_dir>/teachers.json`` (keyed by name; other entries kept)."""
    path = cache_dir / MANIFEST
    data = {"teachers": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            data.setdefault("teachers", {})
        except (json.JSONDecodeError, OSError):
            data = {"teachers": {}}
    for r in records:
        data["teachers"][r["name"]] = r
    data["hd_version"] = __version__
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path

