"""Every ```python block of README.md runs as written, copied into an empty folder, in a fresh
process (a user's first try: no runs/, no photo.jpg, nothing prepared)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_readme_has_python_blocks():
    assert _blocks()


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_python_block_runs_in_an_empty_folder(i, tmp_path):
    code = _blocks()[i]
    (tmp_path / "snippet.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README python block {i} failed:\n{r.stderr[-3000:]}"
