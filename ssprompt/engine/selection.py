"""Held-out-shot model selection: what ``ssprompt train`` ships is never silently worse than
the SFM's default prompts (the *product*; the study's default config measures the *method*,
trained on all shots and scored as trained, with selection off).

Without validation, a few-shot run can end far below zero-shot and nothing notices (it happened:
-37 mIoU on a real dataset). So by default the k shots are **cross-fitted**: split into
``round(1 / holdout)`` folds (leave-one-out for k <= 4), every shot held out exactly once, each
fold's prompts trained on the other shots with the full schedule. Every ``every`` steps (and at
the last step) each fold's prompts are scored on each of its held-out shots on its own: an
image's score is the mean of that image's mIoU, AP50 and PQ (over those defined for it), from
the per-image records of one evaluation (``evaluation.records.PerImage``). The defaults are
scored the same way. k = 1: nothing can be held out, the default prompts are kept (a warning).

The rule (``decide``), fixed before any result it was run on: with the k held-out images of all
folds pooled, d_ij = cand_ij - default_i is candidate step j's paired per-image difference.
Step j passes when

* its **sign-flip permutation test** passes at family-wise level ``alpha`` over all m candidate
  steps: T_j, the paired t statistic of (d_1j .. d_kj), is compared with the distribution of
  max_j' T_j'(e_1 d_1j' .. e_k d_kj') over the 2^k sign vectors e (exact up to k = 16, 20,000
  seeded random ones above), the max over the candidates taken inside (Westfall-Young single-
  step max-T): adjusted p_j = P(max >= T_j) <= alpha. Under "no candidate is better than the
  defaults" (each image's differences symmetric about 0) the chance that *any* step passes is at
  most alpha, whatever the number of images, the spread, or how correlated the checkpoints are;
  no floor on the spread, no normal quantile (which was anti-conservative at 4 held-out images).
  The smallest p a k-image test can give is 2^-k, so k <= 4 shots can never ship learned prompts
  at alpha = 0.05;
* T_j > 0, and it is **not worse on any one task**: for each of mIoU, AP50 and PQ, the mean
  over folds of that metric on the fold's held-out images *pooled* (AP ranks the detections of
  all the fold's images together, as test does: per image it cannot see one image's false
  positives outscoring another's true positives) minus the defaults' is >= 0.

Of the passing steps the one with the largest mean difference ships (ties: the earlier); if none
passes, the defaults ship. The shipped prompts are trained again on all k shots with the same
``steps``-step schedule (warmup, cosine decay) and taken after the selected step (``train_many``
with a snapshot), so the refit follows the validated trajectory. With ``report_raw`` that refit
runs to the last step, and those prompts, the *as-trained* ones, are scored on test too (``raw``
in the cell: the method's number beside the product's).

What it cannot catch: a loss the held-out shots do not show (results/shots/heldout_vs_test.md,
round 3: a learned-only cell gained on its 4 held-out images and lost 7.3 AP50 on test; round
4's sweep shipped 3 learned-only cells 7-16 AP50 below zero-shot, and no SSPrompt cell).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import local_only
from ..errors import UserError
from ..evaluation.bootstrap import METRIC_FNS
from ..evaluation.metrics import METRICS
from ..evaluation.records import PerImage
from ..prompts.promptset import default_prompts

EXACT_UP_TO = 16        # held-out images: every sign vector below this many, seeded draws above
N_FLIPS = 20_000        # random sign vectors when not exact
FLIP_SEED = 29          # their seed: a decision is a pure function of the scores


@dataclass
class SelectionConfig:
    """How prompt learning picks what it returns (see the module docstring)."""

    enabled: bool = True
    holdout: float = 0.25   # each fold holds out this share of the shots (round(1 / holdout)
    #                        folds, every shot held out once; leave-one-out when k is smaller)
    every: int = 10         # score the candidates every this many steps
    alpha: float = 0.05     # family-wise level of the sign-flip test over all candidate steps
    report_raw: bool = False  # also train on all k shots to the last step and score those
    #                          (as-trained) prompts on test: the method beside the product

    def __post_init__(self):
        if not 0 < self.holdout <= 0.5:
            raise UserError(f"holdout {self.holdout}: must be in (0, 0.5] (the share of the "
                            "shots each fold holds out)", field="holdout")
        if not 0 < self.alpha < 1:
            raise UserError(f"alpha {self.alpha}: must be in (0, 1)", field="alpha")


def folds(k: int, seed: int, holdout: float) -> list[tuple[list[int], list[int]]]:
    """(fit, held-out) positions into the k shots, a pure function of (k, seed, holdout):
    ``min(k, round(1 / holdout))`` folds, every shot held out exactly once; none for k < 2."""
    if k < 2:
        return []
    order = np.random.default_rng([seed, 11]).permutation(k).tolist()
    n = min(k, max(2, int(round(1 / holdout))))
    held = [order[i::n] for i in range(n)]
    return [(sorted(set(order) - set(h)), sorted(h)) for h in held]


def score(metrics: dict) -> float:
    """The selection score: the mean of mIoU, AP50 and PQ over those defined (-inf if none)."""
    vals = [metrics[m] for m in METRICS if metrics.get(m) is not None]
    return float(np.mean(vals)) if vals else -math.inf


class Subset:
    """Some scenes of a dataset, with its vocabulary (``class_names``, ``is_thing``)."""

    def __init__(self, dataset, positions: list[int]):
        self.dataset, self.positions = dataset, list(positions)
        self.class_names, self.is_thing = dataset.class_names, dataset.is_thing

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.dataset[self.positions[i]]


def default_embeddings(prompts, sfm):
    """(spatial, semantic or None): the zero-shot prompts of a method state's SFM, grid and
    vocabulary (``default_prompts``)."""
    return default_prompts(sfm, None if prompts.agnostic else prompts.class_names,
                           prompts.options.n_prompts)


def _scores(stats: PerImage, weights: np.ndarray) -> np.ndarray:
    """(rows of ``weights``, len(METRICS)): mIoU, AP50 and PQ (percent; NaN where undefined)
    of each weighting of the images, recomputed from their per-image records."""
    return np.stack([METRIC_FNS[m](stats, weights) for m in METRICS], 1)


def image_scores(stats: PerImage) -> np.ndarray:
    """(n, len(METRICS)): each image's own mIoU, AP50 and PQ, exactly as for that image
    evaluated alone."""
    return _scores(stats, np.eye(len(stats)))


def pooled_scores(stats: PerImage) -> np.ndarray:
    """(len(METRICS),): mIoU, AP50 and PQ of all the images together, unrounded, as one
    evaluation of them computes them."""
    return _scores(stats, np.ones((1, len(stats))))[0]


def finite_mean(diff: np.ndarray, axis: int) -> np.ndarray:
    """The mean of ``diff`` (images x metrics: cand - default of their ``image_scores``) along
    ``axis`` over its finite entries, NaN where there are none: axis 1 gives each image's
    paired difference (over the metrics defined for both), axis 0 each metric's."""
    ok = np.isfinite(diff)
    with np.errstate(invalid="ignore"):
        return np.where(ok.any(axis), np.where(ok, diff, 0).sum(axis) / ok.sum(axis), np.nan)


class Tracker:
    """Scores one fold's prompts on its held-out shots as training goes (the mean score, each
    image's own ``image_scores`` and the images' ``pooled_scores``) and keeps the state of
    every scored step."""

    def __init__(self, sfm, prompts, held_out: Subset, cache, every: int, steps: int,
                 eval_batch: int = 50):
        from ..evaluation.evaluate import evaluate_many

        from ..methods.base import adapted_sfm

        self.prompts, self.every, self.steps = prompts, every, steps
        # candidates decode as their method does (e.g. an adapted decoder); the defaults as
        # the frozen SFM does
        self._evaluate = lambda sp, se, plain=False: evaluate_many(
            sfm if plain else adapted_sfm(sfm, prompts), [(sp, se)], held_out, cache,
            batch=eval_batch, per_image=True)[0]
        self.images: dict[int, np.ndarray] = {}   # step -> image_scores
        self.pooled: dict[int, np.ndarray] = {}   # step -> pooled_scores
        self.default, self.default_images, self.default_pooled = \
            self._score(*default_embeddings(prompts, sfm), plain=True)
        self.curve: list[dict] = []
        self.states: dict[int, dict] = {}

    @torch.no_grad()
    def _score(self, spatial, semantic, plain=False) -> tuple[dict, np.ndarray, np.ndarray]:
        # every rank scores every held-out image itself (the prompts are the same on all
        # ranks after the all-reduce), so the per-image test sees whole, unsynced records
        with local_only():
            m = self._evaluate(spatial, semantic, plain)
        records = m.pop("per_image")
        return ({"score": round(score(m), 4), **{k: m.get(k) for k in METRICS}},
                image_scores(records), pooled_scores(records))

    def __call__(self, step: int) -> None:
        """After optimiser step ``step`` (0-based): score if it is a candidate step."""
        done = step + 1
        if done % self.every and done != self.steps:
            return
        with torch.no_grad():
            scored, self.images[done], self.pooled[done] = self._score(*self.prompts())
        self.curve.append({"step": done, **scored})
        self.states[done] = copy.deepcopy(self.prompts.state_dict())


def sign_flips(n: int) -> np.ndarray:
    """(F, n) sign vectors of the permutation test: all 2^n up to ``EXACT_UP_TO`` images, else
    the identity and ``N_FLIPS`` seeded random ones."""
    if n <= EXACT_UP_TO:
        codes = np.arange(2 ** n, dtype=np.int64)[:, None] >> np.arange(n)
        return 1.0 - 2.0 * (codes & 1)
    rng = np.random.default_rng([FLIP_SEED, n])
    return np.vstack([np.ones((1, n)), rng.choice([-1.0, 1.0], size=(N_FLIPS, n))])


def maxt_pvalues(d: np.ndarray) -> np.ndarray:
    """Westfall-Young single-step max-T adjusted p-values of m candidates: ``d`` (n images,
    m candidates) paired differences, T_j the paired t statistic of column j (studentized, so
    one candidate with a huge spread does not drown the others); p_j = share of sign vectors
    e with max_j' T_j'(e * d) >= T_j(d), the identity among them."""
    n, m = d.shape
    if n < 2:
        return np.ones(m)
    flips = sign_flips(n)
    sums = flips @ d                                        # (F, m): sum_i e_i d_ij
    squares = (d ** 2).sum(0)                               # e_i^2 = 1: the same for every e
    scale = 1e-9 * max(1.0, float(np.abs(d).max()))

    def t_stat(total):
        mean = total / n
        var = np.maximum(squares - n * mean ** 2, 0.0) / (n - 1)
        return mean / (np.sqrt(var / n) + scale)

    observed = t_stat(d.sum(0))                             # (m,)
    null_max = t_stat(sums).max(1)                          # (F,)
    tol = 1e-9 * np.maximum(1.0, np.abs(observed))          # float noise is not a difference
    return (null_max[:, None] >= observed[None, :] - tol).mean(0)


def decide(trackers: list[Tracker], cfg: SelectionConfig | None = None
           ) -> tuple[int | None, list[dict], float, dict]:
    """(selected step or None for the defaults, the mean held-out curve, the defaults' mean
    score, the test of the selected candidate, else of the one with the largest mean
    difference) over the folds' trackers: the rule of the module docstring."""
    cfg = cfg or SelectionConfig()
    default = float(np.mean([t.default["score"] for t in trackers]))
    steps = [c["step"] for c in trackers[0].curve]
    curve = [{"step": s, "score": round(float(np.mean([t.curve[i]["score"] for t in trackers])), 4)}
             for i, s in enumerate(steps)]
    if not steps:
        return None, curve, default, {}
    # (images, candidates): each held-out image's paired difference at each candidate step;
    # images without a defined score at some step are left out of the test
    d = np.stack([finite_mean(np.concatenate([t.images[s] - t.default_images
                                              for t in trackers]), 1) for s in steps], 1)
    d = d[np.isfinite(d).all(1)]
    pvals = maxt_pvalues(d)
    tests = []
    for j, s in enumerate(steps):
        per_metric = np.mean([t.pooled[s] - t.default_pooled for t in trackers], 0)
        test = {"step": s, "n_images": int(d.shape[0]), "n_candidates": len(steps),
                "mean": round(float(d[:, j].mean()), 4) if len(d) else None,
                "p_adjusted": round(float(pvals[j]), 6),
                "min_delta": round(float(d[:, j].min()), 4) if len(d) else None,
                "pooled_deltas": {m: round(float(x), 4)
                                  for m, x in zip(METRICS, per_metric) if np.isfinite(x)}}
        worse = [m for m, x in zip(METRICS, per_metric) if np.isfinite(x) and round(x, 4) < 0]
        test["passed"] = bool(len(d) and d[:, j].mean() > 0 and pvals[j] <= cfg.alpha
                              and not worse)
        if worse:
            test["worse_on"] = worse
        tests.append(test)
    ranked = sorted(tests, key=lambda t: (-(t["mean"] if t["mean"] is not None else -math.inf),
                                          t["step"]))
    passing = [t for t in ranked if t["passed"]]
    pick = passing[0] if passing else ranked[0]
    return (pick["step"] if passing else None), curve, default, pick
