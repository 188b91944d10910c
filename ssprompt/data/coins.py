"""An out-of-domain real-photograph check: crops of scikit-image's ``coins`` photograph (24 coins
on a table; 303 x 384 greyscale), which the embedded SFM never saw (the scene generator uses
grass, gravel, brick, moon, hubble_deep_field, immunohistochemistry and page only).

Labels come from scikit-image's documented region-based segmentation of this very image (the
"Comparing edge-based and region-based segmentation" example): markers where the grey level is
below 30 (table) or above 150 (coin), a watershed on the Sobel elevation map, holes filled, then
connected components, each one coin instance. One thing class (``coin``), one stuff class
(``table``). Train crops come from the left part of the photograph, test crops from the right
part, so no pixel is in both; crop sizes vary (non-square, several sizes in one split).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from .scenes import VOID, Scene

CLASS_NAMES = ["coin", "table"]
IS_THING = [True, False]
SPLIT_COLUMNS = {"train": (0, 200), "test": (184, 384)}  # x ranges: 16 px overlap margin
SPLIT_SIZES = {"train": 8, "test": 12}


@functools.lru_cache(maxsize=1)
def _labelled() -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, coin instance ids int32 with 0 = table) of the whole photograph."""
    import skimage.data
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    grey = skimage.data.coins()
    markers = np.zeros_like(grey, dtype=np.int32)
    markers[grey < 30], markers[grey > 150] = 1, 2
    coins = ndimage.binary_fill_holes(watershed(sobel(grey), markers) == 2)
    ids, _ = ndimage.label(coins)
    return np.repeat(grey[..., None], 3, axis=-1), ids.astype(np.int32)


def _crop_scene(image, ids, y, x, h, w, min_area: int = 30) -> Scene:
    img, inst = image[y:y + h, x:x + w], ids[y:y + h, x:x + w]
    instance = np.zeros((h, w), np.int32)
    semantic = np.full((h, w), VOID, np.int32)
    segments = []
    table = inst == 0
    if table.any():
        segments.append({"id": 1, "category": 1, "isthing": False, "area": int(table.sum())})
        instance[table], semantic[table] = 1, 1
    for cid in np.unique(inst[inst > 0]):
        m = inst == cid
        if m.sum() < min_area:   # a sliver of a coin cut by the crop: void, as COCO leaves crumbs
            continue
        sid = len(segments) + 1
        segments.append({"id": sid, "category": 0, "isthing": True, "area": int(m.sum())})
        instance[m], semantic[m] = sid, 0
    return Scene(np.ascontiguousarray(img), semantic, instance, segments)


class CoinsSplit:
    """``train`` (8 crops) or ``test`` (12 crops) of the coins photograph; crop ``i`` is a pure
    function of (split, i)."""

    class_names, is_thing = CLASS_NAMES, IS_THING

    def __init__(self, split: str):
        image, ids = _labelled()
        x0, x1 = SPLIT_COLUMNS[split]
        rng = np.random.default_rng([5150, 1 if split == "train" else 2])
        self.scenes = []
        for _ in range(SPLIT_SIZES[split]):
            h, w = int(rng.integers(96, 161)), int(rng.integers(96, x1 - x0 + 1))
            y = int(rng.integers(0, image.shape[0] - h + 1))
            x = int(rng.integers(x0, x1 - w + 1))
            self.scenes.append(_crop_scene(image, ids, y, x, h, w))

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> Scene:
        return self.scenes[i]


def export_coins(root) -> None:
    """Write the coins check as a COCO dataset (splits ``train`` and ``test``) under ``root``."""
    from .coco import export_coco

    for split in ("train", "test"):
        export_coco(CoinsSplit(split), root, split)
