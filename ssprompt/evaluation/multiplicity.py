"""Many verdicts at once: Holm for the primary family, Benjamini-Hochberg q-values for the rest,
and equivalence (TOST) with a margin fixed in advance.

A study reports hundreds of differences; at 5% each, some exclude 0 by chance. So the config
names its *primary family* before the run (the questions the study exists for, each on every
task and metric): its verdicts are Holm-adjusted together, which bounds the chance of any false
claim in the family at 5% however the verdicts are correlated. Every other difference is
exploratory and gets a Benjamini-Hochberg q-value (the false-discovery rate at which it would
be called). The p-values are the ones the study's intervals invert (``Interval.p``: the same t,
SE and degrees of freedom), so a verdict and its interval never disagree before adjustment.

"No difference" is not a verdict an interval containing 0 can give: ``equivalent`` is the two
one-sided tests (TOST) at a margin fixed in advance, i.e. the 90% interval lies inside
[-margin, +margin].
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.05


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted): reject where
    the adjusted p is below ``ALPHA``; the family-wise error is then at most ``ALPHA``."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(1.0, adjusted)
    return out


def bh_qvalues(pvalues) -> np.ndarray:
    """Benjamini-Hochberg q-values (NaN stays NaN and is not counted): the smallest
    false-discovery rate at which each difference would be called."""
    from scipy.stats import false_discovery_control

    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = false_discovery_control(p[ok], method="bh")
    return out


def equivalent(delta: float, se: float, df: float, margin: float, alpha: float = ALPHA) -> bool:
    """TOST: both one-sided tests reject at ``alpha``, i.e. the (1 - 2 alpha) interval
    ``delta ± t(1 - alpha, df) * se`` lies inside (-margin, +margin)."""
    from scipy import stats

    if not (np.isfinite(delta) and np.isfinite(se)):
        return False
    q = stats.norm.ppf(1 - alpha) if np.isinf(df) else stats.t.ppf(1 - alpha, df)
    return bool(delta - q * se > -margin and delta + q * se < margin)
