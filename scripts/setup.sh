#!/usr/bin/env bash
# Install everything ssprompt needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
# - Fashion-MNIST from Debian's package (the scenes' things), if it is not there yet;
# - a virtual environment: the active one ($VIRTUAL_ENV), else .venv in the repository, made
#   here (Debian 12 / Ubuntu >= 23.04 refuse pip installs into the system Python, PEP 668);
#   .venv/bin/ssprompt and .venv/bin/python then run it, whichever of the two it is;
# - PyTorch into it (CPU build 2.13.0 here; any CUDA build >= 2.3 works where you have one);
# - ssprompt itself, editable, with the test extras.
# Environment: PYTHON (the interpreter the venv is made from, default python3), SSPROMPT_TORCH.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SSPROMPT_FASHION_MNIST:-}" ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if [ -n "${VIRTUAL_ENV:-}" ]; then
  VENV="$VIRTUAL_ENV"
  if [ ! -e .venv ]; then
    ln -s "$VENV" .venv                 # so .venv/bin/ssprompt names the active venv too
  elif [ "$(realpath .venv)" != "$(realpath "$VENV")" ]; then
    echo "setup.sh: installing into the active venv $VENV; .venv is another one" >&2
  fi
else
  VENV=.venv
  if [ ! -x "$VENV/bin/python" ]; then
    BASE="${PYTHON:-python3}"
    if ! "$BASE" -c "import ensurepip, venv" 2>/dev/null; then   # Debian splits venv out
      $SUDO apt-get update -qq
      $SUDO apt-get install -y -qq python3-venv
    fi
    "$BASE" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${SSPROMPT_TORCH:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
echo "setup.sh: ssprompt installed in $VENV; run it as .venv/bin/ssprompt (or: source .venv/bin/activate)"
