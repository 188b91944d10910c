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

from ..errors import UserError


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
    supervision); it is empty for backends without them.

    Two optional fields let a backend whose own post-processing is not Mask2Former's say so
    (SAM 3; ``evaluation.postprocess`` reads them, the defaults keep Mask2Former's rules):
    ``semantic_logits`` (B, C, h, w), the model's own per-class semantic map (semantic
    segmentation is its per-pixel argmax); ``own_scores``: each query has one class and its
    probability of that class is the model's own instance score (instances and panoptic segments
    keep a query whose score exceeds the threshold, scored by it alone)."""

    mask_logits: Tensor
    class_logits: Tensor
    aux: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    semantic_logits: Tensor | None = None
    own_scores: bool = False

    def images(self, start: int, end: int) -> Outputs:
        """Images ``start:end`` of the batch, every field kept (``aux`` sliced likewise)."""
        return Outputs(self.mask_logits[start:end], self.class_logits[start:end],
                       [(m[start:end], c[start:end]) for m, c in self.aux],
                       None if self.semantic_logits is None else self.semantic_logits[start:end],
                       self.own_scores)


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


def weights_hash_of(record: dict) -> str | None:
    """The SFM weights hash a saved record (prompts metadata, a cell's result, a predictions
    manifest, metrics.json) names under ``weights_hash``; files written before round 3 called
    it ``sfm``."""
    return record.get("weights_hash", record.get("sfm"))


def sfm_device(sfm) -> torch.device:
    """The device an SFM's weights live on (CPU for a parameterless stand-in)."""
    try:
        return next(sfm.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str = "fp32"):
    """Decoding precision: plain fp32 by default on every device; ``"bf16"``: bfloat16 autocast
    (CUDA or CPU). A backend decodes under its own ``precision`` (``load_sfm(precision=...)``),
    so callers that pass only the device get fp32 here and the backend's choice inside."""
    import contextlib

    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode_images(sfm, images: list, device=None) -> Features:
    """Features of uint8 (H, W, 3) images of any sizes, preprocessed as the backend's own
    processor does (its ``encode_images``); a backend without one (the embedded SFM) gets them
    letterboxed to its square input (``geometry.to_batch``)."""
    own = getattr(sfm, "encode_images", None)
    if own is not None:
        return own(images)
    from ..geometry import to_batch

    return sfm.encode_image(to_batch(images, sfm.image_size,
                                     device if device is not None else sfm_device(sfm)))


def default_n_prompts(sfm) -> int:
    """The backend's own number of spatial prompts (its ``default_n_prompts``; 100 if absent)."""
    return int(getattr(sfm, "default_n_prompts", DEFAULT_N_PROMPTS))


DEFAULT_N_PROMPTS = 100   # the embedded SFM's (and any backend's that names none)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter frozen and the module in eval mode: the SFM is never trained by ssprompt."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
