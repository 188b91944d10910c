"""COCO-format datasets: export any scene dataset in the real COCO layout, and read one back.

Layout (what a user with real COCO points at)::

    ROOT/SPLIT/000000.png                         images
    ROOT/annotations/instances_SPLIT.json         things: polygons or RLE (iscrowd kept)
    ROOT/annotations/panoptic_SPLIT.json          things and stuff (segments_info)
    ROOT/annotations/panoptic_SPLIT/000000.png    segment ids in RGB: id = R + 256 G + 256^2 B

``CocoDataset`` prefers the panoptic annotations when present (they label stuff too); with
instances only, pixels no instance covers are void.

With instances, a scene's ``semantic`` / ``instance`` maps are a flattened, panoptic view of the
annotations (overlaps painted larger objects first, so an instance other instances cover
entirely is not in the maps): mIoU and PQ score against that view. AP50 scores against the
annotations themselves, kept in ``Scene.annotations`` (every annotation's own mask, crowd flags
kept), so it equals pycocotools' ``COCOeval(iouType="segm")`` on the user's JSON. With
panoptic annotations (non-overlapping by definition) all three metrics use the PNG's segments.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from ..errors import UserError, fail
from ..io import write_bytes
from ..lru import LRUCache
from .fewshot import kshot_indices
from .images import check_image, read_image, read_label_png
from .scenes import VOID, Scene


# ---------------------------------------------------------------------------------- helpers
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids (H, W) -> uint8 RGB (H, W, 3), as panopticapi's ``id2rgb``."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2 % 256], -1).astype(np.uint8)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> segment ids int32 (H, W), as panopticapi's ``rgb2id``."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


def _encode(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


# ----------------------------------------------------------------------------------- export
def export_coco(dataset: Any, root: Path | str, split_name: str) -> Path:
    """Write ``dataset`` (len / getitem -> Scene / class_names / is_thing) under ``root`` in the
    COCO layout: images, ``instances_SPLIT.json`` (things, RLE) and panoptic JSON + PNGs.
    Category ids are vocabulary index + 1. Returns ``root``."""
    root = Path(root)
    ann_dir = root / "annotations"
    png_dir = ann_dir / f"panoptic_{split_name}"
    img_dir = root / split_name
    categories = [{"id": i + 1, "name": name, "supercategory": "thing" if th else "stuff",
                   "isthing": int(th)}
                  for i, (name, th) in enumerate(zip(dataset.class_names, dataset.is_thing))]
    images: list[dict] = []
    instances: list[dict] = []
    panoptic: list[dict] = []
    for i in range(len(dataset)):
        scene: Scene = dataset[i]
        h, w = scene.semantic.shape
        name = f"{i:06d}.png"
        write_bytes(img_dir / name, _png_bytes(scene.image))
        write_bytes(png_dir / name, _png_bytes(id2rgb(scene.instance)))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        segments_info = []
        for s in scene.segments:
            rle = _encode(scene.instance == s["id"])
            bbox = [float(v) for v in mask_util.toBbox(rle)]
            area = int(mask_util.area(rle))
            crowd = int(s.get("iscrowd", 0))
            segments_info.append({"id": int(s["id"]), "category_id": int(s["category"]) + 1,
                                  "area": area, "bbox": [int(v) for v in bbox],
                                  "iscrowd": crowd})
            if s["isthing"]:
                instances.append({"id": len(instances) + 1, "image_id": i + 1,
                                  "category_id": int(s["category"]) + 1, "segmentation": rle,
                                  "area": area, "bbox": bbox, "iscrowd": crowd})
        panoptic.append({"image_id": i + 1, "file_name": name, "segments_info": segments_info})
    thing_cats = [c for c in categories if c["isthing"]]
    for path, doc in ((ann_dir / f"instances_{split_name}.json",
                       {"images": images, "annotations": instances, "categories": thing_cats}),
                      (ann_dir / f"panoptic_{split_name}.json",
                       {"images": images, "annotations": panoptic, "categories": categories})):
        write_bytes(path, json.dumps(doc).encode())
    return root


# ------------------------------------------------------------------------------------ read
def _load_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise fail(path, "missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(path, f"not valid JSON ({_one_line(e)})") from None
    except OSError as e:
        raise fail(path, f"cannot read ({_one_line(e)})") from None
    if not isinstance(doc, dict):
        raise fail(path, "not a COCO annotation file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise fail(path, f"not a COCO annotation file (no {key!r} list)")
    return doc


def _load_image(path: Path) -> np.ndarray:
    """An image as uint8 RGB by the one reader's rule (``data.images``: 16-bit, float,
    palette, alpha)."""
    return read_image(path)


def _finish(image: np.ndarray, instance: np.ndarray, segments: list[dict],
            annotations: list[dict] | None = None) -> Scene:
    """At the image's own size: recompute areas, drop segments no pixel shows, renumber ids
    1..S and derive the semantic map (int32, VOID where no segment is) from the instance map.
    ``annotations`` (``Scene.annotations``) are kept as given."""
    counts = np.bincount(instance.ravel(), minlength=max([s["id"] for s in segments], default=0) + 1)
    remap = np.zeros(len(counts), np.int32)
    lut = np.full(len(counts), VOID, np.int32)
    kept: list[dict] = []
    for s in segments:
        area = int(counts[s["id"]]) if s["id"] < len(counts) else 0
        if area == 0:
            continue
        new = dict(s, id=len(kept) + 1, area=area)
        remap[s["id"]] = new["id"]
        lut[s["id"]] = s["category"]
        kept.append(new)
    return Scene(np.ascontiguousarray(image, dtype=np.uint8), lut[instance],
                 remap[instance].astype(np.int32), kept, annotations)


def _check_polygons(where: Path, ann: dict) -> None:
    """A polygon needs at least 3 points (6 numbers, an even count): pycocotools' own error for
    a shorter one names neither the file nor the annotation."""
    seg = ann.get("segmentation")
    if not isinstance(seg, list):
        return
    for poly in seg:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            n = len(poly) / 2 if isinstance(poly, list) else "no"
            raise fail(where, f"annotation id {ann.get('id')}: a polygon has {n} points; "
                              "a polygon needs at least 3 (x, y) points")


class CocoDataset:
    """A COCO-format split (see module docstring) with the ``SceneSplit`` interface:
    ``len``, ``[i] -> Scene``, ``class_names``, ``is_thing``, plus ``source``.

    Images and labels keep their own size (one split may mix sizes); the SFM's input is
    letterboxed from them and predictions are scored back at this size. ``split`` is any name
    (``train2017``, ``val2017``, ...); ``n`` keeps the first n images; ``shots=k`` then keeps a
    reproducible k-shot draw (``seed``). Decoded images are kept in a bounded LRU cache."""

    def __init__(self, root: Path | str, split: str, shots: int | None = None, seed: int = 0,
                 n: int | None = None, cache_bytes: int = 512 * 1024 ** 2):
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise fail(self.root, "missing COCO dataset folder")
        ann_dir = self.root / "annotations"
        pan_json = ann_dir / f"panoptic_{split}.json"
        ins_json = ann_dir / f"instances_{split}.json"
        if pan_json.is_file():
            self.kind, self.annotation_file = "panoptic", pan_json
        elif ins_json.is_file():
            self.kind, self.annotation_file = "instances", ins_json
        else:
            raise fail(ann_dir, f"missing {pan_json.name} and {ins_json.name} for split {split!r}")
        self.source = str(self.root)
        self.image_dir = self.root / split
        self.png_dir = ann_dir / f"panoptic_{split}"
        doc = _load_json(self.annotation_file)
        where = self.annotation_file
        try:
            cats = doc["categories"]
            self.class_names: list[str] = [str(c["name"]) for c in cats]
            self.is_thing: list[bool] = [bool(c.get("isthing", 1)) for c in cats]
            self.cat_index: dict[int, int] = {int(c["id"]): i for i, c in enumerate(cats)}
            self.images: list[dict] = list(doc["images"])
            image_ids = {int(im["id"]) for im in self.images}
            self.anns: dict[int, list[dict]] = {i: [] for i in image_ids}
            for a in doc["annotations"]:
                if int(a["image_id"]) not in image_ids:
                    raise fail(where, f"annotation for image_id {a['image_id']} which is not "
                                      "in 'images'")
                self.anns[int(a["image_id"])].append(a)
                segs = a.get("segments_info", []) if self.kind == "panoptic" else [a]
                what = "segment" if self.kind == "panoptic" else "annotation"
                for s in segs:
                    if int(s["category_id"]) not in self.cat_index:
                        raise fail(where, f"{what} id {s.get('id')} of image "
                                          f"{a['image_id']} has category_id "
                                          f"{s['category_id']}, which is not declared in "
                                          "'categories'")
        except (KeyError, TypeError, ValueError) as e:
            raise fail(where, f"malformed COCO annotations ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
        if not self.class_names:
            raise fail(where, "declares no categories")
        seen: dict[str, int] = {}
        for c in cats:
            name = str(c["name"])
            if name in seen:
                raise fail(where, f"category name {name!r} is used by ids {seen[name]} and "
                                  f"{c['id']}: names must be unique (each is a class prompt)")
            seen[name] = int(c["id"])
        if not self.images:
            raise fail(where, f"split {split!r} has no images")
        if self.kind == "instances":
            for a in doc["annotations"]:
                _check_polygons(where, a)
        indices = list(range(len(self.images)))
        if n is not None:
            if n <= 0:
                raise UserError(f"--n-test {n}: must be positive")
            indices = indices[:n]
        if shots is not None:
            indices = [indices[i] for i in kshot_indices(len(indices), shots, seed)]
        self.indices = indices
        self.pool_size = len(self.images)  # images the k shots are drawn from
        self._cache = LRUCache(cache_bytes)
        self._checked: set[bool] = set()

    def image_id(self, i: int) -> int:
        """The COCO image id of item ``i`` (``self[i]``)."""
        return int(self.images[self.indices[i]]["id"])

    @property
    def category_ids(self) -> list[int]:
        """The COCO category id of each class index (``class_names[c]`` has id
        ``category_ids[c]``)."""
        return sorted(self.cat_index, key=self.cat_index.get)

    def check(self, labelled: bool = True) -> None:
        """Every check a run needs before its first step, on the images this split uses: each
        decodes whole, its size agrees with the JSON's ``height`` / ``width`` (and its panoptic
        PNG's), and, when ``labelled`` (train, and a test split that is scored), they have at
        least one annotation between them. Raises a ``UserError`` naming the file."""
        if labelled in self._checked or True in self._checked:
            return
        n_labels = 0
        for j in self.indices:
            info = self.images[j]
            name = info.get("file_name")
            if not isinstance(name, str) or not name:
                raise fail(self.annotation_file, f"image id {info.get('id')} has no file_name")
            hw = (info["height"], info["width"]) if "height" in info and "width" in info \
                else None
            try:
                hw = None if hw is None else (int(hw[0]), int(hw[1]))
            except (TypeError, ValueError):
                raise fail(self.annotation_file, f"image id {info.get('id')}: height / width "
                                                 f"{hw} are not integers") from None
            size = check_image(self.image_dir / name, hw, f"{self.annotation_file.name}")
            anns = self.anns[int(info["id"])]
            if self.kind == "panoptic":
                for a in anns[:1]:
                    png = self.png_dir / str(a.get("file_name"))
                    ids = read_label_png(png)
                    if ids.shape[:2] != size:
                        raise fail(png, f"mask size {ids.shape[0]}x{ids.shape[1]} differs from "
                                        f"its image {name} ({size[0]}x{size[1]})")
                    n_labels += len(a.get("segments_info", []))
            else:
                n_labels += len(anns)
        if labelled and n_labels == 0:
            raise fail(self.annotation_file, f"no annotations for the {len(self.indices)} "
                                             f"image(s) of split {self.split!r} used; scoring "
                                             "and training need labelled images")
        self._checked.add(labelled)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Scene:
        scene = self._cache.get(i)
        if scene is None:
            scene = self._cache[i] = self._read(self.images[self.indices[i]])
        return scene

    # ------------------------------------------------------------------------------ reading
    def _read(self, info: dict) -> Scene:
        image = _load_image(self.image_dir / info["file_name"])
        anns = self.anns[int(info["id"])]
        if self.kind == "panoptic":
            instance, segments = self._panoptic(info, anns, image.shape[:2])
            return _finish(image, instance, segments)
        return _finish(image, *self._instances(info, anns, image.shape[:2]))

    def _panoptic(self, info: dict, anns: list[dict], hw: tuple[int, int]):
        if not anns:  # an image without a panoptic annotation: all void
            return np.zeros(hw, np.int32), []
        ann = anns[0]
        png = self.png_dir / ann["file_name"]
        ids = rgb2id(read_label_png(png))
        if ids.shape != hw:
            raise fail(png, f"mask size {ids.shape[0]}x{ids.shape[1]} differs from its image "
                            f"{info['file_name']} ({hw[0]}x{hw[1]})")
        info_ids = {int(s["id"]): s for s in ann["segments_info"]}
        unknown = sorted(set(np.unique(ids).tolist()) - set(info_ids) - {0})
        if unknown:
            raise fail(png, f"segment id(s) {unknown[:5]} not in segments_info of "
                            f"{self.annotation_file.name}")
        instance = np.zeros(hw, np.int32)
        segments: list[dict] = []
        for k, (sid, s) in enumerate(info_ids.items(), start=1):
            instance[ids == sid] = k
            c = self.cat_index[int(s["category_id"])]
            segments.append({"id": k, "category": c, "isthing": self.is_thing[c], "area": 0,
                             "iscrowd": int(s.get("iscrowd", 0))})
        return instance, segments

    def _instances(self, info: dict, anns: list[dict], hw: tuple[int, int]):
        """The flattened maps (larger masks painted first) and, for AP50, every annotation of
        a thing category as it is in the file: its own mask (compressed RLE), crowd flag."""
        masks = [self._ann_mask(info, a, hw) for a in anns]
        originals = []
        for a, m in zip(anns, masks):
            c = self.cat_index[int(a["category_id"])]
            if self.is_thing[c]:
                originals.append({"category": c, "iscrowd": int(a.get("iscrowd", 0) or 0),
                                  "counts": _encode(m)["counts"].encode("ascii")})
        instance = np.zeros(hw, np.int32)
        segments: list[dict] = []
        # larger masks first, so small objects overlapping them stay visible
        for k in sorted(range(len(anns)), key=lambda j: -int(masks[j].sum())):
            a = anns[k]
            c = self.cat_index[int(a["category_id"])]
            sid = len(segments) + 1
            instance[masks[k]] = sid
            segments.append({"id": sid, "category": c, "isthing": self.is_thing[c], "area": 0,
                             "iscrowd": int(a.get("iscrowd", 0))})
        return instance, segments, originals

    def _ann_mask(self, info: dict, ann: dict, hw: tuple[int, int]) -> np.ndarray:
        h, w = hw
        seg = ann.get("segmentation")
        where = f"{self.annotation_file}: annotation {ann.get('id')} ({info['file_name']})"
        try:
            if isinstance(seg, list) and not seg:
                return np.zeros(hw, bool)
            if isinstance(seg, list):  # polygons
                rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
            elif isinstance(seg, dict):
                size = [int(v) for v in seg["size"]]
                if size != [h, w]:
                    raise UserError(f"{where}: mask size {size[0]}x{size[1]} differs from its "
                                    f"image ({h}x{w})")
                if isinstance(seg["counts"], list):  # uncompressed RLE
                    if sum(int(v) for v in seg["counts"]) != h * w:
                        raise UserError(f"{where}: uncompressed RLE counts sum to "
                                        f"{sum(seg['counts'])}, not {h}x{w} = {h * w} pixels")
                    rle = mask_util.frPyObjects(seg, h, w)
                else:
                    rle = seg
            else:
                raise UserError(f"{where}: segmentation is neither polygons nor RLE")
            mask = mask_util.decode(rle).astype(bool)
        except UserError:
            raise
        except Exception as e:  # pycocotools raises assorted types on malformed input
            raise UserError(f"{where}: malformed segmentation ({_one_line(e)})") from None
        if mask.shape != (h, w):
            raise UserError(f"{where}: mask size {mask.shape[0]}x{mask.shape[1]} differs from "
                            f"its image ({h}x{w})")
        return mask
