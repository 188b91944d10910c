"""Held-out-shot model selection: few-shot prompt learning that is never silently worse than
the SFM's default prompts.

Without validation, a few-shot run can end far below zero-shot and nothing notices (it happened:
-37 mIoU on a real dataset). So by default part of the k shots is held out:

* k >= 8: ``round(holdout * k)`` shots are held out (one fold), the rest are fitted;
* 2 <= k < 8: leave-one-out, one fold per shot, each fitted on the others (one held-out image
  is too noisy a judge on its own; k of them together are not);
* k = 1: nothing can be held out: the default prompts are kept (with a warning).

During training every ``every`` steps (and at the last step) each fold's prompts are scored on
its held-out shots with the task metrics: the mean of mIoU, AP50 and PQ, over those defined.
The best step wins only if it beats the default prompts' score on the same held-out shots;
otherwise the result *is* the default prompts (exactly the zero-shot output). With one fold the
prompts of the selected step are used as they are (what was validated is what ships); with
several folds, or with ``refit``, the prompts are trained again on all k shots for the
selected number of steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..evaluation.metrics import METRICS
from ..prompts.fusion import FusedPrompt
from ..prompts.spatial import default_spatial

LEAVE_ONE_OUT_BELOW = 8  # k shots: leave-one-out folds below this, one held-out fold from it


@dataclass
class SelectionConfig:
    """How prompt learning picks what it returns (see the module docstring)."""

    enabled: bool = True
    holdout: float = 0.25   # fraction of the k shots held out when k >= 8
    every: int = 10         # score the candidates every this many steps
    refit: bool = False     # one fold: train again on all k shots for the selected steps
    report_raw: bool = True  # also score the unselected last-step prompts on test (the cost
    #                          of one more test evaluation where selection changed something)


def folds(k: int, seed: int, holdout: float) -> list[tuple[list[int], list[int]]]:
    """(fit, held-out) positions into the k shots, a pure function of (k, seed, holdout)."""
    if k < 2:
        return []
    order = np.random.default_rng([seed, 11]).permutation(k).tolist()
    if k < LEAVE_ONE_OUT_BELOW:
        return [(sorted(order[:i] + order[i + 1:]), [order[i]]) for i in range(k)]
    v = min(k - 1, max(1, int(round(holdout * k))))
    return [(sorted(order[v:]), sorted(order[:v]))]


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
    """(spatial, semantic or None): the default (zero-shot) embeddings of a prompt set."""
    sp, se = prompts.spatial, prompts.semantic
    spatial = sp.default if isinstance(sp, FusedPrompt) else \
        default_spatial(sfm, prompts.cfg.n_prompts)
    return spatial, (None if se is None else se.default)


def restore_defaults(prompts, sfm) -> None:
    """Make ``prompts`` give exactly the default embeddings (the zero-shot prompts)."""
    spatial, semantic = default_embeddings(prompts, sfm)
    prompts.spatial = FusedPrompt(spatial, "default")
    if semantic is not None:
        prompts.semantic = FusedPrompt(semantic, "default")


class Tracker:
    """Scores one fold's prompts on its held-out shots as training goes and keeps the state of
    every scored step."""

    def __init__(self, sfm, prompts, held_out: Subset, cache, every: int, steps: int,
                 eval_batch: int = 50):
        from ..evaluation.evaluate import evaluate

        self.prompts, self.every, self.steps = prompts, every, steps
        self._evaluate = lambda sp, se: evaluate(sfm, sp, se, held_out, cache, batch=eval_batch)
        self.default = self._score(*default_embeddings(prompts, sfm))
        self.curve: list[dict] = []
        self.states: dict[int, dict] = {}

    @torch.no_grad()
    def _score(self, spatial, semantic) -> dict:
        m = self._evaluate(spatial, semantic)
        return {"score": round(score(m), 4), **{k: m.get(k) for k in METRICS}}

    def __call__(self, step: int) -> None:
        """After optimiser step ``step`` (0-based): score if it is a candidate step."""
        done = step + 1
        if done % self.every and done != self.steps:
            return
        with torch.no_grad():
            self.curve.append({"step": done, **self._score(*self.prompts())})
        self.states[done] = copy.deepcopy(self.prompts.state_dict())


def decide(trackers: list[Tracker]) -> tuple[int | None, list[dict], float]:
    """(selected step or None for the defaults, the mean held-out curve, the defaults' mean
    score) over the folds' trackers. Ties go to the earlier step; a step must beat the defaults
    strictly."""
    default = float(np.mean([t.default["score"] for t in trackers]))
    steps = [c["step"] for c in trackers[0].curve]
    curve = [{"step": s, "score": round(float(np.mean([t.curve[i]["score"] for t in trackers])), 4)}
             for i, s in enumerate(steps)]
    best = max(curve, key=lambda c: (c["score"], -c["step"]), default=None)
    if best is None or not best["score"] > default:
        return None, curve, default
    return best["step"], curve, default
