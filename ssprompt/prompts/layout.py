"""The default layout of N spatial prompts: rows of points, evenly spread, for any N >= 1.

``rows = round(sqrt(N))``; the N points are shared out over the rows as evenly as possible
(row r gets floor or ceil of N / rows points) and each point sits at the centre of its cell, so
N = 25 and N = 100 are the familiar 5 x 5 and 10 x 10 grids, and every layout lies strictly
inside the unit square with N distinct points. Coordinates are (x, y) in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UserError


def grid_layout(n: int) -> Tensor:
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"n_prompts {n}: the number of spatial prompts must be a positive integer",
                        field="n_prompts")
    rows = max(1, round(math.sqrt(n)))
    counts = [n // rows + (1 if r < n % rows else 0) for r in range(rows)]
    pts = []
    for r, c in enumerate(counts):
        y = (r + 0.5) / rows
        pts += [((i + 0.5) / c, y) for i in range(c)]
    return torch.tensor(pts, dtype=torch.float32)


def jittered_layout(n: int, generator: torch.Generator | None = None) -> Tensor:
    """The grid layout with each point moved uniformly within its cell (pretraining only)."""
    pts = grid_layout(n)
    rows = max(1, round(math.sqrt(n)))
    counts = [n // rows + (1 if r < n % rows else 0) for r in range(rows)]
    cell_w = torch.cat([torch.full((c,), 1.0 / c) for c in counts])
    jitter = torch.rand(n, 2, generator=generator) - 0.5
    return pts + jitter * torch.stack([cell_w, torch.full((n,), 1.0 / rows)], 1)
