"""The `hd` CLI root and `hd fetch-teachers`, run as a user would (subprocess, real env vars, no network).

The no-network tests point HF_ENDPOINT at a closed local port, so they behave the same on machines that
do have internet (this one has none: `hd fetch-teachers mae` fails the same way against the real hub).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from hdcli import __version__, teachers

DEAD_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # discard port: connection refused at once


def one_line_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_version(hd):
    r = hd("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"hd {__version__}")


def test_help_lists_fetch_teachers(hd):
    r = hd("--help")
    assert r.returncode == 0 and "fetch-teachers" in r.stdout


def test_list_shows_registry_names_and_tags(hd, tmp_path):
    r = hd("fetch-teachers", "--list", "--cache-dir", str(tmp_path))
    assert r.returncode == 0
    for name, spec in teachers.REGISTRY.items():
        assert any(name in line and spec.tag in line for line in r.stdout.splitlines()), (name, r.stdout)


def test_unknown_teacher_suggests_closest_registry_names(hd):
    line = one_line_error(hd("fetch-teachers", "clip-ll"))
    assert "unknown teacher 'clip-ll'" in line and "did you mean: clip-l, clip" in line


def test_from_file_needs_name_equals_path(hd):
    line = one_line_error(hd("fetch-teachers", "--from-file", "mae"))
    assert "NAME=PATH" in line


def test_offline_missing_teacher_is_one_line_naming_tag_cache_and_ways_out(hd, tmp_path):
    line = one_line_error(hd("--offline", "fetch-teachers", "mae", "--cache-dir", str(tmp_path)))
    assert all(s in line for s in ("vit_base_patch16_224.mae", str(tmp_path), "--from-file", "copy"))


def test_hf_hub_offline_env_is_honoured(hd, tmp_path):
    line = one_line_error(hd("fetch-teachers", "clip", "--cache-dir", str(tmp_path),
                             env={"HF_HUB_OFFLINE": "1", **DEAD_HUB}))
    assert "offline" in line and "vit_base_patch16_clip_quickgelu_224.openai" in line


def test_no_network_fails_fast_with_one_line(hd, tmp_path):
    start = time.monotonic()
    r = hd("fetch-teachers", "mae", "--cache-dir", str(tmp_path), env=DEAD_HUB)
    took = time.monotonic() - start
    line = one_line_error(r)
    assert took < 30
    assert all(s in line for s in ("cannot reach the hub", "vit_base_patch16_224.mae", str(tmp_path),
                                   "--from-file", "copy"))


def test_debug_shows_the_traceback(hd, tmp_path):
    r = hd("--debug", "--offline", "fetch-teachers", "mae", "--cache-dir", str(tmp_path))
    assert r.returncode != 0 and "Traceback" in r.stderr and "HDError" in r.stderr


@pytest.mark.slow
def test_from_file_import_under_hf_hub_offline_round_trip(hd, tmp_path):
    """An MAE-format checkpoint of timm's tiny `test_vit`, imported and verified by the CLI with
    HF_HUB_OFFLINE=1, then loaded from the cache with the same weights."""
    import timm

    tag = "test_vit.r160_in1k"
    saved = timm.create_model(tag, pretrained=False, num_classes=0)
    torch.save({"model": saved.state_dict()}, tmp_path / "ckpt.pth")
    cache = tmp_path / "hub"
    r = hd("fetch-teachers", "--from-file", f"{tag}={tmp_path / 'ckpt.pth'}", "--cache-dir", str(cache),
           env={"HF_HUB_OFFLINE": "1", **DEAD_HUB})
    assert r.returncode == 0, r.stderr
    record = json.loads((cache / "teachers.json").read_text())["teachers"][tag]
    assert record["sha256"][:12] in r.stdout and record["source"].startswith("file:")
    loaded = teachers.load(tag, cache_dir=cache, offline=True)
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in loaded.state_dict().items())
