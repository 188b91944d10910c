"""Image encoder: a small CNN with one self-attention layer on stride-8 tokens, plus an FPN-style
pixel decoder giving stride-2 mask features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import FourierPositions


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.GELU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.GELU(),
    )


class ImageEncoder(nn.Module):
    MEAN = (0.45, 0.45, 0.42)
    STD = (0.27, 0.26, 0.27)

    def __init__(self, embed_dim: int = 128, mask_dim: int = 64, widths=(32, 64, 128)):
        super().__init__()
        self.stage1 = _block(3, widths[0], 2)          # stride 2
        self.stage2 = _block(widths[0], widths[1], 2)  # stride 4
        self.stage3 = _block(widths[1], widths[2], 2)  # stride 8
        self.proj = nn.Conv2d(widths[2], embed_dim, 1)
        self.pos = FourierPositions(embed_dim)
        self.attn = nn.TransformerEncoderLayer(embed_dim, 4, 2 * embed_dim, dropout=0.0,
                                               batch_first=True, norm_first=True)
        self.lat2 = nn.Conv2d(widths[1], mask_dim, 1)
        self.lat1 = nn.Conv2d(widths[0], mask_dim, 1)
        self.top = nn.Conv2d(embed_dim, mask_dim, 1)
        self.out = nn.Sequential(nn.Conv2d(mask_dim, mask_dim, 3, 1, 1), nn.GroupNorm(8, mask_dim),
                                 nn.GELU(), nn.Conv2d(mask_dim, mask_dim, 1))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images float (B, 3, H, W) in [0, 1] -> tokens (B, L, D), pos (B, L, D) and
        mask_features (B, mask_dim, H/2, W/2)."""
        x = (images - self.mean) / self.std
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.proj(self.stage3(c2))
        b, d, h, w = c3.shape
        pos = self.pos.grid(h, w).unsqueeze(0).expand(b, -1, -1)
        tokens = self.attn(c3.flatten(2).transpose(1, 2) + pos) - pos
        top = self.top(tokens.transpose(1, 2).reshape(b, d, h, w))
        p2 = self.lat2(c2) + F.interpolate(top, size=c2.shape[-2:], mode="bilinear",
                                           align_corners=False)
        p1 = self.lat1(c1) + F.interpolate(p2, size=c1.shape[-2:], mode="bilinear",
                                           align_corners=False)
        return {"tokens": tokens, "pos": pos, "mask_features": self.out(p1)}
