"""``ssprompt predict`` writes files the official tools read, and they score exactly as
``ssprompt eval`` does in memory (``eval --predictions``); pycocotools agrees on AP50."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, save_tiny_sam, ssprompt
from PIL import Image

from ssprompt.errors import UserError

N_TEST = 8


def _prompts(path):
    """Prompts for `novel` on the packaged SFM, moved a little away from the defaults."""
    from test_api import novel_prompts

    from ssprompt import load_sfm

    novel_prompts(load_sfm(device="cpu"), path, n_prompts=50, step=0.02)
    return path


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    p = _prompts(tmp / "p.safetensors")
    out = tmp / "pred"
    r = ssprompt("predict", "--task", "novel", "--n-test", N_TEST, "--prompts", p,
                 "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp, p, out


def test_predict_writes_all_four_kinds_of_files(predicted):
    _, _, out = predicted
    manifest = json.loads((out / "predictions.json").read_text())
    names = [im["file_name"] for im in manifest["images"]]
    assert len(names) == N_TEST and manifest["class_names"][5] == "sandal"
    for sub in ("semantic", "panoptic", "overlays"):
        assert sorted(p.name for p in (out / sub).iterdir()) == sorted(names), sub
    for im in manifest["images"]:
        sem = np.asarray(Image.open(out / "semantic" / im["file_name"]))
        assert sem.shape == (im["height"], im["width"]) and sem.max() < 27
        over = np.asarray(Image.open(out / "overlays" / im["file_name"]))
        assert over.ndim == 3 and over.shape[2] == 3 and over.shape[0] >= im["height"]
    assert not list(out.rglob("*.tmp"))


def test_panoptic_files_follow_the_coco_panoptic_format(predicted):
    """What panopticapi's pq_compute relies on: every non-void id of a PNG is listed in its
    segments_info with the pixel count as area, and every category id is declared."""
    from ssprompt.data.coco import rgb2id

    _, _, out = predicted
    doc = json.loads((out / "panoptic.json").read_text())
    cats = {c["id"]: c for c in doc["categories"]}
    assert len(doc["annotations"]) == N_TEST
    n_segments = 0
    for ann in doc["annotations"]:
        ids = rgb2id(np.asarray(Image.open(out / "panoptic" / ann["file_name"]).convert("RGB")))
        counts = dict(zip(*np.unique(ids[ids > 0], return_counts=True)))
        listed = {s["id"]: s for s in ann["segments_info"]}
        assert set(counts) == set(listed)
        for sid, seg in listed.items():
            assert seg["area"] == counts[sid] and seg["category_id"] in cats
            assert seg["isthing"] == cats[seg["category_id"]]["isthing"]
        n_segments += len(listed)
    assert n_segments > N_TEST  # a real prediction, not an empty one


def test_files_score_exactly_as_eval_and_pycocotools_agrees(predicted, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from ssprompt.data import open_dataset
    from ssprompt.data.coco import export_coco

    _, p, out = predicted
    r = ssprompt("eval", "--task", "novel", "--n-test", N_TEST, "--prompts", p,
                 "--out", tmp_path / "mem", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    r = ssprompt("eval", "--task", "novel", "--n-test", N_TEST, "--predictions", out,
                 "--out", tmp_path / "files", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads((tmp_path / "mem" / "metrics.json").read_text())
    files = json.loads((tmp_path / "files" / "metrics.json").read_text())
    for k in ("mIoU", "AP50", "PQ", "SQ", "RQ", "PQ_th", "PQ_st", "per_class"):
        assert files[k] == mem[k], k
    assert files["weights_hash"] == mem["weights_hash"] and files["prompt_meta"]["prompts"] == str(p)

    # pycocotools on the results JSON against the split exported as real COCO
    root = export_coco(open_dataset("novel", "test", n_test=N_TEST), tmp_path / "gt", "test")
    gt = COCO(str(root / "annotations" / "instances_test.json"))
    dt = gt.loadRes(str(out / "instances_results.json"))
    ev = COCOeval(gt, dt, iouType="segm")
    ev.params.iouThrs = np.array([0.5])
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
    ev.params.maxDets = [100]
    ev.evaluate()
    ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, -1]
    ap50 = 100 * float(np.mean([prec[:, k].mean() for k in range(prec.shape[1])
                                if (prec[:, k] > -1).all()]))
    assert round(ap50, 2) == mem["AP50"]


def test_predict_a_folder_of_images_any_size(tmp_path):
    from pycocotools.coco import COCO

    p = _prompts(tmp_path / "p.safetensors")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide.png": (60, 140), "tall.jpg": (130, 70)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / name)
    (imgs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    r = ssprompt("predict", "--images", imgs, "--prompts", p, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "predictions.json").read_text())
    got = {im["source"].split("/")[-1]: (im["height"], im["width"]) for im in manifest["images"]}
    assert got == sizes
    for im in manifest["images"]:
        assert np.asarray(Image.open(out / "semantic" / im["file_name"])).shape == \
            (im["height"], im["width"])
    gt = COCO()
    gt.dataset = {"images": manifest["images"], "annotations": [],
                  "categories": manifest["categories"]}
    gt.createIndex()
    results = json.loads((out / "instances_results.json").read_text())
    if results:
        dt = gt.loadRes(results)
        for ann in dt.anns.values():
            im = gt.imgs[ann["image_id"]]
            assert dt.annToMask(ann).shape == (im["height"], im["width"])


def test_predict_bad_input_is_one_line(tmp_path):
    out = tmp_path / "out"
    r = ssprompt("predict", "--images", tmp_path / "nowhere", "--out", out)
    assert_one_line_error(r, "--images", "nowhere")
    (tmp_path / "imgs").mkdir()
    r = ssprompt("predict", "--images", tmp_path / "imgs", "--task", "novel", "--out", out)
    assert_one_line_error(r, "no image files")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = ssprompt("predict", "--images", tmp_path / "imgs", "--task", "novel", "--out", out)
    assert_one_line_error(r, "b.png")
    (tmp_path / "imgs" / "b.png").unlink()
    r = ssprompt("predict", "--images", tmp_path / "imgs", "--out", out)
    assert_one_line_error(r, "--prompts")
    r = ssprompt("predict", "--task", "novel", "--prompts", tmp_path / "none.safetensors",
                 "--out", out)
    assert_one_line_error(r, "none.safetensors")
    assert not out.exists()
    r = ssprompt("eval", "--task", "novel", "--n-test", "3", "--predictions", tmp_path / "imgs")
    assert_one_line_error(r, "predictions.json")


def test_predict_a_coco_split_keeps_its_ids_and_scores_as_eval(tmp_path):
    """--data coco:ROOT: results carry the COCO file's own image and category ids (so loadRes
    reads them against that file), and the files score as eval does."""
    from pycocotools.coco import COCO

    from ssprompt.data import open_dataset
    from ssprompt.data.coco import export_coco

    root = export_coco(open_dataset("novel", "test", n_test=4), tmp_path / "coco", "val2017")
    doc = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    for c in doc["categories"]:  # ids the file chooses, not index + 1
        c["id"] += 100
    for a in doc["annotations"]:
        for s in a["segments_info"]:
            s["category_id"] += 100
    for im in doc["images"]:
        im["id"] += 500
    for a in doc["annotations"]:
        a["image_id"] += 500
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    (root / "annotations" / "instances_val2017.json").unlink()
    p = _prompts(tmp_path / "p.safetensors")
    spec = ["--data", f"coco:{root}", "--test-split", "val2017", "--device", "cpu"]
    r = ssprompt("predict", *spec, "--prompts", p, "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "pred" / "instances_results.json").read_text())
    assert results and {x["image_id"] for x in results} <= {501, 502, 503, 504}
    assert {x["category_id"] for x in results} <= {c["id"] for c in doc["categories"]}
    gt = COCO()
    gt.dataset = {"images": doc["images"], "annotations": [], "categories": doc["categories"]}
    gt.createIndex()
    assert len(gt.loadRes(results).anns) == len(results)
    for how in (["--prompts", p], ["--predictions", tmp_path / "pred"]):
        r = ssprompt("eval", *spec, *how, "--out", tmp_path / how[0][2:])
        assert r.returncode == 0, r.stderr[-2000:]
    mem, files = (json.loads((tmp_path / d / "metrics.json").read_text())
                  for d in ("prompts", "predictions"))
    assert all(files[k] == mem[k] for k in ("mIoU", "AP50", "PQ", "per_class"))


def test_predict_class_agnostic_with_a_tiny_sam(tmp_path):
    """An SFM without a text encoder: classes object / background in every file, scored as
    eval scores it."""
    ckpt = tmp_path / "sam"
    save_tiny_sam(ckpt, seed=0)
    spec = ["--task", "novel", "--n-test", "3", "--sfm", "sam", "--checkpoint", ckpt,
            "--n-prompts", "16", "--device", "cpu"]
    r = ssprompt("predict", *spec, "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert manifest["class_names"] == ["object", "background"] and manifest["class_agnostic"]
    r = ssprompt("eval", *spec, "--out", tmp_path / "mem")
    assert r.returncode == 0, r.stderr[-2000:]
    # scoring files needs no SAM: the default --sfm is loaded, the files' SFM is reported
    r = ssprompt("eval", "--task", "novel", "--n-test", "3", "--predictions", tmp_path / "pred",
                 "--out", tmp_path / "files")
    assert r.returncode == 0, r.stderr[-2000:]
    mem, files = (json.loads((tmp_path / d / "metrics.json").read_text())
                  for d in ("mem", "files"))
    assert all(files[k] == mem[k] for k in ("mIoU", "AP50", "PQ", "per_class"))
    assert files["weights_hash"] == mem["weights_hash"] == manifest["weights_hash"]   # the SAM's, not the embedded one


def test_empty_results_file_scores_as_no_detections(tmp_path):
    """``instances_results.json`` = ``[]`` (pycocotools' ``loadRes([])`` fails on it) reads
    back as images without detections: AP50 0 where there is ground truth, mIoU / PQ as
    before; pycocotools given an empty result set agrees."""
    from data.test_coco import _good_detections, _overlapping_coco, write_hand_predictions

    from ssprompt.data.coco import CocoDataset
    from ssprompt.evaluation.metrics import InstanceAP50, coco_ap50
    from ssprompt.predict import read_predictions, score_predictions

    root = tmp_path / "coco"
    path = _overlapping_coco(root)
    folder = write_hand_predictions(root, tmp_path / "pred", _good_detections(path))
    ds = CocoDataset(root, "val")
    before, _ = score_predictions(folder, ds)
    assert before["AP50"] > 40
    (folder / "instances_results.json").write_text("[]\n")
    _, preds = read_predictions(folder)
    assert [len(p.instances) for p in preds] == [0, 0]
    after, _ = score_predictions(folder, ds)
    assert after["AP50"] == 0.0
    assert (after["mIoU"], after["PQ"]) == (before["mIoU"], before["PQ"])
    m = InstanceAP50(len(ds.class_names))
    for i, p in enumerate(preds):
        m.update(p.instances, ds[i])
    images, gts, dts = m._coco()
    assert dts == [] and coco_ap50(images, gts, dts, 2, library="pycocotools")[0] == 0.0
    (folder / "instances_results.json").write_text("{}\n")
    with pytest.raises(UserError, match="instances_results.json: not a COCO results file"):
        read_predictions(folder)


def test_panoptic_id_without_segments_info_is_an_error(tmp_path):
    """A panoptic PNG segment id that ``segments_info`` does not list stops reading (as in
    panopticapi), in one line naming the PNG and the id; eval says the same."""
    from data.test_coco import _good_detections, _overlapping_coco, write_hand_predictions

    from ssprompt.data.coco import id2rgb, rgb2id
    from ssprompt.predict import read_predictions

    root = tmp_path / "coco"
    path = _overlapping_coco(root)
    folder = write_hand_predictions(root, tmp_path / "pred", _good_detections(path))
    read_predictions(folder)  # as written: fine
    png = folder / "panoptic" / "b.png"
    ids = rgb2id(np.asarray(Image.open(png)))
    ids[-2:, :2] = 4321
    Image.fromarray(id2rgb(ids)).save(png)
    with pytest.raises(UserError) as e:
        read_predictions(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(png) in msg and "4321" in msg and "segments_info" in msg
    r = ssprompt("eval", "--data", f"coco:{root}", "--test-split", "val", "--predictions",
                 folder, "--device", "cpu")
    assert_one_line_error(r, "b.png", "4321")
