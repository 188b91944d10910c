"""Metrics against hand-computed values, panopticapi's PQ rules, and torchmetrics state merging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.detection import PanopticQuality as TMPanopticQuality

from ssprompt.data.scenes import VOID, Scene
from ssprompt.evaluation.metrics import (InstanceAP50, MeanIoU, PanopticQuality, SegmentationEvaluator,
                              coco_ap50)
from ssprompt.evaluation.postprocess import postprocess
from ssprompt.sfm.base import Outputs

torch.set_num_threads(1)


def make_scene(instance: np.ndarray, segments: list[dict]) -> Scene:
    """A Scene from an instance map (0 = void) and its segments; semantic derived."""
    instance = np.asarray(instance, dtype=np.int32)
    semantic = np.full(instance.shape, VOID, np.int32)
    for s in segments:
        semantic[instance == s["id"]] = s["category"]
        s.setdefault("area", int((instance == s["id"]).sum()))
    return Scene(np.zeros(instance.shape + (3,), np.uint8), semantic, instance, segments)


def strip(width: int, runs: list[tuple[int, int, int]]) -> np.ndarray:
    """A (1, width) id map with ``value`` on [start, stop) for each (start, stop, value)."""
    m = np.zeros((1, width), np.int64)
    for a, b, v in runs:
        m[0, a:b] = v
    return m


def seg(i: int, cat: int, isthing: bool, crowd: int = 0) -> dict:
    return {"id": i, "category": cat, "isthing": isthing, "iscrowd": crowd}


# --------------------------------------------------------------------------------------- mIoU
def test_miou_hand_computed_with_ignore():
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, VOID, VOID], [2, 2, VOID, VOID]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [2, 3, 0, 3], [2, 2, 3, 3]])
    m = MeanIoU(5)
    m.update(pred, gt)
    out = m.compute()
    # class 0: 3 / (4 + 3 - 3); class 1: 4 / (4 + 5 - 4); class 2: 3 / (4 + 3 - 3); class 3 is
    # only predicted (detectron2: no IoU), class 4 absent; ignore pixels count for nothing
    assert out["per_class"][:3] == pytest.approx([75.0, 80.0, 75.0])
    assert out["per_class"][3:] == [None, None]
    assert out["mIoU"] == pytest.approx((75 + 80 + 75) / 3)


def test_miou_batched_equals_sequential_and_merge():
    torch.manual_seed(0)
    gt = torch.randint(0, 4, (4, 6, 6))
    gt[:, 0] = VOID
    pred = torch.randint(0, 4, (4, 6, 6))
    whole = MeanIoU(4)
    whole.update(pred, gt)
    a, b = MeanIoU(4), MeanIoU(4)
    a.update(pred[:2], gt[:2])
    for i in (2, 3):
        b.update(pred[i], gt[i])
    a.merge_state(b)
    assert a.compute() == whole.compute()


# --------------------------------------------------------------------------------------- AP50
def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _two_thing_scene() -> Scene:
    inst = np.zeros((10, 10), np.int32)
    inst[0:4, 0:4] = 1
    inst[5:9, 5:9] = 2
    inst[inst == 0] = 3
    return make_scene(inst, [seg(1, 0, True), seg(2, 0, True), seg(3, 2, False)])


def test_ap50_perfect_is_100():
    sc = _two_thing_scene()
    preds = [{"mask": torch.as_tensor(sc.instance == i), "category": 0, "score": s}
             for i, s in ((1, 0.9), (2, 0.3))]
    m = InstanceAP50(3)
    m.update(preds, sc)
    out = m.compute()
    assert out["AP50"] == pytest.approx(100.0)
    assert out["per_class"] == [pytest.approx(100.0), None, None]   # class 2 is stuff


def test_ap50_fp_scored_above_tp():
    # one GT; the FP (0.9) ranks above the TP (0.8): recall 0 -> 1 at precision 1/2, so the
    # interpolated precision is 1/2 at every recall threshold: AP50 = 50
    inst = np.zeros((10, 10), np.int32)
    inst[0:4, 0:4] = 1
    sc = make_scene(inst, [seg(1, 0, True)])
    preds = [{"mask": _box(10, 10, 6, 9, 6, 9), "category": 0, "score": 0.9},
             {"mask": torch.as_tensor(inst == 1), "category": 0, "score": 0.8}]
    m = InstanceAP50(1)
    m.update(preds, sc)
    assert m.compute()["AP50"] == pytest.approx(50.0)


def test_ap50_interpolation_two_gt():
    # TP 0.9, FP 0.8, TP 0.7 on two GTs: precision 1 up to recall 0.5 (51 of COCO's 101 recall
    # thresholds), then 2/3: AP50 = (51 + 50 * 2/3) / 101
    sc = _two_thing_scene()
    preds = [{"mask": torch.as_tensor(sc.instance == 1), "category": 0, "score": 0.9},
             {"mask": _box(10, 10, 0, 3, 6, 9), "category": 0, "score": 0.8},
             {"mask": torch.as_tensor(sc.instance == 2), "category": 0, "score": 0.7}]
    m = InstanceAP50(3)
    m.update(preds, sc)
    assert m.compute()["AP50"] == pytest.approx(100 * (51 + 50 * 2 / 3) / 101)


def test_ap50_iou_threshold_and_crowd():
    inst = np.zeros((10, 10), np.int32)
    inst[0:4, 0:4] = 1          # 16 px
    inst[6:10, 6:10] = 2        # crowd of class 0
    sc = make_scene(inst, [seg(1, 0, True), seg(2, 0, True, crowd=1)])
    # a detection on the crowd region (scored highest) is ignored, not a FP
    on_crowd = {"mask": torch.as_tensor(inst == 2), "category": 0, "score": 0.95}
    # 9 px inside the 16 px GT: IoU 9/16 > 0.5 -> TP
    tp = {"mask": _box(10, 10, 0, 3, 0, 3), "category": 0, "score": 0.5}
    m = InstanceAP50(1)
    m.update([on_crowd, tp], sc)
    assert m.compute()["AP50"] == pytest.approx(100.0)
    # COCO matches at IoU >= 0.5: 8 of the 16 px is a TP, 7 px (IoU 7/16) a FP
    for mask, expected in ((_box(10, 10, 0, 2, 0, 4), 100.0),
                           (_box(10, 10, 0, 1, 0, 4) | _box(10, 10, 1, 2, 0, 3), 0.0)):
        m = InstanceAP50(1)
        m.update([{"mask": mask, "category": 0, "score": 0.5}], sc)
        assert m.compute()["AP50"] == pytest.approx(expected)


def test_ap50_no_gt_instances_is_none():
    inst = np.ones((6, 6), np.int32)
    sc = make_scene(inst, [seg(1, 1, False)])
    m = InstanceAP50(2)
    m.update([{"mask": _box(6, 6, 0, 2, 0, 2), "category": 0, "score": 0.9}], sc)
    assert m.compute() == {"AP50": None, "per_class": [None, None]}


def test_ap50_no_detections_is_zero():
    sc = _two_thing_scene()
    m = InstanceAP50(3)
    m.update([], sc)
    assert m.compute() == {"AP50": 0.0, "per_class": [0.0, None, None]}


def _ap_updates() -> list[tuple[list[dict], Scene]]:
    sc = _two_thing_scene()
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(4):
        preds = []
        for j in range(3):
            y, x = torch.randint(0, 6, (2,), generator=g).tolist()
            preds.append({"mask": _box(10, 10, y, y + 4, x, x + 4), "category": 0,
                          "score": float(torch.rand(1, generator=g))})
        if k % 2:
            preds.append({"mask": torch.as_tensor(sc.instance == 1), "category": 0, "score": .5})
        out.append((preds, sc))
    return out


def test_ap50_merge_state_equals_single():
    ups = _ap_updates()
    whole, a, b = InstanceAP50(3), InstanceAP50(3), InstanceAP50(3)
    for i, (p, sc) in enumerate(ups):
        whole.update(p, sc)
        (a if i < 2 else b).update(p, sc)
    expected = whole.compute()
    assert 0 < expected["AP50"] < 100
    b.merge_state(a)            # incoming state goes first: a's images, then b's
    assert b.compute() == expected


def _fake_sync(metric, other):
    """Run torchmetrics' own ``_sync_dist`` on ``metric`` as rank 0 of two, ``other`` being
    rank 1: a stand-in all_gather that returns both ranks' (pre-concatenated) states."""
    from torchmetrics.utilities import dim_zero_cat

    theirs = []
    for attr, fn in other._reductions.items():
        v = getattr(other, attr)
        if isinstance(v, list):
            v = [dim_zero_cat(v)] if len(v) > 1 else (v or [torch.tensor([])])
            theirs += v
        else:
            theirs.append(v)
    it = iter(theirs)
    metric._sync_dist(dist_sync_fn=lambda t, group=None: [t, next(it)])


def test_ap50_distributed_sync_path():
    ups = _ap_updates()
    whole, a, b, empty = InstanceAP50(3), InstanceAP50(3), InstanceAP50(3), InstanceAP50(3)
    for i, (p, sc) in enumerate(ups):
        whole.update(p, sc)
        (a if i < 2 else b).update(p, sc)
    _fake_sync(a, b)
    assert a.compute() == whole.compute()
    c = InstanceAP50(3)
    for p, sc in ups:
        c.update(p, sc)
    _fake_sync(c, empty)        # a rank that saw no image
    assert c.compute() == whole.compute()


# ----------------------------------------------------------------------------------------- PQ
def _pq(gt: Scene, pred_map: np.ndarray, pred_segs: list[dict], is_thing: list[bool]) -> dict:
    m = PanopticQuality(is_thing)
    m.update(torch.as_tensor(pred_map), pred_segs, gt)
    return m.compute()


def _tm_pq(gt: Scene, pred_map: np.ndarray, pred_segs: list[dict], is_thing: list[bool]
           ) -> float:
    """torchmetrics' PQ (percent) on the same data; void -> an unknown category."""
    void = len(is_thing) + 10

    def encode(id_map: np.ndarray, segs: list[dict]) -> torch.Tensor:
        out = np.stack([np.full(id_map.shape, void), np.zeros(id_map.shape)], -1)
        for s in segs:
            out[id_map == s["id"]] = (s["category"], s["id"])
        return torch.as_tensor(out, dtype=torch.long)[None]

    tm = TMPanopticQuality(things={c for c, t in enumerate(is_thing) if t},
                           stuffs={c for c, t in enumerate(is_thing) if not t},
                           allow_unknown_preds_category=True)
    tm.update(encode(pred_map, pred_segs), encode(gt.instance, gt.segments))
    return 100 * float(tm.compute())


def test_pq_hand_computed():
    is_thing = [True, False, True]       # class 2 appears nowhere: left out of the averages
    gt = make_scene(strip(80, [(0, 20, 1), (20, 40, 2), (40, 60, 3)]),   # [60, 80) void
                    [seg(1, 0, True), seg(2, 0, True), seg(3, 1, False)])
    pred = strip(80, [(0, 11, 1), (60, 63, 1),     # p1: 11 px of A + 3 void px
                      (21, 30, 2),                 # p2: 9 px of B -> IoU 0.45
                      (30, 60, 3),                 # p3 stuff: 20 px of S + 10 of B
                      (15, 20, 4), (63, 73, 4)])   # p4: 10 of its 15 px on void
    segs = [seg(1, 0, True), seg(2, 0, True), seg(3, 1, False), seg(4, 0, True)]
    out = _pq(gt, pred, segs, is_thing)
    # p1/A: IoU 11 / (14 + 20 - 11 - 3) = 0.55 -> TP (0.478 if void stayed in the union)
    # p2/B: 9 / 20 = 0.45 -> FP p2, FN B; p4: 10/15 on void -> not a FP
    # p3/S: 20 / (30 + 20 - 20) = 2/3 -> TP
    pq0, pq1 = 0.55 / (1 + 0.5 + 0.5), 2 / 3
    assert out["per_class"] == [pytest.approx(100 * pq0), pytest.approx(100 * pq1), None]
    assert out["PQ"] == pytest.approx(100 * (pq0 + pq1) / 2)
    assert out["SQ"] == pytest.approx(100 * (0.55 + 2 / 3) / 2)
    assert out["RQ"] == pytest.approx(100 * (0.5 + 1) / 2)
    assert out["PQ_th"] == pytest.approx(100 * pq0)
    assert out["PQ_st"] == pytest.approx(100 * pq1)


def test_pq_crowd_follows_panopticapi():
    # a crowd region of class 0 and one normal instance; p1 (class 0) lies on the crowd: not
    # matched, not a FP, and the crowd is no FN; p3 (class 1) on the crowd of class 0 is a FP
    is_thing = [True, True]
    gt = make_scene(strip(40, [(0, 20, 1), (20, 40, 2)]),
                    [seg(1, 0, True, crowd=1), seg(2, 0, True)])
    pred = strip(40, [(0, 10, 1), (10, 20, 3), (20, 40, 2)])
    segs = [seg(1, 0, True), seg(2, 0, True), seg(3, 1, True)]
    out = _pq(gt, pred, segs, is_thing)
    assert out["per_class"] == [pytest.approx(100.0), pytest.approx(0.0)]
    assert out["PQ"] == pytest.approx(50.0)
    # torchmetrics has no crowd: the region is an ordinary segment, p1 (IoU 0.5) a FP, it a FN
    assert _tm_pq(gt, pred, segs, is_thing) == pytest.approx(25.0)


def test_pq_void_union_follows_panopticapi():
    # A (8 px) half predicted by p1, half predicted void. panopticapi: IoU 4/8 = 0.5, no match
    # (FN + FP), PQ 50 with the stuff class. torchmetrics also takes A's predicted-void pixels
    # out of the union: IoU 1, PQ 100
    is_thing = [True, False]
    gt = make_scene(strip(10, [(0, 8, 1), (8, 10, 2)]), [seg(1, 0, True), seg(2, 1, False)])
    pred = strip(10, [(0, 4, 1), (8, 10, 2)])
    segs = [seg(1, 0, True), seg(2, 1, False)]
    out = _pq(gt, pred, segs, is_thing)
    assert out["per_class"] == [pytest.approx(0.0), pytest.approx(100.0)]
    assert out["PQ"] == pytest.approx(50.0)
    assert _tm_pq(gt, pred, segs, is_thing) == pytest.approx(100.0)


def test_pq_unmatched_gt_predicted_void_is_fn():
    # A is wholly predicted void: panopticapi counts a FN (class 0 PQ 0, PQ 50); torchmetrics
    # skips it, leaving class 0 out of the average (PQ 100)
    is_thing = [True, False]
    gt = make_scene(strip(10, [(0, 8, 1), (8, 10, 2)]), [seg(1, 0, True), seg(2, 1, False)])
    pred = strip(10, [(8, 10, 2)])
    segs = [seg(2, 1, False)]
    out = _pq(gt, pred, segs, is_thing)
    assert out["per_class"] == [pytest.approx(0.0), pytest.approx(100.0)]
    assert out["PQ"] == pytest.approx(50.0)
    assert _tm_pq(gt, pred, segs, is_thing) == pytest.approx(100.0)


def test_pq_stuff_segments_not_merged():
    # two predicted segments of one stuff class: panopticapi matches the larger (IoU 0.6) and
    # counts the other as a FP (class 1 PQ 0.6 / 1.5); torchmetrics merges them (IoU 1)
    is_thing = [True, False]
    gt = make_scene(strip(20, [(0, 10, 1), (10, 20, 2)]), [seg(1, 1, False), seg(2, 0, True)])
    pred = strip(20, [(0, 6, 1), (6, 10, 2), (10, 20, 3)])
    segs = [seg(1, 1, False), seg(2, 1, False), seg(3, 0, True)]
    out = _pq(gt, pred, segs, is_thing)
    assert out["per_class"] == [pytest.approx(100.0), pytest.approx(40.0)]
    assert out["PQ"] == pytest.approx(70.0)
    assert _tm_pq(gt, pred, segs, is_thing) == pytest.approx(100.0)


def _random_panoptic(cats: np.ndarray, is_thing: list[bool], shift: int
                     ) -> tuple[np.ndarray, list[dict]]:
    """A 12x12 map of 3x3 blocks (4 px, shifted) of categories ``cats``: no void, one segment
    per stuff class."""
    m = np.zeros((12, 12), np.int64)
    segs, stuff_id = [], {}
    for by in range(3):
        for bx in range(3):
            c = int(cats[by, bx])
            if not is_thing[c] and c in stuff_id:
                i = stuff_id[c]
            else:
                i = len(segs) + 1
                segs.append(seg(i, c, is_thing[c]))
                if not is_thing[c]:
                    stuff_id[c] = i
            y, x = max(0, by * 4 + shift), max(0, bx * 4 + shift)
            m[y:by * 4 + 4 + shift, x:bx * 4 + 4 + shift] = i
    m[m == 0] = m.max()            # no void: fill the shifted-out border
    present = set(np.unique(m).tolist())
    return m, [s for s in segs if s["id"] in present]


def _random_pair(rng: np.random.Generator, is_thing: list[bool]):
    """Ground truth and a prediction: blocks shifted by up to a pixel, one block relabelled as
    a thing."""
    cats = rng.integers(0, len(is_thing), size=(3, 3))
    gmap, gsegs = _random_panoptic(cats, is_thing, 0)
    cats = cats.copy()
    cats[tuple(rng.integers(0, 3, 2))] = rng.choice([c for c, t in enumerate(is_thing) if t])
    pmap, psegs = _random_panoptic(cats, is_thing, int(rng.integers(-1, 2)))
    return gmap, gsegs, pmap, psegs


def test_pq_agrees_with_torchmetrics_without_void_crowd():
    rng = np.random.default_rng(0)
    is_thing = [True, True, False, False]
    ours = PanopticQuality(is_thing)
    values = []
    for _ in range(8):
        gmap, gsegs, pmap, psegs = _random_pair(rng, is_thing)
        gt = make_scene(gmap, gsegs)
        values.append(_pq(gt, pmap, psegs, is_thing)["PQ"])
        assert values[-1] == pytest.approx(_tm_pq(gt, pmap, psegs, is_thing))
        ours.update(torch.as_tensor(pmap), psegs, gt)
    assert len(set(np.round(values, 6))) > 3          # the cases are not all alike
    assert 0 < ours.compute()["PQ"] < 100


def test_pq_merge_state_equals_single():
    rng = np.random.default_rng(1)
    is_thing = [True, True, False, False]
    data = []
    for _ in range(4):
        gmap, gsegs, pmap, psegs = _random_pair(rng, is_thing)
        data.append((torch.as_tensor(pmap), psegs, make_scene(gmap, gsegs)))
    whole, a, b = (PanopticQuality(is_thing) for _ in range(3))
    for i, d in enumerate(data):
        whole.update(*d)
        (a if i % 2 else b).update(*d)
    a.merge_state(b)
    for k in ("tp", "fp", "fn", "iou"):
        assert torch.allclose(getattr(a, k), getattr(whole, k))
    assert a.compute()["PQ"] == pytest.approx(whole.compute()["PQ"])


# ---------------------------------------------------------------------------------- evaluator
def _perfect_outputs(scene: Scene, num_classes: int, down: int = 1) -> Outputs:
    """One query per GT segment, mask logits +-10 at 1/``down`` resolution, confident class."""
    masks, labels = [], []
    for s in scene.segments:
        m = torch.as_tensor(scene.instance == s["id"]).float() * 20 - 10
        masks.append(m[::down, ::down])
        labels.append(s["category"])
    masks.append(torch.full_like(masks[0], -10.0))   # an idle "no object" query
    labels.append(num_classes)
    cls = torch.full((len(labels), num_classes + 1), -10.0)
    cls[torch.arange(len(labels)), torch.tensor(labels)] = 10.0
    return Outputs(torch.stack(masks)[None], cls[None])


def _predict(outputs: Outputs, scene: Scene, is_thing: list[bool], threshold: float = 0.8):
    """Post-processed predictions of ``outputs`` for ``[scene]`` (the SFM's input is the
    scene's own square)."""
    return postprocess(outputs, [scene.semantic.shape], scene.semantic.shape[0], is_thing,
                       threshold)


def _evaluator_scene() -> Scene:
    inst = np.zeros((8, 8), np.int32)
    inst[:, :4] = 1                        # stuff class 2
    inst[:, 4:] = 2                        # stuff class 3
    inst[0:4, 0:2] = 3                     # thing class 0
    inst[4:8, 4:6] = 4                     # thing class 1
    return make_scene(inst, [seg(1, 2, False), seg(2, 3, False), seg(3, 0, True),
                             seg(4, 1, True)])


@pytest.mark.parametrize("down", [1, 2])
def test_evaluator_perfect(down):
    names, is_thing = ["a", "b", "s", "t", "unused"], [True, True, False, False, True]
    sc = _evaluator_scene()
    ev = SegmentationEvaluator(names, is_thing)
    ev.update(_predict(_perfect_outputs(sc, 5, down), sc, is_thing), [sc])
    out = ev.compute()
    for k in ("mIoU", "AP50", "PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert out[k] == 100.0, k
    assert out["per_class"]["unused"] == {"IoU": None, "AP50": None, "PQ": None,
                                          "isthing": True}
    assert out["per_class"]["s"]["AP50"] is None and out["per_class"]["s"]["PQ"] == 100.0
    ev.reset()
    ev.update(_predict(_perfect_outputs(sc, 5, down), sc, is_thing), [sc])
    assert ev.compute()["PQ"] == 100.0


def test_evaluator_stuff_only_and_class_agnostic():
    sc = _evaluator_scene()
    stuff = make_scene(np.select([sc.instance == 3, sc.instance == 4], [1, 2], sc.instance),
                       [seg(1, 0, False), seg(2, 1, False)])
    ev = SegmentationEvaluator(["s", "t"], [False, False])
    ev.update(_predict(_perfect_outputs(stuff, 2), stuff, [False, False]), [stuff])
    out = ev.compute()
    assert out["AP50"] is None and out["PQ_th"] is None
    assert out["mIoU"] == 100.0 and out["PQ"] == out["PQ_st"] == 100.0



# --------------------------------------------------------------------------- class-agnostic
def _agnostic_outputs(boxes: list[tuple[int, int, int, int]], object_logit: list[float]
                      ) -> Outputs:
    """A class-agnostic SFM's outputs on an 8 x 8 scene: one query per box, class logits
    (object, no object) = (``object_logit``, 0)."""
    masks = torch.full((len(boxes), 8, 8), -10.0)
    for q, (y0, y1, x0, x1) in enumerate(boxes):
        masks[q, y0:y1, x0:x1] = 10.0
    cls = torch.tensor([[v, 0.0] for v in object_logit])
    return Outputs(masks[None], cls[None])


def _score_agnostic(outputs: Outputs) -> dict:
    from ssprompt.evaluation.evaluate import AGNOSTIC_IS_THING, AGNOSTIC_NAMES, object_vs_background
    from ssprompt.evaluation.postprocess import with_background

    sc = object_vs_background(_evaluator_scene())
    ev = SegmentationEvaluator(AGNOSTIC_NAMES, AGNOSTIC_IS_THING)
    ev.update([with_background(p) for p in _predict(outputs, sc, [True])], [sc])
    return ev.compute()


def test_class_agnostic_hand_computed():
    # ground truth: objects A (rows 0-4, cols 0-2) and B (rows 4-8, cols 4-6), 8 px each; the
    # other 48 px are background (stuff). q0 finds A; q1 (less sure) claims 16 background px
    # (rows 0-4, cols 4-8); B is missed. Predicted background: the 40 px no query claims.
    out = _score_agnostic(_agnostic_outputs([(0, 4, 0, 2), (0, 4, 4, 8)], [9.0, 4.0]))
    # object: TP 8, FP 16, FN 8 -> 8 / 32; background: 32 / (48 + 40 - 32)
    assert out["per_class"]["object"]["IoU"] == 25.0
    assert out["per_class"]["background"]["IoU"] == round(100 * 32 / 56, 2)
    assert out["mIoU"] == round(100 * (8 / 32 + 32 / 56) / 2, 2)
    # AP50: the TP ranks first, the FP second, B never found: precision 1 up to recall 0.5
    assert out["AP50"] == round(100 * 51 / 101, 2)
    # PQ: object TP (IoU 1) + FP + FN -> 1 / 2; background IoU 32 / 56 > 0.5 -> TP
    assert out["PQ_th"] == 50.0 and out["PQ_st"] == round(100 * 32 / 56, 2)
    assert out["PQ"] == round(100 * (0.5 + 32 / 56) / 2, 2)


def test_class_agnostic_scores_bad_predictions_low_and_perfect_ones_100():
    claim_all = _score_agnostic(_agnostic_outputs([(0, 8, 0, 8)], [9.0]))
    assert claim_all["mIoU"] == 12.5          # object 16 / 64, background 0
    claim_none = _score_agnostic(_agnostic_outputs([(0, 8, 0, 8)], [-9.0]))
    assert claim_none["mIoU"] == 37.5         # object 0, background 48 / 64
    assert claim_none["AP50"] == 0.0 and claim_none["PQ_th"] == 0.0
    perfect = _score_agnostic(_agnostic_outputs([(0, 4, 0, 2), (4, 8, 4, 6)], [9.0, 9.0]))
    assert perfect["mIoU"] == perfect["AP50"] == perfect["PQ"] == 100.0


def test_class_agnostic_random_prompts_score_well_below_100():
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.evaluation.evaluate import evaluate
    from ssprompt.sfm.embedded import EmbeddedSFM

    torch.manual_seed(0)
    sfm = EmbeddedSFM(embed_dim=32, mask_dim=16, layers=1).eval()
    out = evaluate(sfm, torch.randn(16, 32), None, SceneSplit("shift", "test", n=4))
    assert set(out["per_class"]) == {"object", "background"}
    assert out["mIoU"] < 70 and out["PQ"] < 70, out


def test_evaluator_panoptic_threshold_keeps_unsure_queries():
    # every query's top class has probability ~0.6 (the rest spread over a look-alike class):
    # Mask2Former's 0.8 cut drops them all, the embedded SFM's 0.4 keeps them
    names, is_thing = ["a", "b", "s", "t", "unused"], [True, True, False, False, True]
    sc = _evaluator_scene()
    out = _perfect_outputs(sc, 5)
    cls = out.class_logits[0]
    real = cls[:, :5].argmax(1)
    unsure = torch.full_like(cls, -10.0)
    unsure[torch.arange(len(cls)), real] = 0.4055    # softmax: 0.6 vs 0.4
    unsure[torch.arange(len(cls)), 4] = 0.0
    unsure[-1] = cls[-1]                               # the idle query stays "no object"
    out = Outputs(out.mask_logits, unsure[None])
    strict = SegmentationEvaluator(names, is_thing)
    lenient = SegmentationEvaluator(names, is_thing)
    strict.update(_predict(out, sc, is_thing), [sc])
    lenient.update(_predict(out, sc, is_thing, 0.4), [sc])
    assert strict.compute()["PQ"] == 0.0
    assert lenient.compute()["PQ"] == 100.0
    assert strict.compute()["mIoU"] == lenient.compute()["mIoU"] == 100.0


def test_evaluate_uses_the_sfms_own_threshold(tmp_path, monkeypatch):
    import ssprompt.evaluation.evaluate as E
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.prompts.semantic import default_semantic
    from ssprompt.prompts.spatial import default_spatial
    from ssprompt.sfm.embedded import OBJECT_MASK_THRESHOLD, EmbeddedSFM, load_embedded

    assert EmbeddedSFM().object_mask_threshold == OBJECT_MASK_THRESHOLD < 0.8
    model = EmbeddedSFM(embed_dim=32, mask_dim=16, layers=1, object_mask_threshold=0.3)
    model.save(tmp_path / "w.safetensors")
    sfm = load_embedded(tmp_path / "w.safetensors")
    assert sfm.object_mask_threshold == 0.3           # travels with the weights
    seen = []
    real = E.postprocess
    monkeypatch.setattr(E, "postprocess", lambda *a: seen.append(a[-1]) or real(*a))
    data = SceneSplit("shift", "test", n=1)
    E.evaluate(sfm, default_spatial(sfm, 4), default_semantic(sfm, data.class_names), data)
    assert seen == [0.3]


def test_ap50_ground_truth_is_complete_coco(monkeypatch):
    # pycocotools 2.0.10's loadRes copies the ground truth's "info" and fails without it (seen
    # on a GPU machine); stand in for that version here and check AP50 still computes
    from pycocotools.coco import COCO

    original = COCO.loadRes

    def strict_load_res(self, res):
        assert "info" in self.dataset, "ground truth lacks 'info'"
        return original(self, res)

    monkeypatch.setattr(COCO, "loadRes", strict_load_res)
    inst = np.zeros((10, 10), np.int32)
    inst[0:4, 0:4] = 1
    m = InstanceAP50(1)
    m.update([{"mask": torch.as_tensor(inst == 1), "category": 0, "score": 0.9}],
             make_scene(inst, [seg(1, 0, True)]))
    assert coco_ap50(*m._coco(), 1, library="pycocotools")[0] == pytest.approx(1.0)


# ------------------------------------------------------- the field's libraries as references
def _pycocotools_stats1(images: list[dict], gts: list[dict], dts: list[dict], c: int) -> float:
    """pycocotools' own AP50: ``COCOeval.summarize()``'s ``stats[1]`` with default settings."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"info": {}, "images": images, "annotations": gts,
                      "categories": [{"id": k + 1, "name": str(k)} for k in range(c)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dts), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def _crowd_fixture(seed: int) -> InstanceAP50:
    """Random scenes of 3 thing classes, some instances crowd, with jittered, relabelled and
    spurious detections, as an InstanceAP50 state."""
    rng = np.random.default_rng(seed)
    m = InstanceAP50(3)
    for _ in range(6):
        inst = np.zeros((24, 24), np.int32)
        segs = []
        for i in range(1, 6):
            y, x, h, w = rng.integers(0, 18, 2).tolist() + rng.integers(3, 7, 2).tolist()
            inst[y:y + h, x:x + w] = i
            segs.append(seg(i, int(rng.integers(0, 3)), True, crowd=int(rng.random() < 0.25)))
        segs = [s for s in segs if (inst == s["id"]).any()]
        preds = []
        for s in segs + segs[:2]:
            mask = np.roll(inst == s["id"], tuple(rng.integers(-2, 3, 2)), (0, 1))
            cat = s["category"] if rng.random() < 0.8 else int(rng.integers(0, 3))
            preds.append({"mask": torch.as_tensor(mask), "category": cat,
                          "score": float(rng.random())})
        m.update(preds, make_scene(inst, segs))
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_hotcoco_equals_pycocotools(seed):
    from ssprompt.evaluation.metrics import coco_ap50

    m = _crowd_fixture(seed)
    images, gts, dts = m._coco()
    assert any(g["iscrowd"] for g in gts)
    ours, per_class = coco_ap50(images, gts, dts, 3)
    ref, ref_per_class = coco_ap50(images, [dict(g) for g in gts], [
        {k: v for k, v in d.items() if k in ("image_id", "category_id", "score", "segmentation")}
        for d in dts], 3, library="pycocotools")
    assert 0 < ours < 1 and abs(ours - ref) <= 1e-9
    assert per_class == pytest.approx(ref_per_class, abs=1e-9)
    assert abs(ours - _pycocotools_stats1(*m._coco(), 3)) <= 1e-9


def _hotcoco_pq(tmp_path, gt: Scene, pred_map: np.ndarray, pred_segs: list[dict],
                is_thing: list[bool]) -> dict:
    """hotcoco's panopticapi ``pq_compute`` on the case written as COCO panoptic PNG + JSON."""
    import contextlib
    import io
    import json

    from hotcoco.panoptic import pq_compute
    from PIL import Image

    def write(name: str, id_map: np.ndarray, segs: list[dict]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        ids = np.asarray(id_map, np.uint32)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / "1.png")
        info = [{"id": s["id"], "category_id": s["category"] + 1,
                 "iscrowd": int(s.get("iscrowd", 0)), "area": int((id_map == s["id"]).sum())}
                for s in segs if (id_map == s["id"]).any()]
        h, w = ids.shape
        doc = {"images": [{"id": 1, "file_name": "1.png", "height": h, "width": w}],
               "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": info}],
               "categories": [{"id": c + 1, "name": str(c), "isthing": int(t)}
                              for c, t in enumerate(is_thing)]}
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        return folder

    gf, pf = write("gt", gt.instance, gt.segments), write("pred", pred_map, pred_segs)
    with contextlib.redirect_stdout(io.StringIO()):
        return pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"),
                          gt_folder=str(gf), pred_folder=str(pf))


def _hand_made_cases():
    """The PQ cases above (crowd, void, stuff instance ids, predicted void), as
    (gt, pred map, pred segments, is_thing)."""
    yield (make_scene(strip(80, [(0, 20, 1), (20, 40, 2), (40, 60, 3)]),
                      [seg(1, 0, True), seg(2, 0, True), seg(3, 1, False)]),
           strip(80, [(0, 11, 1), (60, 63, 1), (21, 30, 2), (30, 60, 3), (15, 20, 4),
                      (63, 73, 4)]),
           [seg(1, 0, True), seg(2, 0, True), seg(3, 1, False), seg(4, 0, True)],
           [True, False, True])
    yield (make_scene(strip(40, [(0, 20, 1), (20, 40, 2)]),
                      [seg(1, 0, True, crowd=1), seg(2, 0, True)]),
           strip(40, [(0, 10, 1), (10, 20, 3), (20, 40, 2)]),
           [seg(1, 0, True), seg(2, 0, True), seg(3, 1, True)], [True, True])
    two = make_scene(strip(10, [(0, 8, 1), (8, 10, 2)]), [seg(1, 0, True), seg(2, 1, False)])
    yield two, strip(10, [(0, 4, 1), (8, 10, 2)]), [seg(1, 0, True), seg(2, 1, False)], \
        [True, False]
    yield two, strip(10, [(8, 10, 2)]), [seg(2, 1, False)], [True, False]
    yield (make_scene(strip(20, [(0, 10, 1), (10, 20, 2)]), [seg(1, 1, False), seg(2, 0, True)]),
           strip(20, [(0, 6, 1), (6, 10, 2), (10, 20, 3)]),
           [seg(1, 1, False), seg(2, 1, False), seg(3, 0, True)], [True, False])
    rng = np.random.default_rng(0)
    for _ in range(3):
        gmap, gsegs, pmap, psegs = _random_pair(rng, [True, True, False, False])
        yield make_scene(gmap, gsegs), pmap, psegs, [True, True, False, False]


def test_pq_equals_panopticapi_via_hotcoco(tmp_path):
    for i, (gt, pmap, psegs, is_thing) in enumerate(_hand_made_cases()):
        folder = tmp_path / str(i)
        folder.mkdir()
        ref = _hotcoco_pq(folder, gt, pmap, psegs, is_thing)
        ours = _pq(gt, pmap, psegs, is_thing)
        for key, part in (("PQ", "All"), ("PQ_th", "Things"), ("PQ_st", "Stuff")):
            want = None if ref[part]["n"] == 0 else 100 * ref[part]["pq"]
            assert ours[key] == pytest.approx(want, abs=1e-9), (i, key)
        assert ours["SQ"] == pytest.approx(100 * ref["All"]["sq"], abs=1e-9)
        assert ours["RQ"] == pytest.approx(100 * ref["All"]["rq"], abs=1e-9)
        for c, v in enumerate(ours["per_class"]):
            if v is not None:
                assert v == pytest.approx(100 * ref["per_class"][c + 1]["pq"], abs=1e-9), (i, c)


# --------------------------------------------------------------------------- evaluate_many
def test_evaluate_many_equals_one_set_at_a_time():
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.evaluation.evaluate import evaluate, evaluate_many
    from ssprompt.sfm.features import FeatureCache
    from ssprompt.sfm.embedded import EmbeddedSFM

    torch.manual_seed(0)
    sfm = EmbeddedSFM(embed_dim=32, mask_dim=16, layers=1, object_mask_threshold=0.05).eval()
    data = SceneSplit("shift", "test", n=5)
    c = len(data.class_names)
    sets = [(torch.randn(8, 32), torch.randn(c, 32)) for _ in range(3)]
    cache = FeatureCache()
    together = evaluate_many(sfm, sets, data, cache, batch=2)
    alone = [evaluate(sfm, sp, se, data, cache, batch=3) for sp, se in sets]
    assert together == alone
    assert len({(m["mIoU"], m["PQ"]) for m in alone}) == 3        # the sets really differ
    with pytest.raises(ValueError, match="with and without"):
        evaluate_many(sfm, [sets[0], (sets[1][0], None)], data, cache)
