"""The one image reader (``ssprompt.data.images``): every kind of image file a user has, read by
one documented rule, on real files written here; a 16-bit COCO split scores exactly as the
same images converted to 8-bit by hand."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssprompt.data.images import check_image, read_image, to_rgb8
from ssprompt.errors import UserError

H, W = 24, 40


def _gradient16() -> np.ndarray:
    """A 16-bit gradient over the full range, odd values included (the low byte matters)."""
    return np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def _by_rule16(a: np.ndarray) -> np.ndarray:
    """The documented rule by hand: round-half-even(value / 65535 * 255)."""
    return np.round(a.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def test_16bit_grayscale_png_keeps_its_range(tmp_path):
    a = _gradient16()
    Image.fromarray(a).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"       # a real 16-bit PNG
    got = read_image(tmp_path / "g.png")
    assert got.dtype == np.uint8 and got.shape == (H, W, 3)
    assert np.array_equal(got, _rgb(_by_rule16(a)))
    assert got.min() == 0 and got.max() == 255                  # not clipped to white
    assert len(np.unique(got)) > 200                            # the range is kept


def test_16bit_tiff_and_int32_read_as_16bit(tmp_path):
    a = _gradient16()
    Image.fromarray(a).save(tmp_path / "g.tif")
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    for name in ("g.tif", "i.tif"):
        assert np.array_equal(read_image(tmp_path / name), _rgb(_by_rule16(a))), name


def test_float_tiff(tmp_path):
    a = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    Image.fromarray(a).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert np.array_equal(read_image(tmp_path / "f.tif"),
                          _rgb(np.rint(a.astype(np.float64) * 255).astype(np.uint8)))
    b = a * 1000 - 200                                          # outside [0, 1]: min-max
    Image.fromarray(b).save(tmp_path / "g.tif")
    got = read_image(tmp_path / "g.tif")[..., 0]
    assert got.min() == 0 and got.max() == 255
    assert np.all(np.diff(got.astype(int).ravel()) >= 0)        # order kept


def test_8bit_gray_rgb_rgba_palette_and_bilevel(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=100)
    Image.fromarray(gray).save(tmp_path / "l.png")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (H, W, 1), dtype=np.uint8)], 2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.stack([gray, gray // 2], 2), "LA").save(tmp_path / "la.png")
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    Image.fromarray(gray > 127).save(tmp_path / "b.png")
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    assert read_image(tmp_path / "rgb.jpg").shape == (H, W, 3)
    assert np.array_equal(read_image(tmp_path / "l.png"), _rgb(gray))
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)          # alpha dropped
    assert np.array_equal(read_image(tmp_path / "la.png"), _rgb(gray))
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    assert np.array_equal(read_image(tmp_path / "b.png"), _rgb((gray > 127) * np.uint8(255)))


def test_arrays_follow_the_same_rule():
    a = _gradient16()
    assert np.array_equal(to_rgb8(a), _rgb(_by_rule16(a)))
    assert np.array_equal(to_rgb8(a[..., None]), _rgb(_by_rule16(a)))
    g = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    assert np.array_equal(to_rgb8(g), _rgb(g))
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 1] = 7
    assert np.array_equal(to_rgb8(rgba), rgba[..., :3])
    with pytest.raises(UserError, match=r"must be \(H, W, 3\) or \(H, W\)"):
        to_rgb8(np.zeros((2, H, W, 3), np.uint8))


def test_damaged_missing_and_folder(tmp_path):
    Image.fromarray(_gradient16()).save(tmp_path / "g.png")
    data = (tmp_path / "g.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.png: cannot decode image"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(UserError, match="nope.png: missing image file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(UserError, match="is a folder, expected an image file"):
        read_image(tmp_path)
    with pytest.raises(UserError, match="g.png: is 40 x 24 .* say 41 x 24"):
        check_image(tmp_path / "g.png", (24, 41))


def _gray16_split(src: Path, dst16: Path, dst8: Path) -> None:
    """Two copies of a COCO export: its images as 16-bit grayscale PNGs (the RGB's luminance
    times 257 plus a little noise in the low byte), and the same converted by hand to 8-bit."""
    shutil.copytree(src, dst16)
    shutil.copytree(src, dst8)
    rng = np.random.default_rng(0)
    for p in sorted((src / "test").glob("*.png")):
        rgb = np.asarray(Image.open(p).convert("RGB")).astype(np.float64)
        lum = rgb @ [0.299, 0.587, 0.114]
        a16 = np.clip(lum * 257 + rng.integers(-120, 121, lum.shape), 0, 65535).astype(np.uint16)
        Image.fromarray(a16).save(dst16 / "test" / p.name)
        Image.fromarray(_by_rule16(a16)).save(dst8 / "test" / p.name)   # 8-bit L, by hand
        assert Image.open(dst16 / "test" / p.name).mode == "I;16"


def test_eval_of_a_16bit_split_equals_eval_of_it_converted_by_hand(tmp_path, tiny_sfm):
    from ssprompt.api import evaluate
    from ssprompt.data import open_dataset
    from ssprompt.data.coco import export_coco
    from ssprompt.data.scenes import SceneSplit

    src = export_coco(SceneSplit("shift", "test", n=3), tmp_path / "rgb", "test")
    _gray16_split(src, tmp_path / "g16", tmp_path / "g8")
    m16, m8 = (evaluate(tiny_sfm, None, open_dataset(f"coco:{tmp_path / d}", "test"),
                        n_prompts=10)
               for d in ("g16", "g8"))
    assert m16 == m8
    assert m16["mIoU"] is not None
    # and the 16-bit images are not the clipped (all-white) reading of the old reader
    d16 = open_dataset(f"coco:{tmp_path / 'g16'}", "test")
    assert d16[0].image.mean() < 250 and d16[0].image.std() > 5
