"""``ssprompt predict``: prediction files that other tools read, and ``eval --predictions``.

Layout of the output folder (every file written atomically through ``io.write_bytes``)::

    predictions.json           what was predicted: images (id, file_name, height, width,
                               source), categories (id, name, isthing), SFM hash, prompts, data
    instances_results.json     COCO instance results: [{image_id, category_id, segmentation
                               (RLE), score, bbox}] (pycocotools ``COCO.loadRes``)
    panoptic.json              COCO panoptic predictions: {images, annotations: [{image_id,
                               file_name, segments_info: [{id, category_id, isthing, area,
                               bbox, iscrowd, score}]}], categories} (panopticapi ``pq_compute``)
    panoptic/NAME.png          segment ids as RGB (id = R + 256 G + 256^2 B), 0 = void
    semantic/NAME.png          class index per pixel (8-bit; 16-bit past 255 classes); on
                               things-only data (no stuff class) 255 (16-bit: 65535) is
                               "nothing", the pixels no predicted segment covers
    overlays/NAME.png          the image, coloured segments and their class names

Image and category ids are the COCO file's own for ``--data coco:`` (so ``loadRes`` works
against its ground truth); elsewhere image i has id i + 1 and class c id c + 1 (as
``data.coco.export_coco`` writes them).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .data.coco import id2rgb, rgb2id
from .data.images import check_image
from .errors import fail
from .evaluation.postprocess import Instances, Prediction
from .io import write_bytes, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST = "predictions.json"


@dataclass
class Item:
    """One image to predict: its pixels come from ``load()``."""

    image_id: int
    file_name: str          # output PNG name (semantic/, panoptic/, overlays/)
    source: str
    load: object            # () -> uint8 (H, W, 3)


# ------------------------------------------------------------------------------- inputs
def folder_items(folder: str | Path) -> list[Item]:
    """Every image file in ``folder`` (sorted by name), checked to decode before anything is
    written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise fail(folder, "not a folder", "images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise fail(folder, f"no image files ({', '.join(IMAGE_SUFFIXES)})", "images")
    stems = [p.stem for p in files]
    items = []
    for i, p in enumerate(files):
        check_image(p)      # decodes whole: a damaged file fails before anything is written
        name = f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.name}.png"
        items.append(Item(i + 1, name, str(p), lambda p=p: _read_rgb(p)))
    return items


def _read_rgb(path: Path) -> np.ndarray:
    from .data.images import read_image

    return read_image(path)


def dataset_items(data) -> tuple[list[Item], list[int]]:
    """Items of a split (a ``SceneSplit`` or ``CocoDataset``) and the category id of each
    class index."""
    if hasattr(data, "cat_index"):  # COCO: the file's own image and category ids
        cat_ids = sorted(data.cat_index, key=data.cat_index.get)
        infos = [data.images[j] for j in data.indices]
        items = [Item(int(info["id"]), f"{Path(info['file_name']).stem}.png",
                      str(data.image_dir / info["file_name"]), lambda i=i: data[i].image)
                 for i, info in enumerate(infos)]
        return items, cat_ids
    items = [Item(i + 1, f"{i:06d}.png", f"{getattr(data, 'task', 'data')}[{i}]",
                  lambda i=i: data[i].image) for i in range(len(data))]
    return items, list(range(1, len(data.class_names) + 1))


# ------------------------------------------------------------------------------ writing
def write_predictions(out: str | Path, predictor, items: list[Item], cat_ids: list[int],
                      about: dict, progress: bool = True) -> dict:
    """Predict every item (``predictor.batch`` at a time) and write the folder described in
    the module docstring. Returns the manifest."""
    from pycocotools import mask as mask_util

    out = Path(out)
    names, is_thing = predictor.class_names, predictor.is_thing
    if predictor.agnostic:  # object / background, not the data's classes
        cat_ids = list(range(1, len(names) + 1))
    categories = [{"id": int(c), "name": n, "isthing": int(t),
                   "supercategory": "thing" if t else "stuff"}
                  for c, n, t in zip(cat_ids, names, is_thing)]
    images, results, panoptic = [], [], []
    bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress)
    for s in range(0, len(items), predictor.batch):
        chunk = items[s:s + predictor.batch]
        pixels = [it.load() for it in chunk]
        for it, image, pred in zip(chunk, pixels, predictor.predict_batch(pixels)):
            h, w = image.shape[:2]
            images.append({"id": it.image_id, "file_name": it.file_name, "height": h,
                           "width": w, "source": it.source})
            inst = pred.instances
            if len(inst):
                rles = mask_util.encode(np.asfortranarray(
                    inst.masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)))
                for rle, c, score in zip(rles, inst.categories.tolist(), inst.scores.tolist()):
                    results.append({"image_id": it.image_id, "category_id": cat_ids[c],
                                    "segmentation": {"size": [h, w],
                                                     "counts": rle["counts"].decode("ascii")},
                                    "score": score,
                                    "bbox": [float(v) for v in mask_util.toBbox(rle)]})
            pan = pred.panoptic.cpu().numpy()
            segments_info = []
            for seg in pred.segments:
                ys, xs = np.nonzero(pan == seg["id"])
                bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                        int(ys.max() - ys.min() + 1)] if len(xs) else [0, 0, 0, 0]
                segments_info.append({"id": seg["id"], "category_id": cat_ids[seg["category"]],
                                      "isthing": int(seg["isthing"]), "area": seg["area"],
                                      "bbox": bbox, "iscrowd": 0, "score": seg["score"]})
            panoptic.append({"image_id": it.image_id, "file_name": it.file_name,
                             "segments_info": segments_info})
            write_bytes(out / "semantic" / it.file_name,
                        _png(semantic_png(pred.semantic.cpu().numpy(), len(names))))
            write_bytes(out / "panoptic" / it.file_name, _png(id2rgb(pan)))
            write_bytes(out / "overlays" / it.file_name, _png(overlay(image, pred, names)))
            bar.update(1)
    bar.close()
    write_json(out / "instances_results.json", results)
    write_json(out / "panoptic.json", {"images": images, "annotations": panoptic,
                                       "categories": categories})
    manifest = {**about, "images": images, "categories": categories, "class_names": names,
                "is_thing": is_thing, "class_agnostic": predictor.agnostic,
                "object_mask_threshold": predictor.object_mask_threshold}
    write_json(out / MANIFEST, manifest)
    return manifest


def semantic_png(sem: np.ndarray, n_classes: int) -> np.ndarray:
    """A semantic map as a semantic PNG's array: uint8 up to 255 classes, else uint16; a pixel
    of no class ("nothing", ``Prediction.semantic`` < 0) is the dtype's largest value."""
    dtype = np.uint8 if n_classes <= 255 else np.uint16
    return np.where(sem < 0, np.iinfo(dtype).max, sem).astype(dtype)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ overlay
def _colour(seg_id: int, category: int) -> np.ndarray:
    """A stable, saturated colour per class, shifted a little per segment (instances differ)."""
    rng = np.random.default_rng([category, seg_id])
    base = np.random.default_rng(category).integers(40, 256, 3)
    return np.clip(base + rng.integers(-35, 36, 3), 0, 255).astype(np.float32)


def overlay(image: np.ndarray, pred: Prediction, class_names: list[str],
            min_side: int = 384) -> np.ndarray:
    """uint8 RGB: the image (enlarged to ``min_side`` on its long side if smaller, nearest),
    each panoptic segment tinted in its colour with a darker outline, and its class name at
    the segment's deepest pixel (the largest segments' names last, so they stay readable)."""
    from scipy.ndimage import distance_transform_edt

    scale = max(1, int(np.ceil(min_side / max(image.shape[:2]))))
    pan = pred.panoptic.cpu().numpy()
    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
        pan = pan.repeat(scale, 0).repeat(scale, 1)
    out = image.astype(np.float32)
    edge = np.zeros(pan.shape, bool)
    edge[:-1] |= pan[:-1] != pan[1:]
    edge[:, :-1] |= pan[:, :-1] != pan[:, 1:]
    colours = {s["id"]: _colour(s["id"], s["category"]) for s in pred.segments}
    for sid, c in colours.items():
        m = pan == sid
        out[m] = 0.45 * out[m] + 0.55 * c
        out[m & edge] = 0.5 * c
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for s in sorted(pred.segments, key=lambda s: s["area"]):
        m = pan == s["id"]
        if not m.any():
            continue
        label = class_names[s["category"]]
        inside = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]  # deepest pixel of the segment
        y, x = np.unravel_index(int(inside.argmax()), m.shape)
        l, t, r, b = draw.textbbox((0, 0), label, font=font)
        x0, y0 = int(x - (r - l) / 2), int(y - (b - t) / 2)
        draw.rectangle((x0 - 2, y0 - 2, x0 + r - l + 2, y0 + b - t + 2), fill=(0, 0, 0))
        draw.text((x0 - l, y0 - t), label, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


# ------------------------------------------------------------------------------ reading
def read_predictions(folder: str | Path) -> tuple[dict, list[Prediction]]:
    """The manifest and one ``Prediction`` per image, in the manifest's order, rebuilt from
    the files (semantic PNG, RLE instance results, panoptic PNG + segments_info). An empty
    results list (``[]``) is an image set without detections. A panoptic PNG id (other than
    0, void) without a ``segments_info`` entry is an error, as in panopticapi."""
    from pycocotools import mask as mask_util

    folder = Path(folder)
    paths = [folder / n for n in (MANIFEST, "instances_results.json", "panoptic.json")]
    docs = []
    for p in paths:
        try:
            docs.append(json.loads(p.read_text()))
        except FileNotFoundError:
            raise fail(folder, f"no {p.name} (write it with `ssprompt predict`)",
                       "predictions") from None
        except (OSError, ValueError) as e:
            raise fail(p, f"unreadable ({' '.join(str(e).split())[:120]})") from None
    manifest, results, pan = docs
    if not isinstance(results, list):
        raise fail(paths[1], "not a COCO results file (top level is not a list)")
    cat_index = {c["id"]: i for i, c in enumerate(manifest["categories"])}
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    segs = {a["image_id"]: a["segments_info"] for a in pan["annotations"]}
    preds = []
    for im in manifest["images"]:
        h, w, name = im["height"], im["width"], im["file_name"]
        sem = _read_png(folder / "semantic" / name, (h, w)).astype(np.int64)
        sem[sem >= len(manifest["class_names"])] = -1       # "nothing" (things-only data)
        pan_png = folder / "panoptic" / name
        pmap = rgb2id(_read_png(pan_png, (h, w)))
        listed = {int(s["id"]) for s in segs.get(im["id"], [])}
        unknown = sorted(set(np.unique(pmap).tolist()) - listed - {0})
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise fail(pan_png, f"segment id {unknown[0]}{more} has no segments_info entry in "
                                f"{paths[2].name} for image_id {im['id']}")
        rs = by_image.get(im["id"], [])
        if rs:
            masks = mask_util.decode([r["segmentation"] for r in rs]).transpose(2, 0, 1)
        else:
            masks = np.zeros((0, h, w), np.uint8)
        inst = Instances(torch.from_numpy(masks.astype(bool)),
                         torch.tensor([cat_index[r["category_id"]] for r in rs],
                                      dtype=torch.long),
                         torch.tensor([r["score"] for r in rs], dtype=torch.float64))
        segments = [{"id": s["id"], "category": cat_index[s["category_id"]],
                     "isthing": bool(s["isthing"]), "score": s["score"], "area": s["area"]}
                    for s in segs.get(im["id"], [])]
        preds.append(Prediction(torch.from_numpy(sem.astype(np.int64)), inst,
                                torch.from_numpy(pmap.astype(np.int64)), segments))
    return manifest, preds


def _read_png(path: Path, hw: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise fail(path, "missing prediction file") from None
    except Exception as e:
        raise fail(path, f"cannot decode ({' '.join(str(e).split())[:120]})") from None
    if arr.shape[:2] != tuple(hw):
        raise fail(path, f"is {arr.shape[1]} x {arr.shape[0]}, the manifest says "
                         f"{hw[1]} x {hw[0]}")
    return arr


def score_predictions(folder: str | Path, data) -> tuple[dict, dict]:
    """Metrics of the prediction files in ``folder`` against the split ``data`` (the same
    images, in the same order, as when they were predicted), and the folder's manifest."""
    from .data.views import object_vs_background
    from .evaluation.metrics import SegmentationEvaluator

    manifest, preds = read_predictions(folder)
    if len(preds) != len(data):
        raise fail(folder, f"holds {len(preds)} images, the split has {len(data)} (the same "
                           "task and n_test as predicted?)", "predictions")
    agnostic = manifest.get("class_agnostic", False)
    if not agnostic and manifest["class_names"] != list(data.class_names):
        raise fail(folder, "predicted with another class list than this split's",
                   "predictions")
    ev = SegmentationEvaluator(manifest["class_names"], manifest["is_thing"], sync=False)
    for i, pred in enumerate(preds):
        scene = data[i]
        if tuple(scene.semantic.shape) != tuple(pred.semantic.shape):
            raise fail(folder, f"image {i} is {tuple(pred.semantic.shape)} there but "
                               f"{scene.semantic.shape} here", "predictions")
        ev.update([pred], [object_vs_background(scene) if agnostic else scene])
    return ev.compute(), manifest
