"""The paired bootstrap: hand-made cases, and metrics recomputed on resampled image sets against
the metrics (and pycocotools) run on those image sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssprompt.evaluation import bootstrap as bs
from ssprompt.data.scenes import VOID, Scene
from ssprompt.evaluation.metrics import SegmentationEvaluator, coco_ap50
from ssprompt.evaluation.postprocess import Instances, Prediction

torch.set_num_threads(1)
IS_THING = [True, True, False]   # two thing classes, one stuff class


# -------------------------------------------------------------------- hand-made intervals
def test_identical_rows_give_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(0)
    row = rng.normal(50, 5, size=(3, 400))
    iv = bs.paired_interval(row, row.copy(), (50.0, 50.0), bs.seed_draws(3, 400))
    assert (iv.delta, iv.lo, iv.hi) == (0.0, 0.0, 0.0)
    assert not iv.excludes_zero


def test_constant_shift_gives_that_shift():
    rng = np.random.default_rng(1)
    base = rng.normal(40, 8, size=(3, 400))
    iv = bs.paired_interval(base + 2.5, base, (42.5, 40.0), bs.seed_draws(3, 400))
    assert iv.delta == pytest.approx(2.5)
    assert iv.lo == pytest.approx(2.5) and iv.hi == pytest.approx(2.5)
    assert iv.excludes_zero and str(iv).endswith("*")


def test_seed_spread_widens_the_interval():
    """Seeds that disagree (one seed +6, two seeds -1) leave the sign undecided; the same
    mean difference on every seed is decided."""
    base = np.zeros((3, 500))
    mixed = bs.paired_interval(base + np.array([[6.0], [-1.0], [-1.0]]), base,
                               (4 / 3, 0.0), bs.seed_draws(3, 500))
    steady = bs.paired_interval(base + 4 / 3, base, (4 / 3, 0.0), bs.seed_draws(3, 500))
    assert mixed.lo < 0 < mixed.hi and not mixed.excludes_zero
    assert steady.excludes_zero


# ------------------------------------------------------- metrics of resampled image sets
def _scene(rng: np.random.Generator) -> Scene:
    """16 x 16: stuff (class 2) background, two thing instances (classes 0 and 1), a void
    corner, sometimes a crowd region of class 0."""
    inst = np.full((16, 16), 1, np.int32)
    segs = [{"id": 1, "category": 2, "isthing": False, "iscrowd": 0}]
    for k, cat in ((2, 0), (3, 1)):
        y, x = rng.integers(0, 10, 2)
        inst[y:y + 5, x:x + 5] = k
        segs.append({"id": k, "category": cat, "isthing": True, "iscrowd": 0})
    if rng.random() < 0.5:
        inst[12:16, 0:4] = 4
        segs.append({"id": 4, "category": 0, "isthing": True, "iscrowd": 1})
    inst[0:2, 14:16] = 0
    sem = np.full(inst.shape, VOID, np.int32)
    for s in segs:
        sem[inst == s["id"]] = s["category"]
        s["area"] = int((inst == s["id"]).sum())
    segs = [s for s in segs if s["area"] > 0]
    return Scene(np.zeros((16, 16, 3), np.uint8), sem, inst, segs)


def _prediction(scene: Scene, rng: np.random.Generator, quality: float) -> Prediction:
    """A noisy copy of the truth: each segment shifted by up to 3 pixels (less with higher
    ``quality``), some classes swapped, random scores."""
    sem = torch.full((16, 16), 2, dtype=torch.long)
    pan = torch.zeros((16, 16), dtype=torch.long)
    segments, masks, cats, scores = [], [], [], []
    for s in scene.segments:
        m = torch.as_tensor(scene.instance == s["id"])
        shift = 0 if rng.random() < quality else int(rng.integers(1, 4))
        m = torch.roll(m, shifts=(shift, shift), dims=(0, 1))
        cat = s["category"] if rng.random() < 0.5 + quality / 2 else int(rng.integers(0, 3))
        sid = len(segments) + 1
        pan[m] = sid
        sem[m] = cat
        segments.append({"id": sid, "category": cat, "isthing": IS_THING[cat], "score": 0.9})
        if IS_THING[cat]:
            masks.append(m)
            cats.append(cat)
            scores.append(float(rng.random()))
    inst = Instances(torch.stack(masks) if masks else torch.zeros(0, 16, 16, dtype=torch.bool),
                     torch.tensor(cats, dtype=torch.long), torch.tensor(scores))
    segments = [s | {"area": int((pan == s["id"]).sum())} for s in segments]
    return Prediction(sem, inst, pan, [s for s in segments if s["area"]])


def _evaluate(pairs: list[tuple[Prediction, Scene]], per_image: bool = False) -> dict:
    ev = SegmentationEvaluator(["a", "b", "stuff"], IS_THING, sync=False, per_image=per_image)
    for pred, scene in pairs:
        ev.update([pred], [scene])
    return ev.compute()


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(3)
    scenes = [_scene(rng) for _ in range(8)]
    return [(_prediction(s, rng, 0.6), s) for s in scenes]


def test_all_ones_weights_reproduce_the_metrics(pairs):
    m = _evaluate(pairs, per_image=True)
    stats = bs.PerImage.from_bytes(m["per_image"].to_bytes())   # through the cell-file format
    ones = np.ones((1, len(pairs)))
    for name, fn in bs.METRIC_FNS.items():
        assert fn(stats, ones)[0] == pytest.approx(m[name], abs=0.005), name
    assert 0 < m["mIoU"] < 100 and 0 < m["PQ"] < 100 and 0 < m["AP50"] < 100


@pytest.mark.parametrize("counts", [[2, 0, 1, 1, 0, 3, 1, 0], [0, 0, 0, 1, 1, 0, 4, 2]])
def test_resample_equals_the_metric_on_the_resampled_images(pairs, counts):
    """An image drawn k times counts k times: the bootstrap's numbers equal the evaluator's
    (and, for AP50, pycocotools') on the image multiset itself."""
    stats = _evaluate(pairs, per_image=True)["per_image"]
    multiset = [p for p, k in zip(pairs, counts) for _ in range(k)]
    direct = _evaluate(multiset)
    w = np.array([counts], dtype=float)
    for name, fn in bs.METRIC_FNS.items():
        assert fn(stats, w)[0] == pytest.approx(direct[name], abs=0.005), name
    # AP50 unrounded, against pycocotools on the multiset
    ev = SegmentationEvaluator(["a", "b", "stuff"], IS_THING, sync=False)
    for pred, scene in multiset:
        ev.update([pred], [scene])
    ref, _ = coco_ap50(*ev.ap._coco(), 3, library="pycocotools")
    assert bs.ap50(stats, w)[0] == pytest.approx(100 * ref, abs=1e-9)


def test_bad_predictions_are_detected_as_worse(pairs):
    """A row whose predictions are much worse on every image gets an interval below zero for
    every metric; the row against itself does not."""
    rng = np.random.default_rng(4)
    bad = [(_prediction(s, rng, 0.0), s) for _, s in pairs] * 4
    good = [(_prediction(s, rng, 1.0), s) for _, s in pairs] * 4
    sb, sg = (_evaluate(x, per_image=True)["per_image"] for x in (bad, good))
    w = bs.image_weights(len(good), 300)
    draws = bs.seed_draws(1, 300)
    for name, fn in bs.METRIC_FNS.items():
        vb, vg = fn(sb, w)[None], fn(sg, w)[None]
        worse = bs.paired_interval(vb, vg, (float(vb.mean()), float(vg.mean())), draws)
        assert worse.hi < 0, name
        same = bs.paired_interval(vg, vg, (0.0, 0.0), draws)
        assert not same.excludes_zero
