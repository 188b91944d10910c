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
def _obs(x: np.ndarray) -> np.ndarray:
    """Per-seed observed values of (S, B) resampled values that do not depend on the resample."""
    return x[:, 0].copy()


def test_identical_rows_give_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(0)
    row = rng.normal(50, 5, size=(3, 400))
    iv = bs.paired_interval(row, row.copy(), (_obs(row), _obs(row)))
    assert (iv.delta, iv.lo, iv.hi) == (0.0, 0.0, 0.0)
    assert not iv.excludes_zero


def test_constant_shift_gives_that_shift():
    rng = np.random.default_rng(1)
    base = rng.normal(40, 8, size=(3, 400))
    obs = rng.normal(40, 8, size=3)
    iv = bs.paired_interval(base + 2.5, base, (obs + 2.5, obs))
    assert iv.delta == pytest.approx(2.5)
    assert iv.lo == pytest.approx(2.5) and iv.hi == pytest.approx(2.5)
    assert iv.excludes_zero and str(iv).endswith("*")


def test_seed_spread_widens_the_interval():
    """Seeds that disagree (one seed +6, two seeds -1) leave the sign undecided; the same
    mean difference on every seed is decided."""
    base = np.zeros((3, 500))
    per_seed = np.array([[6.0], [-1.0], [-1.0]])
    mixed = bs.paired_interval(base + per_seed, base, (per_seed[:, 0], np.zeros(3)))
    steady = bs.paired_interval(base + 4 / 3, base, (np.full(3, 4 / 3), np.zeros(3)))
    assert mixed.delta == pytest.approx(4 / 3) and mixed.df == pytest.approx(2)
    assert mixed.lo < 0 < mixed.hi and not mixed.excludes_zero
    assert steady.excludes_zero


def test_intervals_are_centred_on_the_observed_mean():
    """Skewed, off-centre resamples (their median is not the observed value) still give an
    interval centred on the observed mean over seeds, for a Δ and for a row."""
    rng = np.random.default_rng(2)
    row = 30 + rng.exponential(3.0, size=(5, 600)).cumsum(0) / 5     # skewed, seeds related
    obs = np.array([28.0, 30.5, 29.0, 33.0, 31.0])
    lo, hi = bs.row_interval(row, obs)
    assert (lo + hi) / 2 == pytest.approx(obs.mean()) and lo < obs.mean() < hi
    iv = bs.paired_interval(row, row * 0.9, (obs, obs * 0.9))
    assert (iv.lo + iv.hi) / 2 == pytest.approx(iv.delta) == pytest.approx(0.1 * obs.mean())


def test_one_seed_at_the_defaults_can_still_be_decided():
    """8 seeds, 7 of them gaining about 3 points and one that kept the default prompts
    (Δ exactly 0): the gain is still detected; with 3 seeds (3, 3.2, 0) it is not."""
    base = np.zeros((8, 300))
    d8 = np.array([3.0, 3.2, 2.8, 3.1, 2.9, 3.0, 3.3, 0.0])
    assert bs.paired_interval(base + d8[:, None], base, (d8, np.zeros(8))).excludes_zero
    d3 = np.array([3.0, 3.2, 0.0])
    assert not bs.paired_interval(base[:3] + d3[:, None], base[:3],
                                  (d3, np.zeros(3))).excludes_zero


def test_image_noise_counted_once():
    """Seeds that agree exactly (a zero-shot row's seeds share one evaluation): the interval
    is the image-sampling one, mean ± 1.96 × the resamples' SD. Seeds whose image noise is
    independent: that noise is already in the per-seed spread, nothing is added (the shared
    term is ~0), so the SE is the t-interval's s / √S."""
    rng = np.random.default_rng(5)
    one = rng.normal(0, 2.0, size=600)
    same = bs.seed_mean_interval(np.full(4, 1.0), np.tile(1.0 + one, (4, 1)))
    assert same.se == pytest.approx(one.std(ddof=1)) and np.isinf(same.df)
    assert same.hi - 1.0 == pytest.approx(1.959964 * one.std(ddof=1))
    obs = np.array([0.5, 2.0, -1.0, 1.5, 0.0, 1.0, 2.5, -0.5])
    indep = bs.seed_mean_interval(obs, obs[:, None] + rng.normal(0, 2.0, size=(8, 4000)))
    assert indep.se == pytest.approx(obs.std(ddof=1) / np.sqrt(8), rel=0.02)


def test_gain_comparison_pairs_each_row_with_its_own_baseline():
    """(a - base_a) - (b - base_b) per seed: a gains 3 over its baseline, b gains 1 over its
    own (a different one), on every seed and resample: the gain comparison is exactly +2."""
    rng = np.random.default_rng(6)
    base_a, base_b = rng.normal(40, 5, size=(2, 4, 300))
    oba, obb = rng.normal(40, 5, size=(2, 4))
    iv = bs.gain_interval(base_a + 3, base_a, base_b + 1, base_b, (oba + 3, oba, obb + 1, obb))
    assert (iv.delta, iv.lo, iv.hi) == pytest.approx((2.0, 2.0, 2.0))
    noisy = rng.normal(0, 1, size=(4, 300))
    wide = bs.gain_interval(base_a + 3 + noisy, base_a, base_b + 1, base_b,
                            (oba + 3 + np.array([1.0, -1.0, 0.5, -0.5]), oba, obb + 1, obb))
    assert wide.delta == pytest.approx(2.0) and wide.lo < 2.0 < wide.hi


# --------------------------------------------------------------- coverage, by simulation
TRUE_DELTA = 2.0


def simulate(n_seeds: int, seed_sd: float, reps: int, n: int = 200, seed: int = 0
             ) -> tuple[float, float]:
    """Coverage and mean width of the study's 95% Δ interval (``paired_interval``, on the
    study's own image resamples ``image_weights``) on data with a known Δ = TRUE_DELTA: per
    replication, n fresh test images, each with an image effect shared by both rows and all
    seeds (SD 15) and a per-image gain shared by all seeds (mean TRUE_DELTA, SD 8: a test set
    where learning happens to help more moves every seed's Δ alike), per-seed-per-image noise
    on each row (SD 8), and a per-seed random effect on the row, i.e. on the Δ (SD
    ``seed_sd``). The metric is the mean over images, so an image resample's value is a
    weighted mean. Vectorised over replications except for the interval call itself."""
    rng = np.random.default_rng([seed, n_seeds, int(10 * seed_sd)])
    w = bs.image_weights(n) / n                                          # (B, n)
    image = rng.normal(50, 15, size=(reps, 1, n))
    gain = rng.normal(TRUE_DELTA, 8, size=(reps, 1, n))
    seed_fx = rng.normal(0, seed_sd, size=(reps, n_seeds, 1)) if seed_sd else 0.0
    row = image + gain + seed_fx + rng.normal(0, 8, size=(reps, n_seeds, n))
    base = image + rng.normal(0, 8, size=(reps, n_seeds, n))
    row_b, base_b = ((x.reshape(-1, n) @ w.T).reshape(reps, n_seeds, -1)  # (reps, S, B)
                     for x in (row, base))
    row_o, base_o = row.mean(-1), base.mean(-1)                          # (reps, S)
    hit, width = 0, 0.0
    for k in range(reps):
        iv = bs.paired_interval(row_b[k], base_b[k], (row_o[k], base_o[k]))
        hit += iv.lo <= TRUE_DELTA <= iv.hi
        width += iv.hi - iv.lo
    return hit / reps, width / reps


def test_coverage_with_8_seeds():
    """At the study's 8 seeds, the 95% interval of a Δ covers the true Δ 93-98% of the time
    whether the seeds agree (SD 0: the shared image noise must be counted) or disagree (SD 2,
    4 points: the t quantile must widen it); the measured values are the ones summary.md
    states (``SIMULATED_COVERAGE``)."""
    got = []
    for sd in bs.SIMULATED_SEED_SD:
        cov, width = simulate(8, sd, reps=1000)
        print(f"S = 8, seed SD {sd}: coverage {cov:.3f}, mean width {width:.2f} points")
        got.append(round(cov, 3))
        assert 0.93 <= cov <= 0.98, (sd, cov)
    assert tuple(got) == bs.SIMULATED_COVERAGE[8]


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
    ones = np.ones((1, len(good)))
    for name, fn in bs.METRIC_FNS.items():
        vb, vg = fn(sb, w)[None], fn(sg, w)[None]          # one seed
        worse = bs.paired_interval(vb, vg, (fn(sb, ones), fn(sg, ones)))
        assert worse.hi < 0, name
        same = bs.paired_interval(vg, vg, (fn(sg, ones), fn(sg, ones)))
        assert not same.excludes_zero


def test_study_intervals_give_gain_comparisons_centred_on_the_cells(tmp_path, pairs):
    """``study_intervals`` on a hand-made run (4 rows x 3 seeds, per-image statistics from the
    evaluator): every Δ and row interval is centred on the cells' own numbers, and the
    comparison of two rows with different zero-shot baselines gets a gain comparison whose
    Δ is the mean over seeds of (a - base(a)) - (b - base(b)); summary.md's note states the
    method and the simulated coverage."""
    from ssprompt.study.aggregate import study_intervals
    from ssprompt.study.config import cell_id, load_config
    from ssprompt.study.report import _method_note

    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text(
        "name: s\ntasks: [shift]\nseeds: [0, 1, 2]\nshots: 4\nn_test: 8\n"
        "train: {steps: 3, batch: 4}\nvariants:\n"
        "  - {name: zero-shot, kind: zero_shot, role: baseline}\n"
        "  - {name: zero-shot-N25, kind: zero_shot, n_prompts: 25}\n"
        "  - {name: ssprompt, kind: weighted}\n"
        "  - {name: ssprompt-N25, kind: weighted, n_prompts: 25}\n"
        "comparisons:\n  - [ssprompt-N25, ssprompt]\n")
    cfg = load_config(cfg_path)
    (tmp_path / "cells").mkdir()
    rng = np.random.default_rng(7)
    rows = []
    for k, (v, t, seed) in enumerate(cfg.cells()):
        quality = 0.3 if v.kind == "zero_shot" else 0.5 + 0.1 * seed
        m = _evaluate([(_prediction(s, rng, quality), s) for _, s in pairs], per_image=True)
        (tmp_path / "cells" / f"{cell_id(v, t, seed)}.stats.npz").write_bytes(
            m["per_image"].to_bytes())
        rows.append({"variant": v.name, "task": t, "seed": seed,
                     **{n: m[n] for n in ("mIoU", "AP50", "PQ")}})
    iv = study_intervals(tmp_path, cfg, rows)
    cell = {(r["variant"], r["seed"]): r for r in rows}

    def per_seed(v, metric):
        return np.array([cell[(v, s)][metric] for s in cfg.seeds])

    for metric in ("mIoU", "AP50", "PQ"):
        mean, lo, hi = iv["rows"]["ssprompt"]["shift"][metric]
        assert mean == pytest.approx(per_seed("ssprompt", metric).mean())
        assert (lo + hi) / 2 == pytest.approx(mean) and lo < mean < hi
        d = [e for e in iv["pairs"] if e["a"] == "ssprompt-N25"][0]
        assert d["b"] == "zero-shot-N25"
        assert d["tasks"]["shift"][metric]["delta"] == pytest.approx(
            (per_seed("ssprompt-N25", metric) - per_seed("zero-shot-N25", metric)).mean())
    (g,) = iv["gains"]
    assert (g["a"], g["base_a"], g["b"], g["base_b"]) == (
        "ssprompt-N25", "zero-shot-N25", "ssprompt", "zero-shot")
    x = g["tasks"]["shift"]["mIoU"]
    want = ((per_seed("ssprompt-N25", "mIoU") - per_seed("zero-shot-N25", "mIoU"))
            - (per_seed("ssprompt", "mIoU") - per_seed("zero-shot", "mIoU"))).mean()
    assert x["delta"] == pytest.approx(want) and x["lo"] <= want <= x["hi"]
    note = _method_note(iv)
    assert "t-interval" in note and "at this study's 3 seeds: 0.94 / 0.91 / 0.93" in note
