"""The one image reader: every image ssprompt reads (COCO splits, ``predict --images``, a path
or an array given to ``Predictor``) becomes uint8 RGB (H, W, 3) here, by one fixed rule.

=================  =========================================================================
what Pillow reads  becomes
=================  =========================================================================
``RGB``, ``L``     as is (grayscale: the one channel copied to R, G and B)
``1``              0 / 255
``RGBA``, ``LA``   the colour channels; alpha is dropped (not composited over a background)
``P``, ``PA``      the palette's RGB colours (transparency dropped)
``I;16*``          16-bit: ``round(value / 65535 * 255)``: the dtype's full range, never clipped
``I`` (int32)      values in 0..65535 (Pillow reads some 16-bit files as ``I``): as 16-bit;
                   otherwise min-max to 0..255
``F`` (float32)    finite values all in [0, 1]: ``round(value * 255)``; otherwise min-max to
                   0..255 (NaN / inf: 0)
other (CMYK, ...)  Pillow's own conversion to RGB
=================  =========================================================================

Rounding is half to even (``numpy.rint``). A fixed rule keeps one pixel value the same
everywhere (across images, splits, train and test), which a per-image percentile stretch, as
microscopy viewers do for display, would not: the SFM would see a different brightness for the
same intensity in every image. A dim 16-bit image stays dim; stretch it yourself before if
that is what the data needs. Multi-frame files (TIFF stacks, GIF) give their first frame.
Arrays (``to_rgb8``) follow the same rule by dtype: uint8 as is, uint16 as ``I;16``, other
integers as ``I``, floats as ``F``, bool as ``1``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError, fail

U16 = 65535.0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:120] or type(e).__name__


def _scaled(a: np.ndarray) -> np.ndarray:
    """One channel of any dtype -> uint8 by the module's rule."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.rint(a / 257.0).astype(np.uint8)        # 255 / 65535 = 1 / 257
    if np.issubdtype(a.dtype, np.integer):
        if a.size and a.min() >= 0 and a.max() <= U16:
            return np.rint(a / 257.0).astype(np.uint8)
        return _minmax(a.astype(np.float64))
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if finite.all() and (a.size == 0 or (a.min() >= 0.0 and a.max() <= 1.0)):
        return np.rint(a * 255.0).astype(np.uint8)
    return _minmax(np.where(finite, a, np.nan))


def _minmax(a: np.ndarray) -> np.ndarray:
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.rint(np.where(finite, out, 0.0)).astype(np.uint8)


def to_rgb8(image, where: object = "image") -> np.ndarray:
    """A uint8 (H, W, 3) array from an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of any
    numeric dtype (module rule; alpha dropped) or from a PIL image."""
    if hasattr(image, "mode") and hasattr(image, "getbands"):      # a PIL image
        return _pil_to_rgb8(image)
    a = np.asarray(image)
    if a.dtype == object or not (a.dtype == bool or np.issubdtype(a.dtype, np.number)):
        raise UserError(f"{where}: not a numeric image array (got {a.dtype} {a.shape})")
    if np.iscomplexobj(a):
        raise UserError(f"{where}: complex pixel values (got {a.dtype})")
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., :1] if a.shape[2] == 1 else a[..., :3]
    elif a.ndim != 2:
        raise UserError(f"{where}: a single image must be (H, W, 3) or (H, W); got {a.dtype} "
                        f"{a.shape}")
    if 0 in a.shape:
        raise UserError(f"{where}: an empty image ({a.shape})")
    out = _scaled(a)      # colour images: one rule for all channels together
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _pil_to_rgb8(im) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in ("L", "1"):
        return to_rgb8(np.asarray(im.convert("L")))
    if mode == "RGBA":
        return np.ascontiguousarray(np.asarray(im)[..., :3])
    if mode == "LA":
        return to_rgb8(np.asarray(im)[..., 0])
    if mode in ("P", "PA"):
        return np.ascontiguousarray(np.asarray(im.convert("RGBA"))[..., :3])
    if mode.startswith("I;16"):
        return to_rgb8(np.asarray(im).astype(np.uint16))
    if mode in ("I", "F"):
        return to_rgb8(np.asarray(im))
    return np.asarray(im.convert("RGB"))


def _open(path: Path):
    from PIL import Image

    if path.is_dir():
        raise fail(path, "is a folder, expected an image file")
    if not path.is_file():
        raise fail(path, "missing image file")
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise fail(path, f"cannot decode image ({_one_line(e)})") from None


def read_image(path: str | Path) -> np.ndarray:
    """The image file at ``path`` as uint8 RGB (H, W, 3) (module rule); a missing, unreadable
    or damaged file is a ``UserError`` naming it."""
    path = Path(path)
    im = _open(path)
    try:
        with im:
            im.seek(0)
            im.load()
            return _pil_to_rgb8(im)
    except UserError:
        raise
    except Exception as e:  # Pillow raises many kinds on a damaged file
        raise fail(path, f"cannot decode image ({_one_line(e)})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header (nothing decoded)."""
    path = Path(path)
    with _open(path) as im:
        return im.height, im.width


def check_image(path: str | Path, hw: tuple[int, int] | None = None,
                what: str = "") -> tuple[int, int]:
    """Decode the whole file (a damaged one fails here, not mid-run) and, with ``hw``, check
    its size against what the annotations say; returns (height, width)."""
    path = Path(path)
    h, w = read_image(path).shape[:2]
    if hw is not None and (int(hw[0]), int(hw[1])) != (h, w):
        raise fail(path, f"is {w} x {h} (width x height), {what or 'its annotations'} say "
                         f"{int(hw[1])} x {int(hw[0])}")
    return h, w


def read_label_png(path: str | Path) -> np.ndarray:
    """A label PNG (panoptic segment ids as RGB) as its raw uint8 RGB values: never scaled."""
    path = Path(path)
    im = _open(path)
    try:
        with im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise fail(path, f"cannot decode image ({_one_line(e)})") from None
