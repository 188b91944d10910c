"""Spatial prompts: the frozen prompt encoder's default embeddings of the N-point grid (SpaPrompt
is a ``FusedPrompt`` over them, built by ``PromptSet``) and the vanilla baseline that learns
the points' 2-D coordinates instead."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..sfm.base import PromptableSFM, default_n_prompts, sfm_device
from .layout import grid_layout


def default_spatial(sfm: PromptableSFM, n: int | None = None) -> Tensor:
    """The frozen prompt encoder's embeddings (N, D) of the default N-point layout; ``n=None``:
    the backend's own number of prompts (``base.default_n_prompts``)."""
    n = default_n_prompts(sfm) if n is None else n
    with torch.no_grad():
        return sfm.encode_points(grid_layout(n).to(sfm_device(sfm))).float()


class Vanilla2DPrompt(nn.Module):
    """Learn the N points' (x, y) and pass them through the frozen prompt encoder; a sigmoid
    keeps every point inside the image."""

    def __init__(self, sfm: PromptableSFM, n: int):
        super().__init__()
        self.sfm_encode = sfm.encode_points
        grid = grid_layout(n).to(sfm_device(sfm))
        self.point_logit = nn.Parameter(torch.logit(grid))

    def points(self) -> Tensor:
        return torch.sigmoid(self.point_logit)

    def forward(self) -> Tensor:
        return self.sfm_encode(self.points())
