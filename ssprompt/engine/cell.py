"""One experiment cell: few-shot prompt learning of one variant on one task and seed, with
held-out-shot selection (``ssprompt.engine.selection``), then evaluation on the test split. Shared by
``ssprompt train`` and ``ssprompt study``."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..data import open_dataset
from ..distributed import shard
from ..evaluation.evaluate import evaluate_many
from ..methods.base import MethodState, adapted_sfm, build_state
from ..prompts.promptset import PromptConfig, config_dict
from ..sfm.base import PromptableSFM
from ..sfm.features import FeatureCache
from .selection import SelectionConfig, Subset, Tracker, decide, folds
from .train import TrainConfig, train_many


@dataclass
class CellSpec:
    task: str
    prompt: PromptConfig = field(default_factory=PromptConfig)   # the method's options
    train: TrainConfig = field(default_factory=TrainConfig)
    shots: int = 16
    seed: int = 0
    n_test: int | None = None
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def as_dict(self) -> dict:
        return {"task": self.task, "prompt": config_dict(self.prompt), "train": asdict(self.train),
                "shots": self.shots, "seed": self.seed, "n_test": self.n_test,
                "selection": asdict(self.selection)}


class Workspace:
    """Datasets and image features shared by every cell of one process. ``split_names`` maps a
    split's role (``train``, ``test``) to its name in a COCO folder (e.g. ``val2017``)."""

    def __init__(self, sfm: PromptableSFM, cache: FeatureCache | None = None,
                 eval_batch: int = 50, split_names: dict[str, str] | None = None,
                 test_from: int = 0):
        self.sfm = sfm
        self.test_from = test_from  # scene tasks: the test split's first scene (fresh scenes)
        self.cache = cache if cache is not None else FeatureCache()
        self.eval_batch = eval_batch
        self.split_names = dict(split_names or {})
        self._data: dict[tuple, object] = {}

    def dataset(self, task: str, split: str, shots: int = 16, seed: int = 0,
                n_test: int | None = None):
        key = (task, split, shots if split == "train" else None,
               seed if split == "train" else None, n_test if split == "test" else None)
        if key not in self._data:
            self._data[key] = open_dataset(task, split, shots=shots, seed=seed, n_test=n_test,
                                           split_name=self.split_names.get(split),
                                           test_from=self.test_from)
        return self._data[key]


def run_cell(ws: Workspace, spec: CellSpec, progress: bool = False,
             on_log: Callable[[dict], None] | None = None):
    """Returns (result dict, prompts, loss log); ``on_log(row)`` gets each loss-log row of the
    cell's (first fold's) training as it is written."""
    return run_cells(ws, [spec], progress, on_log)[0]


@dataclass
class _Cell:
    spec: CellSpec
    prompts: MethodState
    make: object                    # () -> a fresh state, the same start as ``prompts``
    train: object | None
    cfg: TrainConfig
    trackers: list = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)   # this cell's positions in the job list
    notes: list[str] = field(default_factory=list)
    n_params: int = 0


def run_cells(ws: Workspace, specs: list[CellSpec], progress: bool = False,
              on_log: Callable[[dict], None] | None = None, per_image: bool = False):
    """Several cells of one variant and task (e.g. its seeds), trained together in shared
    decoder passes (see ``train_many``), then evaluated together. Returns a list of
    (result dict, prompts, loss log); with ``per_image`` each result also holds "per_image",
    the test statistics of a paired bootstrap (``ssprompt.evaluation.records.PerImage``)."""
    t0 = time.time()
    if any(sp.task != specs[0].task or sp.n_test != specs[0].n_test for sp in specs):
        raise ValueError("run_cells: every cell must share the task and test split")
    cells, jobs, hooks = [], [], []
    for spec in specs:
        test = ws.dataset(spec.task, "test", n_test=spec.n_test)

        def make(spec=spec, names=test.class_names):
            torch.manual_seed(spec.seed)
            return build_state(ws.sfm, names, spec.prompt,
                               generator=torch.Generator().manual_seed(spec.seed))

        prompts = make()
        train = ws.dataset(spec.task, "train", shots=spec.shots, seed=spec.seed) \
            if prompts.needs_shots else None
        cell = _Cell(spec, prompts, make, train,
                     TrainConfig(**{**asdict(spec.train), "seed": spec.seed}))
        cell.n_params = prompts.num_trainable()
        cells.append(cell)
        if train is None:
            continue
        if len(train) >= getattr(train, "pool_size", len(train) + 1):
            cell.notes.append(f"shots {spec.shots} uses every image of the train split: seeds "
                              "change only the batch order, not the shots")
        sel = spec.selection
        fl = folds(len(train), spec.seed, sel.holdout) if sel.enabled \
            else [(range(len(train)), [])]
        if not fl:
            cell.notes.append(f"shots {len(train)}: no shot can be held out to check the "
                              "learned prompts, so the default prompts are kept (switch held-out "
                              "selection off to train anyway)")
            continue
        for i, (fit, held) in enumerate(fl):
            p = prompts if i == 0 else make()
            cell.jobs.append(len(jobs))
            jobs.append((p, Subset(train, fit) if held else train, cell.cfg))
            tracker = Tracker(ws.sfm, p, Subset(train, held), ws.cache, sel.every,
                              cell.cfg.steps, ws.eval_batch) if held else None
            if tracker is not None:
                cell.trackers.append(tracker)
            hooks.append(tracker)
    loggers = [on_log if j == 0 else None for j in range(len(jobs))]
    logs = train_many(ws.sfm, jobs, ws.cache, progress=progress, on_step=hooks, on_log=loggers)
    # a state fitted to its shots without optimiser steps (training-free: Tip-Adapter, PerSAM)
    # is held-out-scored once, as the candidate of the last step
    for tracker in hooks:
        if tracker is not None and not tracker.curve:
            tracker(tracker.steps - 1)
    for cell in cells:   # what the method fitted (e.g. Tip-Adapter-F's keys exist after prepare)
        cell.n_params = max(cell.n_params, cell.prompts.num_trainable())
    # selection, then one evaluation pass over the test split for every cell's final prompts
    # (and its unselected last-step prompts where they differ)
    moved = [cell.prompts.moved() for cell in cells]
    picks = _select(ws, cells, progress)
    test = ws.dataset(specs[0].task, "test", n_test=specs[0].n_test)
    # every state's prompts on the test split, in one pass per decoder: the frozen SFM's
    # (every prompt-only method together), each decode-adapting state's own
    states = [cell.prompts for cell in cells] + [raw for _, raw in picks if raw is not None]
    with torch.no_grad():
        sets = [st() for st in states]
    metrics: list = [None] * len(states)
    by_decoder: dict[int, list[int]] = {}
    for i, st in enumerate(states):
        by_decoder.setdefault(id(st) if st.adapts_decode else 0, []).append(i)
    for key, idx in by_decoder.items():
        sfm = adapted_sfm(ws.sfm, states[idx[0]]) if key else ws.sfm
        for i, m in zip(idx, evaluate_many(sfm, [sets[i] for i in idx], test, ws.cache,
                                           batch=ws.eval_batch, indices=shard(len(test)),
                                           per_image=per_image)):
            metrics[i] = m
    for m in metrics[len(cells):]:
        m.pop("per_image", None)
    if not per_image:
        for m in metrics:
            m.pop("per_image", None)
    raws = iter(metrics[len(cells):])
    wall = (time.time() - t0) / len(specs)
    out = []
    for cell, (selection, raw), m, move in zip(cells, picks, metrics, moved):
        log = logs[cell.jobs[0]] if cell.jobs else []
        for note in cell.notes:
            warnings.warn(note, stacklevel=2)
        raw_m = None if raw is None else \
            {k: v for k, v in next(raws).items() if k != "per_class"}
        result = {**m, "trained_params": cell.n_params, "wall_s": round(wall, 2),
                  "weights_hash": ws.sfm.weights_hash(),
                  "final_loss": log[-1]["loss"] if log else None,
                  "selection": selection, "raw": raw_m, "z_moved": move,
                  "warnings": cell.notes,
                  "spec": cell.spec.as_dict()}
        out.append((result, cell.prompts, log))
    return out


def _select(ws: Workspace, cells: list[_Cell], progress: bool) -> list[tuple]:
    """Apply held-out selection to each cell's prompts in place: decide on the folds, then one
    batched refit on all k shots for the cells that ship a learned step (and, with
    ``report_raw``, that also run to the last step). Returns per cell (what was selected, with
    the held-out curves; the as-trained last-step state of the refit with ``report_raw``,
    else None)."""
    out: list[list] = [[None, None] for _ in cells]
    refits = []                  # (position, selected step or None, fresh prompts)
    for i, cell in enumerate(cells):
        if cell.train is None:
            continue
        if not cell.jobs:        # k = 1: nothing to validate on
            cell.prompts.restore_defaults(ws.sfm)
            out[i][0] = {"selected": "default", "reason": "no held-out shot"}
            continue
        if not cell.trackers:    # selection switched off: the prompts as trained
            continue
        sel = cell.spec.selection
        step, curve, default, test = decide(cell.trackers, sel)
        out[i][0] = {"rule": f"sign-flip max-T test of the per-image held-out mIoU/AP50/PQ "
                             f"every {sel.every} steps, family-wise alpha {sel.alpha} over "
                             f"{test.get('n_candidates', 0)} candidates; "
                             f"{len(cell.trackers)} cross-fitted folds",
                     "default_score": round(default, 4), "curve": curve,
                     "folds": [t.curve for t in cell.trackers],
                     "default_folds": [t.default for t in cell.trackers], "test": test,
                     "selected": "default" if step is None else step,
                     "refit": step is not None}
        if step is None:
            cell.prompts.restore_defaults(ws.sfm)
        if step is not None or sel.report_raw:
            refits.append((i, step, cell.make()))
    if not refits:
        return [tuple(o) for o in out]
    # one batched refit on all k shots, to the last step where the as-trained prompts are
    # scored too, else to the last selected step; each cell's selected step is snapshotted
    full = any(cells[i].spec.selection.report_raw for i, _, _ in refits)
    stop = cells[refits[0][0]].cfg.steps if full else max(st for _, st, _ in refits)
    snaps: dict[int, dict] = {}

    def snapshot(i, step, fresh):
        return lambda done0: snaps.__setitem__(i, copy.deepcopy(fresh.state_dict())) \
            if done0 + 1 == step else None

    train_many(ws.sfm, [(fresh, cells[i].train, cells[i].cfg) for i, _, fresh in refits],
               ws.cache, progress=progress, on_step=[snapshot(i, st, fr) for i, st, fr in refits],
               stop_at=stop)
    for i, step, fresh in refits:
        if cells[i].spec.selection.report_raw:   # the as-trained state (all shots, last step)
            out[i][1] = copy.deepcopy(fresh) if step is not None else fresh
        if step is not None:     # the refit at the selected step ships (a training-free state:
            if i in snaps:       # as fitted to all k shots)
                fresh.load_state_dict(snaps[i])
            cells[i].prompts = fresh
    return [tuple(o) for o in out]
