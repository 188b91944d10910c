"""Things-only data (no stuff class) is scored honestly: background is "nothing", a class of its
own in mIoU and a value of its own in semantic outputs; data with stuff is scored as before."""

from __future__ import annotations

import json

import numpy as np
import torch

from ssprompt.data.scenes import VOID, Scene
from ssprompt.evaluation.metrics import MeanIoU, SegmentationEvaluator
from ssprompt.evaluation.postprocess import Instances, Prediction

H, W = 20, 30


def _scene() -> Scene:
    """One thing (class 0) in the top-left corner; the rest is unlabelled background."""
    instance = np.zeros((H, W), np.int32)
    instance[:8, :10] = 1
    semantic = np.where(instance == 1, 0, VOID).astype(np.int32)
    return Scene(np.zeros((H, W, 3), np.uint8), semantic, instance,
                 [{"id": 1, "category": 0, "isthing": True, "area": 80}])


def _pred(mask: np.ndarray, category: int = 0, semantic_elsewhere: int = 0) -> Prediction:
    m = torch.from_numpy(mask)
    sem = torch.where(m, category, semantic_elsewhere).long()
    pan = m.long()
    segs = [{"id": 1, "category": category, "isthing": True, "score": 0.9,
             "area": int(m.sum())}] if m.any() else []
    inst = Instances(m[None] if m.any() else torch.zeros((0, H, W), dtype=torch.bool),
                     torch.tensor([category] * bool(m.any())),
                     torch.tensor([0.9] * bool(m.any()), dtype=torch.float64))
    return Prediction(sem, inst, pan, segs)


def _score(pred: Prediction, is_thing=(True, True)) -> dict:
    ev = SegmentationEvaluator(["shirt", "bag"], list(is_thing), sync=False)
    ev.update([pred], [_scene()])
    return ev.compute()


def test_a_thing_everywhere_is_penalised():
    exact = _score(_pred(_scene().instance == 1))
    everywhere = _score(_pred(np.ones((H, W), bool)))
    assert exact["mIoU"] == 100.0 and exact["nothing_IoU"] == 100.0
    # the old scoring (background void, never scored) gave this 100 too
    assert everywhere["nothing_IoU"] == 0.0
    assert everywhere["per_class"]["shirt"]["IoU"] == round(100 * 80 / (H * W), 2)
    assert everywhere["mIoU"] == round((100 * 80 / (H * W) + 0) / 2, 2)


def test_no_predicted_segment_is_all_nothing():
    # postprocess's semantic map gives every pixel some class; with no segment kept, the
    # pixels are nothing (panoptic 0), whatever the semantic argmax said
    empty = _score(_pred(np.zeros((H, W), bool), semantic_elsewhere=1))
    assert empty["per_class"]["shirt"]["IoU"] == 0.0
    assert empty["nothing_IoU"] == round(100 * (H * W - 80) / (H * W), 2)
    assert empty["per_class"]["bag"]["IoU"] is None              # no ground truth, no false pixel


def test_data_with_a_stuff_class_is_scored_as_before():
    pred = _pred(np.ones((H, W), bool))
    got = _score(pred, is_thing=(True, False))
    ref = MeanIoU(2)
    ref.update(pred.semantic, torch.from_numpy(_scene().semantic))
    assert got["mIoU"] == round(ref.compute()["mIoU"], 2) == 100.0   # void never scored
    assert "nothing_IoU" not in got


def test_semantic_png_nothing_value_and_round_trip(tmp_path):
    from PIL import Image

    from ssprompt.predict import Item, read_predictions, write_predictions

    class Stub:                      # a predictor that keeps no segment
        class_names, is_thing, agnostic, batch, object_mask_threshold = \
            ["shirt", "bag"], [True, True], False, 4, 0.5

        def predict_batch(self, images):
            return [Prediction(torch.full((H, W), -1, dtype=torch.long),
                               Instances(torch.zeros((0, H, W), dtype=torch.bool),
                                         torch.zeros(0, dtype=torch.long),
                                         torch.zeros(0, dtype=torch.float64)),
                               torch.zeros((H, W), dtype=torch.long), []) for _ in images]

    items = [Item(7, "a.png", "a", lambda: np.zeros((H, W, 3), np.uint8))]
    write_predictions(tmp_path, Stub(), items, [3, 9], {}, progress=False)
    sem = np.asarray(Image.open(tmp_path / "semantic" / "a.png"))
    assert sem.dtype == np.uint8 and (sem == 255).all()         # all "nothing", not class 1
    manifest, (pred,) = read_predictions(tmp_path)
    assert (pred.semantic == -1).all()
    assert json.loads((tmp_path / "panoptic.json").read_text())["annotations"][0]["image_id"] == 7


def test_predictor_marks_nothing_on_things_only_classes(tiny_sfm):
    from ssprompt import Predictor
    from ssprompt.predictor import NOTHING

    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    things = Predictor(tiny_sfm, class_names=["shirt", "bag"], n_prompts=10).predict(image)
    free = things.panoptic == 0
    assert (things.semantic[free] == NOTHING).all()
    assert (things.semantic[~free] >= 0).all()
    mixed = Predictor(tiny_sfm, class_names=["shirt", "grass"], is_thing=[True, False],
                      n_prompts=10).predict(image)
    assert (mixed.semantic >= 0).all()                           # stuff: no "nothing"
