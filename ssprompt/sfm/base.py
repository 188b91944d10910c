"""The seam every segmentation foundation model (SFM) backend fills.

A backend knows nothing of prompt learning; a prompt learner knows nothing of a backend's
insides. Everything a learner needs is here: default embeddings for points and class names, and
a decoder that takes *any* N x D spatial and C x D semantic embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class Features:
    """Frozen image features; cacheable per image. ``tensors`` are batched on dim 0."""

    tensors: dict[str, Tensor]

    def index(self, idx) -> "Features":
        return Features({k: v[idx] for k, v in self.tensors.items()})

    def to(self, device=None, dtype=None) -> "Features":
        return Features({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                         for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: list["Features"]) -> "Features":
        return Features({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


@dataclass
class Outputs:
    """Per-query predictions: mask logits (B, N, h, w) and class logits (B, N, C + 1), the last
    column being "no object". ``aux`` holds earlier decoder layers' predictions (deep
    supervision); it is empty for backends without them."""

    mask_logits: Tensor
    class_logits: Tensor
    aux: list[tuple[Tensor, Tensor]] = field(default_factory=list)


MASK2FORMER_OBJECT_THRESHOLD = 0.8  # Mask2Former's panoptic class-confidence cut (COCO)


@runtime_checkable
class PromptableSFM(Protocol):
    """What every backend offers. ``has_text_encoder``: whether ``encode_texts`` embeds class
    names (False: it returns None, and the SFM is prompted spatially, class-agnostically).
    ``object_mask_threshold``: the class confidence panoptic post-processing keeps a query at
    (``MASK2FORMER_OBJECT_THRESHOLD`` unless the backend knows better)."""

    embed_dim: int
    image_size: int
    object_mask_threshold: float

    @property
    def has_text_encoder(self) -> bool: ...

    def encode_image(self, images: Tensor) -> Features: ...
    def encode_points(self, points: Tensor) -> Tensor: ...
    def encode_texts(self, names: list[str]) -> Tensor | None: ...
    def decode(self, feats: Features, spatial: Tensor, semantic: Tensor | None) -> Outputs: ...
    def weights_hash(self) -> str: ...


def sfm_device(sfm) -> torch.device:
    """The device an SFM's weights live on (CPU for a parameterless stand-in)."""
    try:
        return next(sfm.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA; plain fp32 elsewhere."""
    import contextlib

    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter frozen and the module in eval mode: the SFM is never trained by ssprompt."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
