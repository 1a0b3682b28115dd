"""The Hugging Face hub cache: where teacher weights live, whether they are there, a fast reachability probe,
writing cache entries and the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hdcli import __version__
from hdcli.errors import HDError

if TYPE_CHECKING:
    from torch import nn

from hdcli.rundir import write_json
from hdcli.teachers.registry import (
    HF,
    HF_HUB,
    LOCAL_DIR,
    MANIFEST,
    REGISTRY,
    REGISTRY_HUB_IDS,
    WEIGHT_FILES,
    TeacherSpec,
    hf_dir,
    resolve,
)


def set_offline() -> None:
    """Switch huggingface_hub to offline mode (``hd --offline``), also after it was imported (it caches the flag)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True


def default_cache_dir() -> Path:
    """The hub cache huggingface_hub uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ~/.cache/huggingface/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # a Transformers repo's weights (or its shards')
HF_FILES = ("*.json", "*.safetensors")  # what hd fetches of one: configs, the shards' index, the weights


def is_offline(offline: bool | None) -> bool:
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
    if spec.tag.startswith(HF):  # a Transformers model: a directory, or a hub repo with its config
        return None if hf_dir(spec.tag) else (spec.tag[len(HF):], HF_WEIGHTS, None)
    if spec.tag.startswith(HF_HUB):
        repo, _, rev = spec.tag[len(HF_HUB):].partition("@")
        return repo, ("open_clip_model.safetensors", *WEIGHT_FILES, "open_clip_pytorch_model.bin"), rev or None
    if spec.name in REGISTRY and REGISTRY[spec.name] == spec:
        return REGISTRY_HUB_IDS[spec.name], WEIGHT_FILES, None
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
    cache = resolve_cache_dir(cache_dir)
    if _is_hf_hub(spec) and not isinstance(try_to_load_from_cache(repo, "config.json", cache_dir=cache,
                                                                      revision=rev), str):
        return None  # hf-hub: repos need their config.json too
    for filename in files:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=rev)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _is_hf_hub(spec: str | TeacherSpec) -> bool:
    return resolve(spec).tag.startswith((HF_HUB, HF))


def _ways_out(spec: TeacherSpec) -> str:
    copy = (f"run `hd fetch-teachers {spec.name} --cache-dir DIR` on a machine with internet and copy DIR here "
            f"as HF_HUB_CACHE or --cache-dir")
    if spec.tag.startswith(HF_HUB):
        return copy
    if spec.tag.startswith(HF):
        return f"two ways out: {copy}, or give hf:DIR, a directory the model was saved into with save_pretrained"
    return (f"two ways out: {copy}, or import a checkpoint file with "
            f"`hd fetch-teachers {spec.name} --from-file {spec.name}=PATH`")


def missing_weights(spec: TeacherSpec, cache: Path, why: str = "offline mode") -> HDError:
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
    cache = resolve_cache_dir(cache_dir)
    url = hf_hub_url(repo, files[0], revision=rev)
    try:
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RemoteEntryNotFoundError:
        pass  # another weight file name may exist; the download tries them
    except RepositoryNotFoundError as e:
        raise HDError(f"the hub has no repo {repo} for teacher '{spec.name}' ({spec.tag}), or it is gated/private",
                      "log in with `hf auth login` if it is gated, else check the name") from e
    except OfflineModeIsEnabled as e:
        raise missing_weights(spec, cache) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise HDError(f"the hub answered HTTP {status} for teacher '{spec.name}' ({spec.tag}); "
                      f"nothing downloaded into {cache}", _ways_out(spec)) from e
    except Exception as e:  # network errors (DNS, refused, timeout, proxy) come from the HTTP client
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HDError(f"cannot reach the hub ({constants.ENDPOINT}: {reason}) to download teacher "
                      f"'{spec.name}' ({spec.tag}) into {cache}", _ways_out(spec)) from e


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


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(Path(path).resolve(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    write_json(path, data, indent=2)
    return path

