"""The product estimand: what ``ssprompt train`` ships when held-out selection may keep the
default prompts, reported as its parts.

With selection, a seed's shipped Δ to zero-shot is exactly 0 where selection kept the default
prompts and the learned prompts' Δ where it shipped them: a mixture of a point mass at 0 and
the gains. A t-interval over such seeds loses coverage (0.92 / 0.91 / 0.81 / 0.49 at 8 seeds
when each seed keeps the defaults with probability 0.3 / 0.5 / 0.7 / 0.9), and a row where
every seed kept them gives a zero-width [0, 0]. So a row is reported as

* the **share shipped**: seeds that shipped learned prompts, with its exact (Clopper-Pearson)
  95% interval; 0 of 8 is compatible with up to 31% of seeds shipping;
* the **gain when shipped**: the mean Δ over the seeds that shipped, with the study's interval
  (``bootstrap.seed_mean_interval``: t over those seeds plus the shared image noise);
* the **shipped Δ** = share x gain when shipped (the mean over all seeds, kept ones at 0), with
  the product of the two parts' intervals, each at 97.5% (Bonferroni: both cover together with
  probability >= 95%). Its mean is E[1{shipped} Δ] = P(shipped) E[Δ | shipped]; given how many
  seeds shipped, their Δs are a sample of Δ | shipped, so the two parts are estimated
  independently even where selection ships the seeds that gain most. With fewer than 2 seeds
  shipped the gain's spread cannot be estimated: the shipped Δ is **not estimable** (None).

Coverage of the shipped-Δ interval under zero inflation, simulated with keep rates 0.3-0.9 and
keeping that depends on the gain, is asserted in tests/evaluation/test_shipped.py
(``SIMULATED_COVERAGE``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bootstrap import LEVEL, seed_mean_interval

# {keep rate: coverage of the shipped-Δ interval at 8 seeds, among estimable replications},
# measured by tests/evaluation/test_shipped.py
SIMULATED_KEEP_RATES = (0.3, 0.5, 0.7, 0.9)
SIMULATED_COVERAGE: dict[float, float] = {}
MIN_SHIPPED = 2   # seeds that shipped, below which the shipped Δ is not estimable


def share_interval(shipped: int, seeds: int, level: float = LEVEL) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of the share of seeds that shipped learned prompts."""
    from scipy.stats import binomtest

    if seeds == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(shipped), int(seeds)).proportion_ci(confidence_level=level,
                                                             method="exact")
    return float(ci.low), float(ci.high)


@dataclass
class Shipped:
    seeds: int
    shipped: int
    share_lo: float
    share_hi: float
    gain: tuple[float, float, float] | None     # (mean, lo, hi) over the seeds that shipped
    delta: float                                 # the mean shipped Δ over all seeds
    lo: float | None = None                      # None: not estimable
    hi: float | None = None

    @property
    def share(self) -> float:
        return self.shipped / self.seeds if self.seeds else float("nan")

    @property
    def estimable(self) -> bool:
        return self.lo is not None

    def as_dict(self) -> dict:
        return {"seeds": self.seeds, "shipped": self.shipped, "share": self.share,
                "share_lo": self.share_lo, "share_hi": self.share_hi,
                "gain": None if self.gain is None else dict(zip(("delta", "lo", "hi"),
                                                                  self.gain)),
                "delta": self.delta, "lo": self.lo, "hi": self.hi,
                "estimable": self.estimable}

    def __str__(self) -> str:
        if not self.estimable:
            return f"{self.delta:+.1f} (not estimable: {self.shipped} of {self.seeds} shipped)"
        return f"{self.delta:+.1f} [{self.lo:+.1f}, {self.hi:+.1f}]"


def shipped_interval(observed, resampled, shipped, level: float = LEVEL) -> Shipped:
    """The product estimand of one row (module docstring). ``observed`` (S,): each seed's
    shipped Δ on the test set (0 where it kept the defaults); ``resampled`` (S, B): the same on
    B image resamples; ``shipped`` (S,) bool: the seed shipped learned prompts."""
    obs = np.asarray(observed, dtype=np.float64).reshape(-1)
    res = np.asarray(resampled, dtype=np.float64).reshape(obs.size, -1)
    mask = np.asarray(shipped, dtype=bool).reshape(-1)
    ok = np.isfinite(obs)
    obs, res, mask = obs[ok], res[ok], mask[ok]
    s, k = obs.size, int(mask.sum())
    part = 1 - (1 - level) / 2           # each part at 97.5% for a joint 95%
    share_lo, share_hi = share_interval(k, s, level)
    delta = float(obs.mean()) if s else float("nan")
    if k < MIN_SHIPPED:
        gain = None if k == 0 else (float(obs[mask].mean()), float("nan"), float("nan"))
        return Shipped(s, k, share_lo, share_hi, gain, delta)
    g = seed_mean_interval(obs[mask], res[mask], level)
    g_part = seed_mean_interval(obs[mask], res[mask], part)
    p_lo, p_hi = share_interval(k, s, part)
    if not (np.isfinite(g_part.lo) and np.isfinite(g_part.hi)):
        return Shipped(s, k, share_lo, share_hi, (g.delta, g.lo, g.hi), delta)
    corners = [a * b for a in (p_lo, p_hi) for b in (g_part.lo, g_part.hi)]
    return Shipped(s, k, share_lo, share_hi, (g.delta, g.lo, g.hi), delta,
                   float(min(corners)), float(max(corners)))
