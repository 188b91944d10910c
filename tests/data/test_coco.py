"""COCO-format export and reading: pycocotools compatibility, round trips, polygons / RLE,
and one-line errors that name the offending file."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssprompt.data import open_dataset
from ssprompt.data.coco import CocoDataset, export_coco, id2rgb, rgb2id
from ssprompt.data.scenes import VOID, SceneSplit
from ssprompt.errors import UserError


@pytest.fixture(scope="module")
def scenes() -> SceneSplit:
    return SceneSplit("novel", "test", n=4)


@pytest.fixture(scope="module")
def exported(scenes, tmp_path_factory) -> Path:
    return export_coco(scenes, tmp_path_factory.mktemp("coco"), "test")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_crowd(segments: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "iscrowd"} for s in segments]


# ------------------------------------------------------------------------ export / round trip
def test_layout_and_pycocotools(scenes, exported):
    from pycocotools.coco import COCO

    ann = exported / "annotations"
    assert sorted(p.name for p in (exported / "test").iterdir()) == [f"{i:06d}.png"
                                                                    for i in range(4)]
    assert (ann / "panoptic_test" / "000003.png").is_file()
    assert not list(ann.glob(".*.tmp"))  # atomic writes leave no temp files
    coco = COCO(str(ann / "instances_test.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert all(c["isthing"] == 1 and "supercategory" in c for c in cats)
    for i in range(len(scenes)):
        s = scenes[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[i + 1]))
        things = [seg for seg in s.segments if seg["isthing"]]
        assert len(anns) == len(things) > 0
        for a, seg in zip(anns, things):
            assert a["category_id"] == seg["category"] + 1 and a["iscrowd"] == 0
            assert np.array_equal(coco.annToMask(a).astype(bool), s.instance == seg["id"])
            assert a["area"] == seg["area"]
            ys, xs = np.nonzero(s.instance == seg["id"])
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                 ys.max() - ys.min() + 1]
        assert np.array_equal(np.asarray(Image.open(exported / "test" / f"{i:06d}.png")),
                              s.image)


def test_panoptic_png_encoding(scenes, exported):
    doc = json.loads((exported / "annotations" / "panoptic_test.json").read_text())
    assert all("isthing" in c for c in doc["categories"])
    png = np.asarray(Image.open(exported / "annotations" / "panoptic_test" / "000000.png"))
    assert np.array_equal(rgb2id(png), scenes[0].instance)
    ids = np.array([[0, 1, 255], [256, 65536 + 3, 2 ** 24 - 1]])
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)
    assert id2rgb(np.array([[256 + 2]]))[0, 0].tolist() == [2, 1, 0]


def test_panoptic_round_trip(scenes, exported):
    ds = CocoDataset(exported, "test")
    assert ds.kind == "panoptic" and ds.source == str(exported)
    assert ds.class_names == scenes.class_names and ds.is_thing == scenes.is_thing
    assert len(ds) == len(scenes)
    for i in range(len(ds)):
        a, b = ds[i], scenes[i]
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.semantic, b.semantic)
        assert np.array_equal(a.instance, b.instance)
        assert _no_crowd(a.segments) == b.segments


def test_maps_consistent_and_letterboxed_targets(exported):
    s = CocoDataset(exported, "test")[1]
    assert s.image.shape == (96, 96, 3) and s.instance.shape == s.semantic.shape == (96, 96)
    for seg in s.segments:
        m = s.instance == seg["id"]
        assert m.sum() == seg["area"] > 0 and (s.semantic[m] == seg["category"]).all()
    assert (s.semantic[s.instance == 0] == VOID).all()
    # training targets in a 40 x 40 letterboxed frame: every kept mask is its segment, resized
    labels, masks = s.targets(40)
    assert masks.shape[1:] == (40, 40) and len(labels) == masks.shape[0] >= 1
    assert set(labels.tolist()) <= {seg["category"] for seg in s.segments}


def test_instances_only_round_trip(scenes, exported, tmp_path):
    root = _copy(exported, tmp_path / "inst")
    (root / "annotations" / "panoptic_test.json").unlink()
    ds = CocoDataset(root, "test")
    assert ds.kind == "instances" and all(ds.is_thing)
    for i in range(len(ds)):
        a, b = ds[i], scenes[i]
        thing = np.isin(b.instance, [s["id"] for s in b.segments if s["isthing"]])
        assert (a.instance[~thing] == 0).all() and (a.semantic[~thing] == VOID).all()
        names_a = np.array(ds.class_names + ["void"])[np.minimum(a.semantic, len(ds.class_names))]
        names_b = np.array(scenes.class_names)[b.semantic[thing]]
        assert (names_a[thing] == names_b).all()
        # the same partition of thing pixels, up to renumbering
        pairs = set(zip(a.instance[thing].tolist(), b.instance[thing].tolist()))
        assert len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


def test_subsets_and_open_dataset(exported):
    assert len(CocoDataset(exported, "test", n=2)) == 2
    a = CocoDataset(exported, "test", shots=2, seed=5)
    assert a.indices == CocoDataset(exported, "test", shots=2, seed=5).indices
    assert len(open_dataset(f"coco:{exported}", "test")) == 4
    assert len(open_dataset(f"coco:{exported}", "test", n_test=3)) == 3
    with pytest.raises(UserError, match="shots 9"):
        CocoDataset(exported, "test", shots=9)


def test_open_dataset_train_split(scenes, tmp_path):
    root = export_coco(scenes, tmp_path, "train")
    ds = open_dataset(f"coco:{root}", "train", shots=2, seed=1)
    assert len(ds) == 2 and ds.indices == open_dataset(f"coco:{root}", "train", shots=2,
                                                       seed=1).indices
    with pytest.raises(UserError, match="shots 5"):
        open_dataset(f"coco:{root}", "train", shots=5)
    _raises_naming("instances_test.json", lambda: open_dataset(f"coco:{root}", "test"))


# ------------------------------------------------------------------- hand-made tiny datasets
def _tiny(root: Path, annotations: list[dict], *, images: list[dict] | None = None,
          categories: list[dict] | None = None, split: str = "val") -> Path:
    """One 12x12 image (or the given ones) with an instances JSON."""
    images = images or [{"id": 1, "file_name": "a.png", "height": 12, "width": 12}]
    for im in images:
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((im["height"], im["width"], 3), 128, np.uint8)).save(
            root / split / im["file_name"])
    categories = categories or [{"id": 7, "name": "box", "supercategory": "shape"},
                                {"id": 9, "name": "ring", "supercategory": "shape"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_polygon_and_uncompressed_rle(tmp_path):
    ring = np.zeros((12, 12), bool)
    ring[9:11, 1:5] = True
    _tiny(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]], "area": 36, "bbox": [2, 2, 6, 6]},
        {"id": 2, "image_id": 1, "category_id": 9, "iscrowd": 1,
         "segmentation": _uncompressed_rle(ring), "area": 8, "bbox": [1, 9, 4, 2]},
    ])
    ds = CocoDataset(tmp_path, "val")
    assert ds.class_names == ["box", "ring"] and ds.is_thing == [True, True]
    s = ds[0]
    box = np.zeros((12, 12), bool)
    box[2:8, 2:8] = True
    assert np.array_equal(s.semantic == 0, box)
    assert np.array_equal(s.semantic == 1, ring)
    assert (s.semantic[~(box | ring)] == VOID).all() and (s.instance[~(box | ring)] == 0).all()
    by_cat = {seg["category"]: seg for seg in s.segments}
    assert by_cat[0]["area"] == 36 and by_cat[0]["iscrowd"] == 0
    assert by_cat[1]["area"] == 8 and by_cat[1]["iscrowd"] == 1
    assert np.array_equal(s.instance == by_cat[1]["id"], ring)


def test_image_without_annotations(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 12, "width": 12},
              {"id": 2, "file_name": "b.png", "height": 10, "width": 14}]
    _tiny(tmp_path, [{"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
                      "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]}], images=images)
    s = CocoDataset(tmp_path, "val")[1]
    assert s.image.shape == (10, 14, 3) and s.segments == []  # its own size, not a square
    assert (s.semantic == VOID).all() and (s.instance == 0).all()


# ------------------------------------------------------------------------------------ errors
def _raises_naming(name: str, fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert name in msg and "\n" not in msg, msg
    return msg


def test_error_not_json(tmp_path):
    path = _tiny(tmp_path, [])
    path.write_text("{ not json")
    _raises_naming("instances_val.json", lambda: CocoDataset(tmp_path, "val"))


def test_error_missing_files(tmp_path):
    _raises_naming("nowhere", lambda: CocoDataset(tmp_path / "nowhere", "val"))
    _tiny(tmp_path, [])
    _raises_naming("instances_train.json", lambda: CocoDataset(tmp_path, "train"))
    (tmp_path / "val" / "a.png").unlink()
    _raises_naming("a.png", lambda: CocoDataset(tmp_path, "val")[0])


def test_error_undeclared_category(tmp_path):
    _tiny(tmp_path, [{"id": 1, "image_id": 1, "category_id": 42, "iscrowd": 0,
                      "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]}])
    msg = _raises_naming("instances_val.json", lambda: CocoDataset(tmp_path, "val"))
    assert "42" in msg


def test_error_mask_size_mismatch(tmp_path):
    rle = _uncompressed_rle(np.ones((10, 10), bool))
    _tiny(tmp_path, [{"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 1,
                      "segmentation": rle}])
    msg = _raises_naming("instances_val.json", lambda: CocoDataset(tmp_path, "val")[0])
    assert "a.png" in msg and "size" in msg


def test_error_panoptic_png_size_mismatch(exported, tmp_path):
    root = _copy(exported, tmp_path / "pan")
    png = root / "annotations" / "panoptic_test" / "000000.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(png)
    _raises_naming("000000.png", lambda: CocoDataset(root, "test")[0])


def test_error_corrupt_image(exported, tmp_path):
    root = _copy(exported, tmp_path / "bad")
    img = root / "test" / "000002.png"
    img.write_bytes(img.read_bytes()[:200])  # truncated
    ds = CocoDataset(root, "test")
    ds[0]  # the other images still load
    _raises_naming("000002.png", lambda: ds[2])


def test_error_unknown_panoptic_segment(exported, tmp_path):
    root = _copy(exported, tmp_path / "seg")
    png = root / "annotations" / "panoptic_test" / "000001.png"
    ids = rgb2id(np.asarray(Image.open(png)))
    ids[:3, :3] = 4321
    Image.fromarray(id2rgb(ids)).save(png)
    msg = _raises_naming("000001.png", lambda: CocoDataset(root, "test")[1])
    assert "4321" in msg and "segments_info" in msg


def test_error_empty_coco_spec():
    with pytest.raises(UserError, match="coco:"):
        open_dataset("coco:", "test")


# ------------------------------------------ AP50 against the user's own instance annotations
def _rect(hw: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": r["counts"].decode("ascii")}


# two images; image 1 holds a box (polygon) mostly covered by a ring inside it (the flattened
# map keeps < half of the box), a box hidden entirely by two smaller rings painted over it, and
# a crowd region; image 2 a box and a ring nobody predicts
_HW1, _HW2 = (32, 32), (20, 28)
_GT = [  # (id, image, category id, iscrowd, segmentation)
    (1, 1, 7, 0, [[0, 0, 16, 0, 16, 16, 0, 16]]),
    (2, 1, 9, 0, _rle(_rect(_HW1, (2, 14), (2, 14)))),
    (3, 1, 7, 0, _rle(_rect(_HW1, (20, 24), (20, 26)))),
    (4, 1, 9, 0, _rle(_rect(_HW1, (20, 24), (18, 22)))),
    (5, 1, 9, 0, _rle(_rect(_HW1, (20, 24), (22, 26)))),
    (6, 1, 7, 1, _uncompressed_rle(_rect(_HW1, (26, 32), (0, 12)))),
    (7, 2, 7, 0, [[3, 2, 15, 2, 15, 10, 3, 10]]),
    (8, 2, 9, 0, _rle(_rect(_HW2, (10, 18), (16, 26)))),
]


def _overlapping_coco(root: Path) -> Path:
    """The case above as a COCO instances folder (split "val"); returns the JSON's path."""
    from pycocotools import mask as mask_util

    images = [{"id": 1, "file_name": "a.png", "height": _HW1[0], "width": _HW1[1]},
              {"id": 2, "file_name": "b.png", "height": _HW2[0], "width": _HW2[1]}]
    anns = []
    for aid, img, cat, crowd, seg in _GT:
        h, w = _HW1 if img == 1 else _HW2
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if isinstance(seg, list) \
            else mask_util.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        anns.append({"id": aid, "image_id": img, "category_id": cat, "iscrowd": crowd,
                     "segmentation": seg, "area": float(mask_util.area(rle)),
                     "bbox": [float(v) for v in mask_util.toBbox(rle)]})
    path = _tiny(root, anns, images=images)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({"info": {"description": "overlaps"}, **doc}))
    return path


def _gt_mask(path: Path, aid: int) -> np.ndarray:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    return coco.annToMask(coco.anns[aid]).astype(bool)


def _good_detections(path: Path) -> list[list[tuple[np.ndarray, int, float]]]:
    """Per image: (mask, class index, score). Every real instance found (the ring over the
    box and the hidden box too; one ring shifted by a pixel), one detection on the crowd, a
    confident false positive per image, and image 2's ring missed."""
    m = {aid: _gt_mask(path, aid) for aid, *_ in _GT}
    return [[(m[1], 0, 0.9), (m[2], 1, 0.8), (m[3], 0, 0.7), (m[4], 1, 0.6),
             (np.roll(m[5], 1, 1), 1, 0.95), (_rect(_HW1, (26, 32), (0, 6)), 0, 0.85),
             (_rect(_HW1, (26, 32), (20, 32)), 0, 0.99)],
            [(m[7], 0, 0.5), (m[7], 1, 0.88)]]


def _bad_detections(path: Path) -> list[list[tuple[np.ndarray, int, float]]]:
    """The good detections with their classes swapped and their masks moved 7 pixels."""
    return [[(np.roll(mk, (7, 7), (0, 1)), 1 - c, s) for mk, c, s in dets]
            for dets in _good_detections(path)]


class _HandMade:
    """Stands in for ``ssprompt.predictor.Predictor``: hands out the given detections (one list
    per image, in order) as ``Prediction`` objects, panoptic maps painted lowest score first."""

    agnostic, batch, object_mask_threshold = False, 4, None

    def __init__(self, class_names, is_thing, detections) -> None:
        self.class_names, self.is_thing, self.left = class_names, is_thing, list(detections)

    def predict_batch(self, pixels):
        import torch

        from ssprompt.evaluation.postprocess import Instances, Prediction

        out = []
        for image in pixels:
            dets, self.left = self.left[0], self.left[1:]
            hw = image.shape[:2]
            masks = torch.as_tensor(np.stack([d[0] for d in dets])) if dets else \
                torch.zeros(0, *hw, dtype=torch.bool)
            pan = np.zeros(hw, np.int64)
            for k in sorted(range(len(dets)), key=lambda k: dets[k][2]):
                pan[dets[k][0]] = k + 1
            segments = [{"id": k + 1, "category": c, "isthing": True, "score": s,
                         "area": int((pan == k + 1).sum())}
                        for k, (_, c, s) in enumerate(dets) if (pan == k + 1).any()]
            out.append(Prediction(torch.as_tensor(np.where(pan > 0, 0, 1)),
                                  Instances(masks, torch.tensor([d[1] for d in dets],
                                                                dtype=torch.long),
                                            torch.tensor([d[2] for d in dets],
                                                         dtype=torch.float64)),
                                  torch.as_tensor(pan), segments))
        return out


def write_hand_predictions(root: Path, out: Path, detections) -> Path:
    """``ssprompt predict``'s files for the COCO split ``root``/val, from hand-made detections,
    written by ssprompt's own writer."""
    from ssprompt.predict import dataset_items, write_predictions

    ds = CocoDataset(root, "val")
    items, cat_ids = dataset_items(ds)
    write_predictions(out, _HandMade(ds.class_names, ds.is_thing, detections), items, cat_ids,
                      {"weights_hash": "hand-made", "prompts": None}, progress=False)
    return out


def pycocotools_ap50(gt_json: Path, results_json: Path) -> float:
    """pycocotools' AP50 as ``COCOeval.summarize()`` reports it (``stats[1]``: IoU 0.5, area
    all, 100 detections), on the original ground-truth JSON and a results JSON file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        ev = COCOeval(gt, gt.loadRes(str(results_json)), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def _ap50(folder: Path, root: Path, flatten: bool = False) -> float:
    """ssprompt's unrounded AP50 (a fraction) of a prediction folder on COCO split root/val;
    ``flatten``: against the flattened maps instead (what AP50 scored before)."""
    import dataclasses

    from ssprompt.evaluation.metrics import InstanceAP50
    from ssprompt.predict import read_predictions

    ds = CocoDataset(root, "val")
    _, preds = read_predictions(folder)
    m = InstanceAP50(len(ds.class_names))
    for i, p in enumerate(preds):
        scene = ds[i]
        m.update(p.instances, dataclasses.replace(scene, annotations=None) if flatten else scene)
    return m.compute()["AP50"] / 100


def test_overlapping_instances_fixture_is_what_it_claims(tmp_path):
    """The flattened maps lose the hidden box and most of the covered box; the annotations
    keep every mask as the file has it, crowd flag included."""
    from pycocotools import mask as mask_util

    path = _overlapping_coco(tmp_path)
    s = CocoDataset(tmp_path, "val")[0]
    box = _gt_mask(path, 1)
    flat_box = [g for g in s.segments if g["category"] == 0 and g["area"] > 100]
    assert len(flat_box) == 1 and flat_box[0]["area"] < box.sum() / 2
    assert not (s.instance[_gt_mask(path, 3)] == 0).any()        # covered, yet ...
    assert len([g for g in s.segments if not g["iscrowd"]]) == 4  # ... one instance gone
    assert len(s.annotations) == 6
    for a, (aid, _, cat, crowd, _) in zip(s.annotations, _GT[:6], strict=True):
        mask = mask_util.decode({"size": list(_HW1), "counts": a["counts"]}).astype(bool)
        assert np.array_equal(mask, _gt_mask(path, aid))
        assert a["category"] == (0 if cat == 7 else 1) and a["iscrowd"] == crowd


def test_ap50_equals_pycocotools_on_the_original_json(tmp_path):
    """AP50 of ssprompt's own prediction files on a COCO instances split with overlapping,
    fully hidden and crowd instances equals pycocotools' COCOeval on the user's JSON and the
    written results JSON; the CLI reports it (2 decimals); bad predictions score low."""
    from cli_helpers import ssprompt

    path = _overlapping_coco(tmp_path / "coco")
    root = tmp_path / "coco"
    good = write_hand_predictions(root, tmp_path / "good", _good_detections(path))
    bad = write_hand_predictions(root, tmp_path / "bad", _bad_detections(path))
    ref_good = pycocotools_ap50(path, good / "instances_results.json")
    ref_bad = pycocotools_ap50(path, bad / "instances_results.json")
    assert 0.4 < ref_good < 0.95 and ref_bad < 0.1
    assert abs(_ap50(good, root) - ref_good) <= 1e-9
    assert abs(_ap50(bad, root) - ref_bad) <= 1e-9
    # the flattened ground truth (the hidden box gone, the covered one shrunk) scores otherwise
    assert _ap50(good, root, flatten=True) < ref_good - 0.1

    r = ssprompt("eval", "--data", f"coco:{root}", "--test-split", "val", "--predictions",
                 good, "--out", tmp_path / "m", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["AP50"] == round(100 * ref_good, 2)
    assert metrics["mIoU"] is not None and metrics["PQ"] is not None
