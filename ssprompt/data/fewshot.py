"""Reproducible k-shot draws of training images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import UserError


def _check(num_images: int, k: int) -> None:
    if num_images <= 0:
        raise UserError(f"shots {k}: the dataset has no images to draw from", field="shots")
    if not 0 < k <= num_images:
        raise UserError(f"shots {k}: must be in 1..{num_images} (the images available)",
                        field="shots")


def kshot_indices(num_images: int, k: int, seed: int) -> list[int]:
    """``k`` distinct image indices in ``range(num_images)``, sorted; a pure function of
    (num_images, k, seed)."""
    _check(num_images, k)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_images, size=k, replace=False).tolist())


def kshot_indices_covering(categories: Sequence[Iterable[int]], k: int, seed: int) -> list[int]:
    """Like :func:`kshot_indices`, but prefers images that add a not-yet-covered category, so a
    small draw covers as much of the vocabulary as it can. ``categories[i]`` lists the
    categories present in image ``i``."""
    _check(len(categories), k)
    order = np.random.default_rng(seed).permutation(len(categories)).tolist()
    chosen: list[int] = []
    covered: set[int] = set()
    for i in order:                       # first pass: images that add something new
        if len(chosen) == k:
            break
        new = set(categories[i]) - covered
        if new:
            chosen.append(i)
            covered |= new
    taken = set(chosen)
    for i in order:                       # then fill up in the same random order
        if len(chosen) == k:
            break
        if i not in taken:
            chosen.append(i)
    return sorted(chosen)
