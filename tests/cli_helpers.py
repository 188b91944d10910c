"""Running the real ``ssprompt`` command line from tests, and checking its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ssprompt(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ssprompt.cli", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr[-1500:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ssprompt: error:"), r.stderr[-1500:]
    for n in needles:
        assert n in lines[0]


def tiny_embedded(seed: int = 0):
    """A small randomly initialised, frozen embedded SFM (no committed weights needed)."""
    import torch

    from ssprompt.sfm.base import freeze
    from ssprompt.sfm.embedded import EmbeddedSFM

    torch.manual_seed(seed)
    return freeze(EmbeddedSFM(embed_dim=32, mask_dim=16, layers=1))


def save_tiny_embedded(path: Path, seed: int = 0) -> Path:
    """``tiny_embedded(seed)`` saved as safetensors, for ``--checkpoint``."""
    tiny_embedded(seed).save(path)
    return path
