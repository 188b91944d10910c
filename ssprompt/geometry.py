"""Image geometry between a dataset's images (any size, any aspect ratio) and an SFM's square
input: letterbox in, un-letterbox out (as Segment Anything does).

In:  the longest side is resized to the SFM's ``image_size`` and the short side keeps the aspect
     ratio; the rest of the square is zero padding at the bottom / right.
Out: per-query mask logits over the padded square are cropped to the image's part and resized
     to the image's own (H, W), where every metric is computed.

An image that already is ``image_size`` x ``image_size`` passes both ways unchanged, so the
embedded SFM's 96 x 96 scenes are untouched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def letterbox_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(h', w') of an (h, w) image whose longest side is resized to ``size``."""
    scale = size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def letterbox_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): bilinear resize of the longest side, zero pad."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    nh, nw = letterbox_shape(h, w, size)
    out = np.zeros((size, size, 3), np.uint8)
    out[:nh, :nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    return out


def letterbox_labels(labels: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """int (H, W) label or id map -> (size, size): nearest resize, ``fill`` in the padding."""
    h, w = labels.shape
    if (h, w) == (size, size):
        return labels
    nh, nw = letterbox_shape(h, w, size)
    out = np.full((size, size), fill, labels.dtype)
    out[:nh, :nw] = np.asarray(Image.fromarray(labels.astype(np.int32))
                               .resize((nw, nh), Image.NEAREST)).astype(labels.dtype)
    return out


def unletterbox(mask_logits: Tensor, size: int, hw: tuple[int, int]) -> Tensor:
    """Mask logits (..., h, w) over the ``size`` x ``size`` padded input -> (..., H, W) over the
    original image: bilinear upsampling to the input frame, crop of the image's part, bilinear
    resize to (H, W) (SAM's ``postprocess_masks``)."""
    H, W = hw
    lead = mask_logits.shape[:-2]
    x = mask_logits.reshape(1, -1, *mask_logits.shape[-2:])
    if (H, W) == (size, size):
        if tuple(x.shape[-2:]) != (H, W):
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        return x.reshape(*lead, H, W)
    nh, nw = letterbox_shape(H, W, size)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x[..., :nh, :nw]
    if (nh, nw) != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    return x.reshape(*lead, H, W)


def to_batch(images: list[np.ndarray], size: int, device="cpu") -> Tensor:
    """uint8 (H, W, 3) images of any sizes -> letterboxed float (B, 3, size, size) in [0, 1]."""
    arr = np.stack([letterbox_image(im, size) for im in images]).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device)
