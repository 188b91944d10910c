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
    return Letterbox(size).unmap(mask_logits, hw)


# Mask logits mapped back to a large image in column bands (``Letterbox.unmap_bands``): a band
# holds about this many values (channels x H x band width), whatever the image's size.
BAND_ELEMENTS = 1 << 23


def _column_bands(x: Tensor, hw: tuple[int, int], max_elements: int, always: bool = False):
    """``F.interpolate(x[None], hw, bilinear)[0]`` of ``x`` (L, h, w), column band by column
    band: (c0, c1, (L, H, c1 - c0)) with about ``max_elements`` values a band. Equal bit for bit
    to the full call on the CPU: torch's 2-D bilinear kernel (the generic one it uses for
    channels-first inputs with H + W > 128 and, on one thread, L != 3) is its 1-D pass along
    the width followed by a 2-D pass with the width unchanged, whose weights along the width are
    exactly 1 and 0, so each output column of that second pass reads its own column only
    (``tests/evaluation/test_postprocess.py`` checks it). The 1-D pass is held at (L, h, W).
    ``always``: interpolate even where the sizes already agree (an identity, as the full call)."""
    n, h, w = x.shape
    H, W = hw
    bw = max(1, min(W, max_elements // max(1, n * H)))
    starts = list(range(0, W, bw))
    if H + min(W, bw) <= 128:   # H + width <= 128: torch takes its separable kernel (other bits)
        starts = [0]
    elif len(starts) > 1 and H + W - starts[-1] <= 128:
        starts.pop()            # the last band joins the one before: H + width stays > 128
    if len(starts) == 1 or (n == 3 and torch.get_num_threads() == 1):
        # one band, or 3 maps on one thread (torch's separable kernel): the full call itself
        if (h, w) != (H, W) or always:
            x = F.interpolate(x[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        yield 0, W, x
        return
    if w != W or always:
        x = F.interpolate(x.reshape(n * h, 1, w), size=W, mode="linear",
                          align_corners=False).reshape(n, h, W)
    for c0, c1 in zip(starts, starts[1:] + [W]):
        band = x[:, :, c0:c1]
        if h != H or always:
            band = F.interpolate(band.contiguous()[None], size=(H, c1 - c0), mode="bilinear",
                                 align_corners=False)[0]
        yield c0, c1, band


def to_batch(images: list[np.ndarray], size: int, device="cpu") -> Tensor:
    """uint8 (H, W, 3) images of any sizes -> letterboxed float (B, 3, size, size) in [0, 1]."""
    arr = np.stack([letterbox_image(im, size) for im in images]).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device)


# ------------------------------------------------------------------- per-backend geometry
# How a backend's own processor maps an image to its input frame and its masks back. The
# embedded SFM letterboxes (above); the transformers backends follow their processors.
class Letterbox:
    """Longest side resized to ``size``, zero (black) padding at bottom / right, before
    normalisation; masks back by ``unletterbox``. The embedded SFM's geometry.

    Every geometry maps masks back in three steps: ``_pre`` (on the mask logits at the model's
    resolution: resizes to the input frame, crops, a sigmoid), one bilinear resize to the image's
    (H, W), ``_post`` (element-wise). ``unmap`` does them at once; ``unmap_bands`` yields the
    same values in column bands, so a large image never holds every query's full-size map."""

    always_resize = False  # resize to (H, W) even where the sizes agree (SamProcessor does)

    def __init__(self, size: int):
        self.size = int(size)

    def labels(self, labels: np.ndarray, fill: int = 0) -> np.ndarray:
        return letterbox_labels(labels, self.size, fill)

    def _pre(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """(1, L, h, w) -> (1, L, h', w'), the maps the last resize brings to ``hw``."""
        size = self.size
        if tuple(hw) == (size, size):
            return x
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        nh, nw = letterbox_shape(*hw, size)
        return x[..., :nh, :nw]

    def _post(self, x: Tensor) -> Tensor:
        return x

    def unmap(self, mask_logits: Tensor, hw: tuple[int, int]) -> Tensor:
        """Mask logits (..., h, w) over the SFM's input -> (..., H, W) over the image."""
        lead = mask_logits.shape[:-2]
        x = self._pre(mask_logits.reshape(1, -1, *mask_logits.shape[-2:]), hw)
        if self.always_resize or tuple(x.shape[-2:]) != tuple(hw):
            x = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False)
        return self._post(x).reshape(*lead, *hw)

    def unmap_bands(self, mask_logits: Tensor, hw: tuple[int, int],
                    max_elements: int = BAND_ELEMENTS):
        """``unmap(mask_logits, hw)[..., c0:c1]`` band after band of columns, as (c0, c1,
        band), each holding about ``max_elements`` values: equal bit for bit to slices of
        ``unmap`` (on the CPU; ``_column_bands``)."""
        lead = mask_logits.shape[:-2]
        x = self._pre(mask_logits.reshape(1, -1, *mask_logits.shape[-2:]), hw)[0]
        for c0, c1, band in _column_bands(x, tuple(hw), max_elements, self.always_resize):
            yield c0, c1, self._post(band).reshape(*lead, hw[0], c1 - c0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size})"


class PadLongest(Letterbox):
    """SAM v1's ``SamProcessor``: the longest side resized to ``size`` (its rounding,
    ``int(x + 0.5)``), padded to ``size`` x ``size`` AFTER normalisation (zeros in the model's
    input); ``post_process_masks``: bilinear to the padded square, crop of the image's part,
    bilinear to (H, W)."""

    def shape(self, h: int, w: int) -> tuple[int, int]:
        scale = self.size * 1.0 / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def labels(self, labels: np.ndarray, fill: int = 0) -> np.ndarray:
        h, w = labels.shape
        if (h, w) == (self.size, self.size):
            return labels
        nh, nw = self.shape(h, w)
        out = np.full((self.size, self.size), fill, labels.dtype)
        out[:nh, :nw] = np.asarray(Image.fromarray(labels.astype(np.int32))
                                   .resize((nw, nh), Image.NEAREST)).astype(labels.dtype)
        return out

    always_resize = True

    def _pre(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        s = self.size
        nh, nw = self.shape(*hw)
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)[..., :nh, :nw]


class Stretch(Letterbox):
    """SAM 2's / SAM 3's image processors: the image resized to ``size`` x ``size`` whatever
    its aspect ratio (no padding); ``post_process_masks`` / ``post_process_*_segmentation``
    resize the masks straight to (H, W). ``probabilities``: SAM 3's post-processing resizes the
    sigmoid probabilities, not the logits; the result is returned as logits of them (clamped to
    [1e-6, 1 - 1e-6]) so that ``logit > 0`` is exactly its ``probability > 0.5``."""

    def __init__(self, size: int, probabilities: bool = False):
        super().__init__(size)
        self.probabilities = probabilities

    def labels(self, labels: np.ndarray, fill: int = 0) -> np.ndarray:
        if labels.shape == (self.size, self.size):
            return labels
        return np.asarray(Image.fromarray(labels.astype(np.int32))
                          .resize((self.size, self.size), Image.NEAREST)).astype(labels.dtype)

    def _pre(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return x.sigmoid() if self.probabilities else x

    def _post(self, x: Tensor) -> Tensor:
        return torch.logit(x, eps=1e-6) if self.probabilities else x


def geometry_of(sfm_or_size) -> Letterbox:
    """A backend's geometry (its ``geometry`` attribute), else the letterbox at its (or the
    given) ``image_size``."""
    if isinstance(sfm_or_size, Letterbox):
        return sfm_or_size
    if isinstance(sfm_or_size, int):
        return Letterbox(sfm_or_size)
    geo = getattr(sfm_or_size, "geometry", None)
    return geo if geo is not None else Letterbox(sfm_or_size.image_size)
