"""Held-out-shot selection (never silently worse than the default prompts), images of any size,
many classes, bounded caches and bad input of real data."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, save_tiny_embedded, ssprompt
from ssprompt.data.coco import CocoDataset, export_coco
from ssprompt.data.coins import CoinsSplit
from ssprompt.data.scenes import VOID, Scene
from ssprompt.engine.cell import CellSpec, Workspace, run_cell
from ssprompt.sfm.features import FeatureCache
from ssprompt.geometry import letterbox_labels, letterbox_shape, unletterbox
from ssprompt.lru import LRUCache
from ssprompt.prompts.promptset import PromptConfig
from ssprompt.engine.selection import (SelectionConfig, decide, folds, maxt_pvalues,
                                       sign_flips)
from ssprompt.errors import UserError
from ssprompt.engine.train import TrainConfig

METRICS = ("mIoU", "AP50", "PQ", "SQ", "RQ", "PQ_th", "PQ_st")


def ok(r):
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def committed_ws():
    from ssprompt.sfm import load_sfm

    return Workspace(load_sfm("embedded", None, "cpu"))


@pytest.fixture(scope="module")
def coins_root(tmp_path_factory) -> Path:
    """Real photographs of several non-square sizes in one COCO split (train 8, test 12)."""
    root = tmp_path_factory.mktemp("coins")
    for split in ("train", "test"):
        export_coco(CoinsSplit(split), root, split)
    return root


# ------------------------------------------------------------------------------- selection
def test_folds_hold_out_every_shot_once():
    for k in (2, 3, 4, 5, 8, 15, 16, 32):         # cross-fitted: min(k, 4) folds
        cv = folds(k, 0, 0.25)
        assert len(cv) == min(k, 4) and sorted(i for _, h in cv for i in h) == list(range(k))
        assert all(sorted(f + h) == list(range(k)) and not set(f) & set(h) for f, h in cv)
    assert sorted(len(h) for _, h in folds(16, 0, 0.25)) == [4, 4, 4, 4]
    assert folds(16, 0, 0.25) == folds(16, 0, 0.25) != folds(16, 1, 0.25)
    assert len(folds(16, 0, 0.5)) == 2                # holdout sets the number of folds
    assert folds(1, 0, 0.25) == []                    # nothing to hold out
    with pytest.raises(UserError, match="holdout"):
        SelectionConfig(holdout=0.9)


class _FakeTracker:
    """A fold's held-out record: per image, the defaults' score and each candidate step's
    (one column per metric: the same value in mIoU, AP50 and PQ). Its pooled scores are the
    mean of those per-image scores, unless a test sets ones from real records."""

    def __init__(self, default, candidates):
        def per(xs):
            return np.repeat(np.asarray(xs, float)[:, None], 3, 1)

        self.default_images = per(default)
        self.default = {"score": float(np.mean(default))}
        self.curve, self.images = [], {}
        for i, xs in enumerate(candidates):
            self.curve.append({"step": 10 * (i + 1), "score": float(np.mean(xs))})
            self.images[10 * (i + 1)] = per(xs)
        self.default_pooled = _mean(self.default_images)
        self.pooled = {s: _mean(x) for s, x in self.images.items()}


def _mean(per_image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # a metric no image defines: NaN
        return np.nanmean(per_image, 0)


HELD = np.array([50.0, 40.0, 60.0, 45.0, 55.0, 35.0, 65.0, 48.0,
                 52.0, 42.0, 58.0, 47.0, 53.0, 38.0, 62.0, 44.0])   # 16 shots' default scores


def _folds(deltas_per_step, held=HELD, n_folds=4):
    """The k = len(held) shots as ``n_folds`` cross-fitted folds; ``deltas_per_step``: per
    candidate step, each image's paired difference to the defaults."""
    out = []
    for f in range(n_folds):
        idx = np.arange(len(held))[f::n_folds]
        out.append(_FakeTracker(held[idx], [held[idx] + np.asarray(d, float)[idx]
                                            for d in deltas_per_step]))
    return out


def test_decide_keeps_a_consistent_gain_and_picks_the_largest():
    """Every one of 16 held-out images improves by 2-6 points: the sign-flip test passes at
    family-wise 0.05 (p = 2^-16 + ...); of two passing steps the larger mean gain ships; a step
    with a larger mean carried by one image does not."""
    rng = np.random.default_rng(0)
    good = rng.uniform(2, 6, 16)
    better = good + 1
    lucky = np.full(16, -2.0)
    lucky[0] = 200.0
    step, _, _, test = decide(_folds([good, better, lucky]))
    assert step == 20 and test["passed"] and test["n_images"] == 16
    assert test["p_adjusted"] <= 0.05 and test["mean"] == pytest.approx(better.mean(), abs=1e-3)
    assert decide(_folds([lucky]))[0] is None
    assert decide(_folds([np.zeros(16)]))[0] is None       # a tie is no gain


def test_decide_rejects_a_collapse_that_wins_on_average():
    """Worse on 12 of 16 held-out images, far better on 4: the mean beats the defaults, the
    paired sign-flip test does not."""
    d = np.array([-5.0] * 12 + [40.0] * 4)
    step, _, _, test = decide(_folds([d]))
    assert d.mean() > 5 and step is None and test["p_adjusted"] > 0.05


def test_few_held_out_images_can_never_ship():
    """The smallest p of a k-image sign-flip test is 2^-k: k <= 4 shots never ship learned
    prompts at 0.05, however large the gain (k = 5 can: 1/32)."""
    for k in (2, 3, 4):
        held = HELD[:k]
        step, _, _, test = decide(_folds([np.full(k, 30.0)], held, n_folds=k))
        assert step is None and test["p_adjusted"] == pytest.approx(1 / 2 ** k)
    assert decide(_folds([np.full(5, 30.0)], HELD[:5], n_folds=5))[0] == 10


def test_false_acceptance_over_all_checkpoints_is_at_most_alpha():
    """No candidate better than the defaults: 10 checkpoints whose per-image differences are
    noise symmetric about 0 (normal; heavy-tailed t(2); a random walk over the steps, so the
    checkpoints are strongly correlated), on the default 16 shots in 4 cross-fitted folds, and
    on 32 shots (random sign vectors): selection ships learned prompts in at most alpha = 5%
    of the runs, up to simulation error (the rate of an exact test is <= alpha; 2 SE of 1000
    runs allowed). The old normal-quantile rule shipped in 10-33%."""
    rng = np.random.default_rng(1)
    for k, kinds, reps in ((16, ("normal", "t2", "walk"), 1000), (32, ("normal",), 300)):
        held = np.resize(HELD, k)
        for kind in kinds:
            shipped = 0
            for _ in range(reps):
                if kind == "normal":
                    d = rng.normal(0, 3, (10, k))
                elif kind == "t2":
                    d = 3 * rng.standard_t(2, (10, k))
                else:
                    d = np.cumsum(rng.normal(0, 1.5, (10, k)), 0)
                shipped += decide(_folds(list(d), held))[0] is not None
            rate = shipped / reps
            print(f"k = {k}, {kind}: false acceptance {rate:.3f} ({reps} runs)")
            assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / reps), (k, kind, rate)


def test_maxt_pvalues_exact_and_sampled_agree():
    """Up to 16 images every sign vector is used; above, seeded random ones: the p-values of
    the same data agree to Monte-Carlo error, and a decision is a pure function of the data."""
    rng = np.random.default_rng(2)
    d = rng.normal(1.0, 3, (16, 5))
    exact = maxt_pvalues(d)
    assert len(sign_flips(16)) == 2 ** 16 and len(sign_flips(17)) == 20_001
    sampled = maxt_pvalues(np.vstack([d, d[:1] * 0]))    # 17 images (one zero): sampled
    assert np.abs(exact - sampled).max() < 0.02
    assert np.array_equal(maxt_pvalues(d), exact)


def test_decide_rejects_a_gain_that_is_a_loss_on_one_task():
    """+20 mIoU and +15 PQ on every held-out image but -3 AP50 (the combined score passes the
    test by far): not worse on any one task fails it; without the AP50 loss it passes."""
    trackers = _folds([np.zeros(16)])
    for t in trackers:
        t.images[10] = t.default_images + np.array([20.0, -3.0, 15.0])
        t.pooled[10] = _mean(t.images[10])
    step, _, _, test = decide(trackers)
    assert step is None and not test["passed"] and test["worse_on"] == ["AP50"]
    assert test["p_adjusted"] <= 0.05 and test["pooled_deltas"]["AP50"] == -3.0
    for t in trackers:
        t.images[10] = t.default_images + np.array([20.0, 0.5, 15.0])
        t.pooled[10] = _mean(t.images[10])
    assert decide(trackers)[0] == 10
    # a metric no held-out image defines (NaN) is left out, not counted as a loss
    for t in trackers:
        t.images[10][:, 1] = t.default_images[:, 1] = np.nan
        t.pooled[10], t.default_pooled = _mean(t.images[10]), _mean(t.default_images)
    assert decide(trackers)[0] == 10


def _ap_records(dets: list[list[tuple[float, bool]]]):
    """Per-image records of one class, one ground-truth instance per image, and the given
    (score, true positive) detections in each image (no mIoU / PQ pixels: those are NaN)."""
    from ssprompt.evaluation.records import APRecords, PerImage

    n = len(dets)
    flat = [(i, sc, tp) for i, ds in enumerate(dets) for sc, tp in ds]
    ap = APRecords(np.array([i for i, _, _ in flat], np.int64), np.zeros(len(flat), np.int64),
                   np.array([sc for _, sc, _ in flat]), np.array([tp for *_, tp in flat]),
                   np.array([not tp for *_, tp in flat]), np.ones((n, 1), np.int64))
    return PerImage(np.zeros((n, 1, 3), np.int64), np.zeros((n, 1, 4)), ap)


def test_decide_judges_each_task_pooled_over_each_folds_held_out_images():
    """AP ranks the detections of all images together. A candidate that ranks each image's
    own detections well (per-image AP50 100 everywhere, as the defaults) but whose scores are
    not comparable across images (an image's false positive above another's true positive)
    loses pooled AP50 (100 -> 83.5): with +10 mIoU per image it passes the sign-flip test and
    still fails, on AP50, pooled within each fold; the same gain with the defaults' detections
    passes."""
    from ssprompt.engine.selection import image_scores, pooled_scores

    default = _ap_records([[(0.9, True)], [(0.8, True)]])
    miscalibrated = _ap_records([[(0.3, True)], [(0.9, True), (0.5, False)]])
    assert image_scores(miscalibrated)[:, 1] == pytest.approx([100.0, 100.0])
    assert pooled_scores(default)[1] == pytest.approx(100.0)
    assert pooled_scores(miscalibrated)[1] == pytest.approx(83.50, abs=0.01)

    trackers = _folds([np.full(16, 10.0)])
    for t in trackers:
        t.default_pooled, t.pooled = pooled_scores(default), {10: pooled_scores(miscalibrated)}
    step, _, _, test = decide(trackers)
    assert step is None and test["worse_on"] == ["AP50"] and test["p_adjusted"] <= 0.05
    assert test["pooled_deltas"]["AP50"] == pytest.approx(-16.50, abs=0.01)
    for t in trackers:
        t.pooled = {10: pooled_scores(default)}
    assert decide(trackers)[0] == 10


def test_image_scores_equal_each_image_evaluated_alone(committed_ws):
    """The per-image scores the test uses are each held-out image's own metrics, and the
    pooled ones those of the held-out images evaluated together."""
    from ssprompt.engine.selection import Subset, default_embeddings, image_scores
    from ssprompt.evaluation.evaluate import evaluate, evaluate_many

    train = committed_ws.dataset("novel", "train", shots=8, seed=0)
    sp, se = default_embeddings(
        run_cell(committed_ws, CellSpec("novel", PromptConfig("zero_shot"), n_test=1))[1],
        committed_ws.sfm)
    held = Subset(train, [1, 4, 6])
    per = image_scores(evaluate_many(committed_ws.sfm, [(sp, se)], held, committed_ws.cache,
                                     per_image=True)[0]["per_image"])
    for i in range(3):
        alone = evaluate(committed_ws.sfm, sp, se, Subset(train, [held.positions[i]]),
                         committed_ws.cache)
        for j, m in enumerate(("mIoU", "AP50", "PQ")):
            if alone[m] is None:
                assert np.isnan(per[i, j])
            else:
                assert per[i, j] == pytest.approx(alone[m], abs=0.006)   # metrics: 2 decimals
    # pooled: the same records give the metrics of one evaluation of all three images
    from ssprompt.engine.selection import pooled_scores

    together = evaluate(committed_ws.sfm, sp, se, held, committed_ws.cache)
    pooled = pooled_scores(evaluate_many(committed_ws.sfm, [(sp, se)], held, committed_ws.cache,
                                         per_image=True)[0]["per_image"])
    for j, m in enumerate(("mIoU", "AP50", "PQ")):
        assert pooled[j] == pytest.approx(together[m], abs=0.006)


def test_stop_at_is_the_first_steps_of_the_full_schedule(tiny_sfm, coins_root, monkeypatch):
    """Refit: stopping at step s gives bit-identically the prompts of the full run after s
    steps, at the full run's learning rate (training ``steps = s`` would squeeze the cosine
    schedule: its learning rate at s differs)."""
    import ssprompt.engine.train as train_mod
    from ssprompt.engine.train import train_prompts
    from ssprompt.prompts.promptset import PromptSet

    lrs: list[list[float]] = []

    class Recording(torch.optim.AdamW):
        def step(self, *a, **kw):
            lrs[-1].append(self.param_groups[0]["lr"])
            return super().step(*a, **kw)

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", Recording)
    data = CocoDataset(coins_root, "train")
    cfg = TrainConfig(steps=12, warmup=3, batch=2, seed=0)

    def run(stop_at=None, steps=None, keep_at=None):
        torch.manual_seed(0)
        p = PromptSet(tiny_sfm, data.class_names, PromptConfig("weighted"),
                      generator=torch.Generator().manual_seed(0))
        kept = {}
        hook = (lambda s: kept.update(s=copy.deepcopy(p.state_dict())) if s + 1 == keep_at
                else None)
        lrs.append([])
        c = cfg if steps is None else TrainConfig(**{**cfg.__dict__, "steps": steps})
        train_prompts(tiny_sfm, p, data, c, on_step=hook, stop_at=stop_at)
        return kept.get("s", p.state_dict())

    s = 5
    full_at_s = run(keep_at=s)
    stopped = run(stop_at=s)
    squeezed = run(steps=s)
    assert full_at_s.keys() == stopped.keys()
    assert all(torch.equal(full_at_s[k], stopped[k]) for k in full_at_s)
    full, stop, squeeze = lrs
    assert len(full) == 12 and stop == full[:s] and len(squeeze) == s
    assert squeeze[-1] != full[s - 1]
    assert not all(torch.equal(full_at_s[k], squeezed[k]) for k in full_at_s)
    with pytest.raises(ValueError, match="stop_at"):
        train_prompts(tiny_sfm, PromptSet(tiny_sfm, data.class_names, PromptConfig("weighted")),
                      data, cfg, stop_at=13)


def test_harmful_lr_falls_back_to_exactly_zero_shot(committed_ws):
    """lr 1.0 wrecks the prompts; selection sees it on the held-out shots and returns the
    default prompts, so every test metric equals zero-shot to the last digit."""
    zs = run_cell(committed_ws, CellSpec("novel", PromptConfig("zero_shot"), n_test=30))[0]
    harmful = TrainConfig(steps=10, lr=1.0, warmup=1, anchor=0.0)
    spec = CellSpec("novel", PromptConfig("weighted"), harmful, shots=16, n_test=30,
                    selection=SelectionConfig(every=5, report_raw=True))
    r, prompts, _ = run_cell(committed_ws, spec)
    assert r["selection"]["selected"] == "default"
    assert all(c["score"] < r["selection"]["default_score"] for c in r["selection"]["curve"])
    assert {m: r[m] for m in METRICS} == {m: zs[m] for m in METRICS}
    assert r["raw"]["mIoU"] < zs["mIoU"]          # what training alone would have shipped
    assert prompts.num_trainable() == 0 and r["trained_params"] > 0


def test_selection_keeps_a_real_gain(committed_ws):
    """On `novel` (held-out class names) learning helps: selection keeps a trained step."""
    zs = run_cell(committed_ws, CellSpec("novel", PromptConfig("zero_shot"), n_test=60))[0]
    spec = CellSpec("novel", PromptConfig("weighted"), TrainConfig(steps=60), seed=1,
                    n_test=60)
    r = run_cell(committed_ws, spec)[0]
    assert r["selection"]["selected"] != "default"
    assert r["mIoU"] > zs["mIoU"] + 2


def test_shots_equal_to_split_size_warns(tiny_sfm, coins_root):
    ws = Workspace(tiny_sfm)
    spec = CellSpec(f"coco:{coins_root}", PromptConfig("weighted"), TrainConfig(steps=2),
                    shots=8, n_test=2, selection=SelectionConfig(every=1))
    with pytest.warns(UserWarning, match="every image of the train split"):
        r = run_cell(ws, spec)[0]
    assert any("every image" in w for w in r["warnings"])


# ------------------------------------------------------------------------ any image size
def test_letterbox_round_trip_keeps_the_labels():
    rng = np.random.default_rng(0)
    for h, w in ((57, 130), (130, 57), (96, 96), (200, 40)):
        labels = np.zeros((h, w), np.int32)
        for k in range(1, 4):  # three rectangles
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            labels[y:y + h // 2, x:x + w // 2] = k
        size = 64
        boxed = letterbox_labels(labels, size)
        nh, nw = letterbox_shape(h, w, size)
        assert boxed.shape == (size, size) and max(nh, nw) == size
        assert (boxed[nh:] == 0).all() and (boxed[:, nw:] == 0).all()   # padding
        onehot = torch.from_numpy(np.eye(4, dtype=np.float32)[boxed]).permute(2, 0, 1) * 20 - 10
        back = unletterbox(onehot, size, (h, w)).argmax(0).numpy()
        assert back.shape == (h, w) and (back == labels).mean() > 0.9


def test_non_square_images_train_and_eval_at_their_own_size(tiny_sfm, coins_root):
    """Several non-square sizes in one split go through the embedded SFM (it used to crash on a
    non-square image) and are scored against labels at their original size."""
    ds = CocoDataset(coins_root, "test")
    assert len({ds[i].image.shape for i in range(len(ds))}) > 3
    assert all(ds[i].image.shape[0] != ds[i].image.shape[1] for i in range(len(ds)))
    ws = Workspace(tiny_sfm)
    spec = CellSpec(f"coco:{coins_root}", PromptConfig("weighted"), TrainConfig(steps=3),
                    shots=4, selection=SelectionConfig(every=1))
    r = run_cell(ws, spec)[0]
    assert all(isinstance(r[m], float) for m in ("mIoU", "PQ"))
    assert set(r["per_class"]) == {"coin", "table"}


def test_free_split_names_via_cli(tmp_path, coins_root):
    root = tmp_path / "c"
    for split, name in (("train", "train2017"), ("test", "val2017")):
        export_coco(CoinsSplit(split), root, name)
    ckpt = save_tiny_embedded(tmp_path / "tiny.safetensors")
    out = tmp_path / "run"
    ok(ssprompt("train", "--data", f"coco:{root}", "--train-split", "train2017",
                "--test-split", "val2017", "--checkpoint", ckpt, "--shots", "4", "--steps", "2",
                "--select-every", "1", "--out", out))
    m = json.loads((out / "metrics.json").read_text())
    assert m["selection"]["rule"] and isinstance(m["mIoU"], float)
    r = ssprompt("eval", "--data", f"coco:{root}", "--checkpoint", ckpt)   # no split 'test'
    assert_one_line_error(r, "test")


# ----------------------------------------------------------------------------- many classes
class _ManyClasses:
    """Scenes whose segments use category indices up to 299 (300 classes, 255 among them)."""

    def __init__(self, n_images: int, n_classes: int = 300):
        self.class_names = [f"class {i}" for i in range(n_classes)]
        self.is_thing = [i % 2 == 0 for i in range(n_classes)]
        rng = np.random.default_rng(3)
        self.scenes = []
        for _ in range(n_images):
            instance = np.zeros((48, 64), np.int32)
            semantic = np.full((48, 64), VOID, np.int32)
            segments = []
            cats = [255, 299, 256] + rng.choice(n_classes, 3, replace=False).tolist()
            for k, c in enumerate(cats[:4], start=1):
                y, x = (k - 1) // 2 * 24, (k - 1) % 2 * 32
                instance[y:y + 20, x:x + 28] = k
                semantic[y:y + 20, x:x + 28] = c
                segments.append({"id": k, "category": int(c), "isthing": self.is_thing[c],
                                 "area": 560})
            self.scenes.append(Scene(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                                     semantic, instance, segments))

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        return self.scenes[i]


def test_300_classes_train_eval_and_all_metrics(tiny_sfm, tmp_path):
    root = tmp_path / "many"
    export_coco(_ManyClasses(4), root, "train")
    export_coco(_ManyClasses(3), root, "test")
    ds = CocoDataset(root, "test")
    assert len(ds.class_names) == 300 and ds[0].semantic.dtype == np.int32
    assert {255, 299, 256} <= set(np.unique(ds[0].semantic).tolist())   # 255 is a class now
    ws = Workspace(tiny_sfm)
    spec = CellSpec(f"coco:{root}", PromptConfig("weighted"), TrainConfig(steps=2), shots=4,
                    selection=SelectionConfig(every=1))
    r = run_cell(ws, spec)[0]
    assert all(isinstance(r[m], float) for m in ("mIoU", "AP50", "PQ"))
    assert len(r["per_class"]) == 300 and r["per_class"]["class 255"]["IoU"] is not None


# ------------------------------------------------------------------------------------ caches
def test_lru_cache_bounded_by_bytes():
    evicted = []
    c = LRUCache(max_bytes=3 * 400, on_evict=lambda k, v: evicted.append(k))
    for k in range(3):
        c[k] = np.zeros(100, np.float32)        # 400 bytes each
    c.get(0)                                    # 0 is now the most recently used
    c[3] = np.zeros(100, np.float32)
    assert evicted == [1] and 1 not in c and 0 in c and c.bytes == 1200


def test_feature_cache_bounded_and_damaged_entry_recomputed(tiny_sfm, tmp_path):
    images = [np.full((40, 56, 3), v, np.uint8) for v in (10, 90, 200)]
    cache = FeatureCache(tmp_path, max_bytes=1)          # keeps one entry in memory
    first = cache.get(tiny_sfm, images)
    assert len(cache.mem) == 1 and cache.encoder_calls == 3
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    again = cache.get(tiny_sfm, images)                  # read back from disk, not recomputed
    assert cache.encoder_calls == 3
    for k, v in first.tensors.items():
        assert torch.equal(v, again.tensors[k]) and again.tensors[k].device == v.device
    files[0].write_bytes(b"not a safetensors file")
    fresh = FeatureCache(tmp_path)
    with pytest.warns(UserWarning, match=files[0].name):
        fresh.get(tiny_sfm, images)
    assert fresh.encoder_calls == 1


# --------------------------------------------------------------------------------- bad input
def _tiny_coco(root: Path, split: str, images: list, anns: list) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 1, "name": "box"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("empty", ["train", "test"])
def test_split_without_images_is_one_line_and_no_output(tmp_path, coins_root, empty):
    root = tmp_path / "d"
    export_coco(CoinsSplit("train"), root, "train")
    export_coco(CoinsSplit("test"), root, "test")
    _tiny_coco(root, empty, [], [])
    (root / "annotations" / f"panoptic_{empty}.json").unlink()
    ckpt = save_tiny_embedded(tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    r = ssprompt("train", "--data", f"coco:{root}", "--checkpoint", ckpt, "--shots", "2",
                 "--steps", "1", "--out", out)
    assert_one_line_error(r, f"instances_{empty}.json", "no images")
    assert not out.exists()


def test_polygon_with_two_points_names_the_annotation(tmp_path):
    root = tmp_path / "p"
    (root / "test").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "test" / "a.png")
    _tiny_coco(root, "test", [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}],
               [{"id": 77, "image_id": 1, "category_id": 1, "iscrowd": 0,
                 "segmentation": [[1, 1, 5, 5]]}])
    r = ssprompt("eval", "--data", f"coco:{root}", "--n-test", "1")
    assert_one_line_error(r, "instances_test.json", "annotation id 77", "2.0 points")


def test_non_square_images_through_tiny_sam(coins_root, tmp_path):
    """The same mixed-size split through a tiny SAM (letterboxed, never stretched): train with
    selection, then evaluation class-agnostically at every image's own size."""
    pytest.importorskip("transformers")
    from cli_helpers import save_tiny_sam as save_tiny

    from ssprompt.evaluation.postprocess import postprocess
    from ssprompt.sfm import load_sfm

    sam = load_sfm("sam", str(save_tiny(tmp_path, seed=0)), "cpu")
    ws = Workspace(sam)
    spec = CellSpec(f"coco:{coins_root}", PromptConfig("weighted", ("spatial",), n_prompts=16),
                    TrainConfig(steps=2), shots=4, n_test=3, selection=SelectionConfig(every=1))
    r, prompts, _ = run_cell(ws, spec)
    assert list(r["per_class"]) == ["object", "background"]
    assert all(isinstance(r[m], float) for m in ("mIoU", "PQ"))
    test = ws.dataset(spec.task, "test", n_test=3)
    scenes = [test[i] for i in range(3)]
    with torch.no_grad():
        out = sam.decode(ws.cache.get(sam, [s.image for s in scenes]),
                         *prompts())
    sizes = [s.semantic.shape for s in scenes]
    preds = postprocess(out, sizes, sam.image_size, [True])
    assert [tuple(p.semantic.shape) for p in preds] == [tuple(s) for s in sizes]
