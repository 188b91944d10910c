"""95% intervals for the study's differences between rows, valid with few seeds.

A difference such as "SSPrompt - zero-shot = +7.4 mIoU" is a mean over S seeds of per-seed
differences, each measured on the same test images. Two things would move it if the study
were run again: other seeds (other shots, other initialisations) and other test images. Every
Δ in ``summary.md`` gets an interval that accounts for both.

The method (a t-interval over seeds with the shared image-sampling variance added):

* the per-seed paired differences Δ_s = row_s - base_s are the observed metrics of the cells
  (each on the full test set; a seed fixes the shots, so both rows of a seed are paired), and
  the interval is centred on their mean Δ̄, the number the tables report;
* SE² = s²_Δ / S + V_img. The spread s²_Δ of the per-seed Δ_s holds the seed-to-seed
  variation *and* each seed's own image-level noise (the part of a seed's Δ that another test
  set would change independently for each seed). What it cannot see is the image noise all
  seeds share: every seed is scored on the same 200 images, so a test set on which learning
  happens to help more moves every Δ_s alike and cancels out of s²_Δ. V_img is that shared
  part: the mean over seed pairs s ≠ s' of the covariance, over B image resamples (the same
  resampled image sets for every row and seed), of the resampled Δ_s and Δ_s'. The full
  variance of the seed-averaged Δ over image resamples would be V_img + (mean per-seed
  image variance) / S; its second term is already inside s²_Δ / S, so only the off-diagonal
  covariances are added (no double counting; negative estimates, noise when nothing is
  shared, are clipped at 0);
* the critical value is Student's t with Welch–Satterthwaite degrees of freedom
  ν = SE⁴ / ((s²_Δ / S)² / (S - 1)), V_img being treated as known (it is estimated from 200
  images, relative error ~10%, against ~50% for a variance from 8 seeds): ν = S - 1 when the
  seeds dominate, larger (towards the normal quantile) when the shared image noise does;
* with a single seed the seed variance cannot be estimated: the interval is the image part
  alone (normal quantile), i.e. it says nothing about other seeds.

Why not the percentile bootstrap over seeds this module used before: with S = 3 it is close to
[worst seed, best seed] and under-covers when seeds disagree (simulated coverage 0.96 / 0.89 /
0.83 at a seed SD of 0 / 2 / 4 points); it is not centred on the reported mean; and a row
where one of three seeds kept the default prompts (Δ = 0 there) could never exclude 0 (a
resample of that seed alone has probability 1/27 > 2.5%). The t-interval has the right
width for few clusters by construction; its coverage, simulated with per-image, per-seed data
of known Δ through these very functions, is in ``SIMULATED_COVERAGE`` (measured by
``tests/evaluation/test_bootstrap.py``) and stated in ``summary.md``.

The same estimator gives a row's own interval (``row_interval``: the mean over seeds of one
row; image noise is mostly shared there), the things-vs-stuff comparison, and the gain
comparison ``gain_interval``: (a - base(a)) - (b - base(b)), per seed, e.g. "does learning
gain more at N = 25 than at N = 100".

Each metric is recomputed on the image resamples from per-image statistics kept in the cell
files (``PerImage``), the same way the metric itself is computed, so a resample weighted by 1
everywhere reproduces the cell's number:

* mIoU: per image and class, intersection, predicted and true pixel counts (void left out);
  summed over the resample, IoU = I / (P + T - I) over the classes with true pixels;
* PQ: per image and class, TP, FP, FN and the matched IoU sum (panopticapi's quantities);
* AP50: COCO's per-image matching (``metrics.APRecords``): AP is accumulated again over the
  resample's detections exactly as ``COCOeval.accumulate`` does (101 recall points, precision
  envelope), an image drawn twice counting twice.

``excludes_zero`` marks a difference that neither other seeds nor other test images are
likely to explain away.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import PerImage

N_BOOT = 1000          # image resamples (they estimate the shared image variance V_img)
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
# Coverage of the 95% intervals of a Δ, simulated (tests/evaluation/test_bootstrap.py, ``simulate``):
# two rows, 200 test images, per-image scores = image effect shared by both rows + a per-image
# gain shared by every seed + per-seed-per-image noise, + a per-seed random effect on the Δ of
# SD 0, 2 or 4 points; 1000 replications each. {seeds: (coverage at SD 0, 2, 4)}.
SIMULATED_SEED_SD = (0, 2, 4)
SIMULATED_COVERAGE = {8: (0.94, 0.947, 0.953), 3: (0.944, 0.906, 0.927)}


def image_weights(n: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """(n_boot, n) draw counts of ``n_boot`` resamples of ``n`` images with replacement."""
    rng = np.random.default_rng([seed, n])
    idx = rng.integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)


@dataclass
class Interval:
    delta: float          # the observed difference (mean over seeds); the interval's centre
    lo: float
    hi: float
    se: float = float("nan")   # its standard error (seeds and shared image noise)
    df: float = float("nan")   # the t quantile's degrees of freedom (inf: normal quantile)

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @property
    def p(self) -> float:
        """The two-sided p-value of "Δ = 0" that this interval inverts (the same t with
        ``df`` degrees of freedom and the same SE): ``p < 1 - level`` exactly when the
        interval excludes 0. NaN where the interval is; 1 where SE is 0 and Δ is 0."""
        from scipy import stats

        if not (np.isfinite(self.delta) and np.isfinite(self.se)):
            return float("nan")
        if self.se == 0:
            return 1.0 if self.delta == 0 else 0.0
        z = abs(self.delta) / self.se
        tail = stats.norm.sf(z) if np.isinf(self.df) else stats.t.sf(z, self.df)
        return float(min(1.0, 2 * tail))

    def __str__(self) -> str:
        mark = " *" if self.excludes_zero else ""
        return f"{self.delta:+.1f} [{self.lo:+.1f}, {self.hi:+.1f}]{mark}"

    def as_dict(self) -> dict:
        return {"delta": self.delta, "lo": self.lo, "hi": self.hi, "se": self.se,
                "df": self.df, "excludes_zero": self.excludes_zero, "p": self.p}


def seed_mean_interval(observed, resampled, level: float = LEVEL) -> Interval:
    """The interval of the mean over seeds of a per-seed quantity (a row's metric, a paired Δ,
    a gain comparison); see the module docstring for the method.

    ``observed`` (S,): its value on the test set as it is, per seed; ``resampled`` (S, B): its
    value on B image resamples (the same resamples for every seed). Seeds whose observed value
    is not finite, and resamples where any seed's is not, are left out."""
    from scipy import stats

    obs = np.asarray(observed, dtype=np.float64).reshape(-1)
    res = np.asarray(resampled, dtype=np.float64).reshape(obs.size, -1)
    keep = np.isfinite(obs)
    obs, res = obs[keep], res[keep]
    s = obs.size
    if s == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    centre = float(obs.mean())
    res = res[:, np.isfinite(res).all(0)]
    if res.shape[1] < 2:
        return Interval(centre, float("nan"), float("nan"))
    cov = np.atleast_2d(np.cov(res))                          # (S, S) over image resamples
    if s == 1:          # no seed spread to estimate: image sampling alone
        v_seed, v_img = 0.0, float(cov[0, 0])
    else:
        v_seed = float(obs.var(ddof=1)) / s
        v_img = max(0.0, float(cov.sum() - np.trace(cov)) / (s * (s - 1)))
    var = v_seed + v_img
    df = var ** 2 / (v_seed ** 2 / (s - 1)) if v_seed > 0 else float("inf")
    q = stats.norm.ppf(0.5 + level / 2) if np.isinf(df) else stats.t.ppf(0.5 + level / 2, df)
    half = float(q * np.sqrt(var))
    return Interval(centre, centre - half, centre + half, float(np.sqrt(var)), float(df))


def paired_interval(row: np.ndarray, base: np.ndarray, observed: tuple, level: float = LEVEL
                    ) -> Interval:
    """The interval of ``mean(row) - mean(base)`` over seeds, paired by seed and image.
    ``row``, ``base``: (S, B) metric values of S seeds on the same B image resamples;
    ``observed``: the two rows' per-seed values (S,) on the test set as it is."""
    a, b = (np.asarray(x, dtype=np.float64) for x in observed)
    return seed_mean_interval(a - b, np.asarray(row) - np.asarray(base), level)


def gain_interval(a: np.ndarray, base_a: np.ndarray, b: np.ndarray, base_b: np.ndarray,
                  observed: tuple, level: float = LEVEL) -> Interval:
    """The gain comparison (a - base_a) - (b - base_b): does ``a`` gain more over its own
    baseline than ``b`` over its own? Each argument (S, B) as in ``paired_interval``;
    ``observed``: the four rows' per-seed values (S,), in the same order. Paired by seed (a
    seed fixes the shots of all four rows) and by image."""
    oa, oba, ob, obb = (np.asarray(x, dtype=np.float64) for x in observed)
    return seed_mean_interval((oa - oba) - (ob - obb),
                              (np.asarray(a) - base_a) - (np.asarray(b) - base_b), level)


def row_interval(row: np.ndarray, observed, level: float = LEVEL) -> tuple[float, float]:
    """The interval (lo, hi) of one row's mean over seeds, centred on its observed mean:
    ``row`` (S, B) on B image resamples, ``observed`` (S,) the per-seed values."""
    iv = seed_mean_interval(observed, row, level)
    return iv.lo, iv.hi
