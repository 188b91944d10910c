"""Spatial prompt encoder: points (x, y) in [0, 1] -> D-dim embeddings (SAM-style Fourier
positional encoding followed by learned layers)."""

from __future__ import annotations

from torch import Tensor, nn

from .common import MLP, FourierPositions


class PointEncoder(nn.Module):
    def __init__(self, embed_dim: int = 128, fourier: FourierPositions | None = None):
        super().__init__()
        self.pe = fourier if fourier is not None else FourierPositions(embed_dim)
        self.mlp = MLP([embed_dim, embed_dim, embed_dim])
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, points: Tensor) -> Tensor:  # (..., N, 2) -> (..., N, D)
        pe = self.pe(points)
        return self.norm(pe + self.mlp(pe))
