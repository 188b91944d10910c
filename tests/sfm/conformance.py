"""Conformance of a transformers backend with its own pipeline, shared by test_sam, test_sam2 and
test_sam3: on a tall, a wide and a square image, ssprompt's per-query masks at the image's size
(its preprocessing -> decode with the default prompts -> the backend's geometry) against
``processor -> model -> processor.post_process_*`` (the reference each test supplies).

Pass: per-query mask IoU >= 0.99 (median and min reported) and scores within 1e-4.

SAM 2's and SAM 3's image processors need torchvision (transformers' torchvision backend); where
it is not installed, ``torchvision_or_skip`` skips those references. A torchvision wheel whose
compiled ops do not match the installed torch still serves here (only its resize is used): its
fake-kernel registrations for those ops are skipped.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from ssprompt.geometry import geometry_of
from ssprompt.prompts.spatial import default_spatial
from ssprompt.sfm.base import encode_images

SHAPES = {"tall": (224, 160), "wide": (160, 224), "square": (192, 192)}
MIN_IOU, SCORE_ATOL = 0.99, 1e-4
REPORT: dict = {}   # backend -> {shape: numbers}, printed by the tests (pytest -s)


def images() -> dict[str, np.ndarray]:
    """Smooth random uint8 images (blobs, so that masks are not noise) of the three shapes."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, (h, w) in SHAPES.items():
        low = torch.rand(1, 3, h // 16, w // 16, generator=g)
        x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic",
                                            align_corners=False).clamp(0, 1)
        out[name] = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return out


def torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pytest.skip("torchvision is not installed: transformers' SAM 2 / SAM 3 image "
                    "processors need it")
    except RuntimeError:   # compiled ops that do not match this torch: skip their fake kernels
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("_meta")
        import torchvision  # noqa: F401


def ours(sfm, image: np.ndarray, semantic=None, n: int | None = None):
    """ssprompt's per-query boolean masks (N, H, W) and scores (N,) of one image, zero-shot with
    the default prompts: its preprocessing, its decoder, its geometry back to the image."""
    with torch.no_grad():
        feats = encode_images(sfm, [image])
        spatial = default_spatial(sfm, n)
        out = sfm.decode(feats, spatial, semantic)
        logits = geometry_of(sfm).unmap(out.mask_logits[0].float(), image.shape[:2])
        scores = out.class_logits[0].float().softmax(-1)[:, 0]
    return logits > 0, scores, spatial


def compare(backend: str, shape: str, masks, scores, ref_masks, ref_scores) -> dict:
    """Per-query IoU of two (N, H, W) boolean mask stacks and the score gap; asserts the bar."""
    masks, ref_masks = masks.bool(), ref_masks.bool()
    assert masks.shape == ref_masks.shape, (masks.shape, ref_masks.shape)
    inter = (masks & ref_masks).flatten(1).sum(1).double()
    union = (masks | ref_masks).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    gap = float((scores.double() - ref_scores.double()).abs().max())
    row = {"n": int(masks.shape[0]), "median_iou": float(iou.median()),
           "min_iou": float(iou.min()), "max_score_diff": gap,
           "nonempty": int((ref_masks.flatten(1).any(1)).sum())}
    REPORT.setdefault(backend, {})[shape] = row
    print(f"\n{backend} {shape}: {row}")
    assert row["nonempty"] > 0, "every reference mask is empty: the comparison says nothing"
    assert row["min_iou"] >= MIN_IOU and row["median_iou"] >= MIN_IOU, row
    assert gap <= SCORE_ATOL, row
    return row
