"""Paired bootstrap intervals for the study's differences between rows.

A difference such as "SSPrompt - zero-shot = +7.4 mIoU" comes from 200 test images and 3 seeds.
Seed spread alone says nothing about how much another 200 images would move it, so every Δ in
``summary.md`` gets a 95% interval from a *paired* bootstrap that resamples both:

* images: ``B`` resamples of the test images with replacement, the same indices for both rows
  (and every seed), so the image-to-image variation both rows share cancels;
* seeds: in each resample, the seeds are drawn with replacement too (the same draw for both
  rows: a seed fixes the shots, and both rows of a seed saw the same shots), and the Δ is the
  mean over the drawn seeds. This is the two-level (hierarchical) bootstrap; with 3 seeds it is
  coarse, and it can only widen the interval.

Each metric is recomputed from per-image statistics kept in the cell files (``PerImage``), the
same way the metric itself is computed, so a resample weighted by 1 everywhere reproduces the
cell's number:

* mIoU: per image and class, intersection, predicted and true pixel counts (void left out);
  summed over the resample, IoU = I / (P + T - I) over the classes with true pixels;
* PQ: per image and class, TP, FP, FN and the matched IoU sum (panopticapi's quantities);
* AP50: COCO's per-image matching (``metrics.APRecords``): AP is accumulated again over the
  resample's detections exactly as ``COCOeval.accumulate`` does (101 recall points, precision
  envelope), an image drawn twice counting twice.

The percentile interval is reported; ``excludes_zero`` marks a difference the resampling
cannot explain away.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import PerImage

N_BOOT = 1000          # resamples
BOOT_SEED = 0          # the resampling is seeded: the same intervals on every run
LEVEL = 0.95
REC_THRS = np.linspace(0.0, 1.00, 101)   # COCO's recall points


# ------------------------------------------------------------------- metrics of a resample
def miou(stats: PerImage, weights: np.ndarray) -> np.ndarray:
    """mIoU (percent) for each row of ``weights`` (B, n): how often each image is drawn."""
    s = np.einsum("bn,nck->bck", weights, stats.iou.astype(np.float64))
    inter, pred, true = s[..., 0], s[..., 1], s[..., 2]
    valid = true > 0
    iou = inter / np.maximum(true + pred - inter, 1)
    return 100 * np.where(valid, iou, 0).sum(1) / np.maximum(valid.sum(1), 1) \
        + np.where(valid.any(1), 0, np.nan)


def class_iou(stats: PerImage, weights: np.ndarray) -> np.ndarray:
    """Per-class IoU (percent, NaN where the class has no true pixels), (B, C)."""
    s = np.einsum("bn,nck->bck", weights, stats.iou.astype(np.float64))
    inter, pred, true = s[..., 0], s[..., 1], s[..., 2]
    return np.where(true > 0, 100 * inter / np.maximum(true + pred - inter, 1), np.nan)


def pq(stats: PerImage, weights: np.ndarray) -> np.ndarray:
    """PQ (percent) for each row of ``weights`` (B, n): the mean over classes with TP + FP +
    FN > 0 of IoU sum / (TP + FP / 2 + FN / 2)."""
    s = np.einsum("bn,nck->bck", weights, stats.pq)
    tp, fp, fn, iou = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
    counted = (tp + fp + fn) > 0
    per_class = np.where(counted, iou / np.maximum(tp + 0.5 * fp + 0.5 * fn, 1e-12), 0)
    return 100 * per_class.sum(1) / np.maximum(counted.sum(1), 1) \
        + np.where(counted.any(1), 0, np.nan)


def ap50(stats: PerImage, weights: np.ndarray) -> np.ndarray:
    """COCO AP50 (percent) for each row of ``weights`` (B, n), accumulated as
    ``COCOeval.accumulate`` does: per class, detections by decreasing score, cumulative TP and
    FP (an image drawn k times counts k times), precision made monotone, read at 101 recall
    points; the mean over classes with ground truth in the resample."""
    r = stats.ap
    b = weights.shape[0]
    total = np.zeros(b)
    classes = np.zeros(b)
    npig_all = weights @ r.gt_count.astype(np.float64)             # (B, C)
    for c in range(r.gt_count.shape[1]):
        npig = npig_all[:, c]
        has = npig > 0
        if not has.any():
            continue
        sel = np.flatnonzero((r.det_cat == c) & (r.det_tp | r.det_fp))
        prec = np.zeros((b, len(REC_THRS)))
        if sel.size:
            order = sel[np.argsort(-r.det_score[sel], kind="mergesort")]
            w = weights[:, r.det_image[order]]                    # (B, D)
            tps = np.cumsum(w * r.det_tp[order], 1)
            fps = np.cumsum(w * r.det_fp[order], 1)
            pr = tps / (tps + fps + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], 1)[:, ::-1]    # precision envelope
            rc = tps / np.maximum(npig, 1e-12)[:, None]
            for k in np.flatnonzero(has):
                idx = np.searchsorted(rc[k], REC_THRS, side="left")
                ok = idx < rc.shape[1]
                prec[k, ok] = pr[k, idx[ok]]
        total += np.where(has, prec.mean(1), 0)
        classes += has
    return 100 * total / np.maximum(classes, 1) + np.where(classes > 0, 0, np.nan)


METRIC_FNS = {"mIoU": miou, "AP50": ap50, "PQ": pq}


# ------------------------------------------------------------------------------ intervals
def image_weights(n: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """(n_boot, n) draw counts of ``n_boot`` resamples of ``n`` images with replacement."""
    rng = np.random.default_rng([seed, n])
    idx = rng.integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)


def seed_draws(n_seeds: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """(n_boot, n_seeds) seed positions drawn with replacement, one row per resample."""
    return np.random.default_rng([seed, 7, n_seeds]).integers(0, n_seeds,
                                                              size=(n_boot, n_seeds))


@dataclass
class Interval:
    delta: float          # the observed difference (mean over seeds)
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def __str__(self) -> str:
        mark = " *" if self.excludes_zero else ""
        return f"{self.delta:+.1f} [{self.lo:+.1f}, {self.hi:+.1f}]{mark}"


def paired_interval(row: np.ndarray, base: np.ndarray, observed: tuple[float, float],
                    draws: np.ndarray, level: float = LEVEL) -> Interval:
    """The paired interval of ``mean(row) - mean(base)``. ``row`` and ``base``: (S, B) metric
    values of S seeds on the same B image resamples; ``draws`` (B, S): the seeds drawn in each
    resample (the same for both rows); ``observed``: the two rows' means on the test set as
    it is. Resamples where the metric is undefined for either row are left out."""
    take = np.arange(draws.shape[0])[:, None]
    d = row.T[take, draws].mean(1) - base.T[take, draws].mean(1)     # (B,)
    d = d[np.isfinite(d)]
    a = (1 - level) / 2
    delta = observed[0] - observed[1]
    if d.size == 0:
        return Interval(delta, float("nan"), float("nan"))
    lo, hi = np.quantile(d, [a, 1 - a])
    return Interval(delta, float(lo), float(hi))


def row_interval(row: np.ndarray, draws: np.ndarray, level: float = LEVEL
                 ) -> tuple[float, float]:
    """The interval of one row's mean over seeds: ``row`` (S, B) on B image resamples,
    ``draws`` (B, S) the seeds drawn in each."""
    take = np.arange(draws.shape[0])[:, None]
    v = row.T[take, draws].mean(1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(v, [a, 1 - a])
    return float(lo), float(hi)
