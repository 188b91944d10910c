#!/usr/bin/env bash
# Install everything ssprompt needs on a fresh Debian/Ubuntu machine with Python >= 3.10.
# - Fashion-MNIST from Debian's package (the scenes' things), if it is not there yet;
# - PyTorch (CPU build 2.13.0 here; any CUDA build >= 2.3 works where you have one);
# - ssprompt itself, editable, with the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SSPROMPT_FASHION_MNIST:-}" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${SSPROMPT_TORCH:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
