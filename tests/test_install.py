"""A non-editable install works: the wheel carries the embedded SFM's weights and the study
configs as package data, and ``ssprompt eval`` runs from a folder that is not the repository.

Builds the wheel from a copy of the package (the working tree is never written to), installs it
into a fresh venv that borrows the already installed dependencies (``--system-site-packages``,
or, when the tests run inside a venv, a .pth file naming its site-packages; so nothing is
downloaded), and runs the installed console script elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.install


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=240, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-1500:], r.stderr[-2500:])
    return r


def _venv_borrowing_our_packages(venv: Path) -> Path:
    """A fresh venv that sees the packages this interpreter sees. From the system Python:
    ``--system-site-packages``. From inside a venv (``scripts/setup.sh``'s .venv) that flag
    would borrow the *base* interpreter's packages, not this venv's: a .pth file lists this
    interpreter's site-packages instead (after the new venv's own, so the wheel wins)."""
    import site
    import sysconfig

    if sys.prefix == sys.base_prefix:
        _run([sys.executable, "-m", "venv", "--system-site-packages", venv])
        return venv / "bin" / "python"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    ours = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))
            and Path(p).is_dir()]
    ours += [p for p in site.getsitepackages() if p not in ours and Path(p).is_dir()]
    inner = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                      ).stdout.strip())
    assert inner != Path(sysconfig.get_paths()["purelib"])
    (inner / "_outer_site_packages.pth").write_text("".join(p + "\n" for p in ours))
    return py


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "ssprompt", src / "ssprompt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", wheels, src])
    wheel = next(wheels.glob("ssprompt-*.whl"))

    venv = tmp_path / "venv"
    py = _venv_borrowing_our_packages(venv)
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    # the installed copy is what runs, not the repository's (which may be installed editable)
    where = _run([py, "-c", "import ssprompt, ssprompt.sfm.embedded as e, ssprompt.study as s;"
                  "print(ssprompt.__file__); print(e.DEFAULT_WEIGHTS); print(s.CONFIG_DIR)"],
                 cwd=elsewhere, env=env).stdout.split()
    for p in where:
        assert str(venv) in p and Path(p).exists(), where
    r = _run([venv / "bin" / "ssprompt", "eval", "--task", "novel", "--n-test", "5",
              "--device", "cpu", "--out", "ev"], cwd=elsewhere, env=env)
    m = json.loads((elsewhere / "ev" / "metrics.json").read_text())
    assert m["n_test"] == 5 and m["weights_hash"] == json.loads(
        (ROOT / "ssprompt" / "weights" / "pretrain_info.json").read_text())["weights_sha256_16"]
    assert all(isinstance(m[k], float) for k in ("mIoU", "AP50", "PQ")), r.stdout
    # the packaged study configs are found too
    _run([venv / "bin" / "python", "-c", "from ssprompt.study import CONFIG_DIR, load_config;"
          "assert load_config(CONFIG_DIR / 'quick.yaml').cells()"], cwd=elsewhere, env=env)
