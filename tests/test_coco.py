"""COCO-format export and reading: pycocotools compatibility, round trips, polygons / RLE,
and one-line errors that name the offending file."""

from __future__ import annotations

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
