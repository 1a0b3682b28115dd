"""Shared test fixtures: tiny timm ViTs (img 32, patch 4, depth 12, dim 48, 3 heads) and a CLI runner.

Every test runs on the CPU with models and data it makes itself; the real loading paths are used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny tensors on 2 shared cores: intra-op threads only add sync overhead (measured ~16x slower ops).
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=3)
REPO = Path(__file__).resolve().parents[1]


def tiny_vit(arch: str = "vit_base_patch16_224", seed: int = 0, **overrides):
    """A randomly initialised tiny timm ViT of ``arch``'s family, no classifier, eval mode."""
    import timm
    import torch

    torch.manual_seed(seed)
    kw = {**TINY, "num_classes": 0, **overrides}
    return timm.create_model(arch, pretrained=False, **kw).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from intra-op threads, and on busy shared cores they slow down ~10x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_tiny_vit():
    return tiny_vit


def run_hd(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: float = 600):
    """Run the real ``hd`` CLI in a subprocess (fresh interpreter: env vars like HF_HUB_OFFLINE act
    as they would for a user). Returns the CompletedProcess with text stdout/stderr."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hdcli", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=timeout,
    )


@pytest.fixture
def hd():
    return run_hd


def one_and_two_ranks(args, tmp_path: Path, port: int) -> tuple[Path, Path]:
    """``hd ARGS`` once with ``-b 16`` in one process and once with ``-b 8`` on 2 ranks (torchrun, gloo): the two
    run dirs (``tmp_path/one``, ``tmp_path/two``), both runs checked to have succeeded."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_hd(*args, "-b", "16", "--out", str(one))
    assert r1.returncode == 0, r1.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "hdcli", *args, "-b", "8", "--out", str(two)]
    r2 = subprocess.run(torchrun, capture_output=True, text=True, cwd=REPO, timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    return one, two
