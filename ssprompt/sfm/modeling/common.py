"""Small building blocks shared by the embedded SFM's components."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return x


class FourierPositions(nn.Module):
    """SAM-style random Fourier features of (x, y) in [0, 1]: a fixed Gaussian projection."""

    def __init__(self, dim: int, scale: float = 6.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2, generator=g))

    def forward(self, xy: Tensor) -> Tensor:  # (..., 2) in [0, 1] -> (..., dim)
        proj = (2 * xy - 1) @ self.gaussian * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, h: int, w: int) -> Tensor:  # (h * w, dim), cell centres, row-major
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        xy = torch.stack([xx, yy], -1).reshape(-1, 2).to(self.gaussian.device)
        return self(xy)
