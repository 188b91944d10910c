"""Few-shot prompt learning on a frozen SFM: one readable loop.

It sees a method only through its protocol (``ssprompt.methods.base.MethodState``): the
state's decoder inputs, its ``prepare`` (fit to the shots), ``param_groups``, ``regulariser``
and ``decode``. Only the state's parameters train; every SFM parameter is frozen and in eval
mode. Image features of the k training images come from the feature cache, so the image
encoder runs once per image.

Several prompt sets (say, the seeds of one variant) can train together: their batches are
concatenated into one decoder pass, and since every sample is decoded independently and each
set's loss only reaches its own parameters, each set follows the same trajectory it would
alone, at a fraction of the wall time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from tqdm import tqdm

from ..distributed import all_reduce_mean_, rank_world
from ..errors import UserError
from ..geometry import geometry_of
from ..methods.base import MethodState
from ..sfm.base import Features, PromptableSFM, autocast
from ..sfm.features import FeatureCache
from ..sfm.losses import set_losses


class NonFiniteLoss(UserError):
    """Training diverged: the loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Few-shot optimisation; the defaults were chosen on the `val` split (see README)."""

    steps: int = 100
    lr: float = 3e-3               # AdamW; the semantic embeddings' (and vanilla_2d's points')
    weight_decay: float = 0.05
    weight_lr_mult: float = 10.0   # fusion-weight logits: 10x lr, no weight decay
    spatial_lr_mult: float = 5.0   # spatial embeddings: lr x 5 (their scale is ~10x larger)
    anchor: float = 10.0           # + anchor * relative squared drift of z_learned from z_default
    #                                (the state's regulariser, PromptSet.drift): only a
    #                                consistent signal moves a prompt
    batch: int = 8
    warmup: int = 10
    seed: int = 0
    log_every: int = 10


# what a config may set in TrainConfig (the seed comes from the cell)
TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"seed"}


class _Run:
    """One method state's data, optimiser and batch order."""

    def __init__(self, sfm, prompts: MethodState, dataset, cfg: TrainConfig,
                 cache: FeatureCache):
        self.prompts, self.cfg = prompts, cfg
        scenes = [dataset[i] for i in range(len(dataset))]
        if prompts.agnostic:  # no class prompts (SAM): class-agnostic, as evaluate()
            from ..data.views import class_agnostic
            scenes = [class_agnostic(s) for s in scenes]
        self.feats = cache.get(sfm, [s.image for s in scenes])
        device = next(iter(self.feats.tensors.values())).device
        self.targets = []
        for s in scenes:
            labels, masks = s.targets(geometry_of(sfm))  # in the frame the SFM sees
            self.targets.append((torch.from_numpy(labels).to(device),
                                 torch.from_numpy(masks).to(device)))
        prompts.prepare(sfm, self.feats, self.targets)   # fit what the shots determine
        self.params = prompts.trainable()
        groups = [g for g in prompts.param_groups(cfg) if g["params"]]
        self.opt = prompts.optimizer(groups, cfg) if groups else None
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.batch = min(cfg.batch, len(scenes))
        self.order: list[int] = []
        self.log: list[dict] = []

    def next_batch(self) -> list[int]:
        if len(self.order) < self.batch:
            self.order += torch.randperm(len(self.targets), generator=self.g).tolist()
        idx, self.order = self.order[:self.batch], self.order[self.batch:]
        rank, world = rank_world()
        return idx[rank::world] or idx[:1]  # torchrun: each rank takes its share of the batch


def train_prompts(sfm: PromptableSFM, prompts: MethodState, dataset, cfg: TrainConfig,
                  cache: FeatureCache | None = None, progress: bool = False,
                  on_step: Callable[[int], None] | None = None,
                  stop_at: int | None = None) -> list[dict]:
    """Optimise ``prompts`` on every scene of ``dataset``; returns the loss log. ``stop_at``:
    see ``train_many``."""
    return train_many(sfm, [(prompts, dataset, cfg)], cache, progress, [on_step],
                      stop_at=stop_at)[0]


def train_many(sfm: PromptableSFM, jobs: list[tuple[MethodState, object, TrainConfig]],
               cache: FeatureCache | None = None, progress: bool = False,
               on_step: list[Callable[[int], None] | None] | None = None,
               on_log: list[Callable[[dict], None] | None] | None = None,
               stop_at: int | None = None) -> list[list[dict]]:
    """Train several method states in shared decoder passes; jobs must agree on ``steps``.
    Every state that ``needs_shots`` is ``prepare``d with its shots; those with trainable
    parameters then train (a state that adapts ``decode`` is decoded on its own, the others
    together).
    ``on_step[j](step)`` is called after each optimiser step of job ``j`` (0-based), e.g. to
    score the prompts on held-out shots (``ssprompt.engine.selection``); ``on_log[j](row)``
    with each loss-log row of job ``j`` as it is written (a live log file). ``stop_at``: stop
    after that many optimiser steps of the full ``steps``-step schedule (warmup and cosine decay
    as in the full run), so the prompts are exactly those of the full run after ``stop_at``
    steps: the refit of a selected step keeps the schedule that was validated."""
    cache = cache if cache is not None else FeatureCache()
    hooks = on_step or [None] * len(jobs)
    loggers = on_log or [None] * len(jobs)
    runs, run_hooks, run_loggers = [], [], []
    for (p, d, c), hook, logger in zip(jobs, hooks, loggers):
        if p.needs_shots:
            run = _Run(sfm, p, d, c, cache)   # prepares the state with its shots
            if run.params:
                runs.append(run)
                run_hooks.append(hook)
                run_loggers.append(logger)
    if not runs:
        return [[] for _ in jobs]
    steps = runs[0].cfg.steps
    if any(r.cfg.steps != steps for r in runs):
        raise UserError("train_many: every job must use the same number of steps")
    stop = steps if stop_at is None else stop_at
    if not 1 <= stop <= steps:
        raise ValueError(f"train_many: stop_at must be in 1..{steps}, got {stop_at}")
    # every run's features in one batch, so that a step's batch is one gather (one copy)
    all_feats = Features.cat([r.feats for r in runs]) if len(runs) > 1 else runs[0].feats
    offsets = [0]
    for r in runs[:-1]:
        offsets.append(offsets[-1] + len(r.feats))
    for step in tqdm(range(stop), desc="prompt learning", disable=not progress, leave=False):
        batches = [r.next_batch() for r in runs]
        spatial, semantic = [], []
        for r, idx in zip(runs, batches):
            lr = r.prompts.lr_at(step, steps, r.cfg)
            for group in r.opt.param_groups:
                group["lr"] = lr * group["lr_mult"]
            sp, se = r.prompts()
            spatial.append(sp.expand(len(idx), -1, -1) if sp.dim() == 2 else sp)
            semantic.append(None if se is None else se.expand(len(idx), -1, -1))
        feats = all_feats.index([o + i for o, idx in zip(offsets, batches) for i in idx])
        targets = [[r.targets[i] for i in idx] for r, idx in zip(runs, batches)]
        if any(r.prompts.adapts_decode for r in runs):
            losses = _own_decodes(sfm, runs, feats, batches, spatial, semantic, targets)
        else:
            sem = None if semantic[0] is None else torch.cat(semantic)
            args = (feats, torch.cat(spatial), sem) if len(runs) > 1 else \
                (feats, spatial[0][0], None if sem is None else sem[0])
            # a backend's own set_losses(decode(..)) that holds less (SAM 3); on the class: a
            # wrapper that forwards attributes but adapts decode must not reach it
            own = getattr(type(sfm), "decode_losses", None)
            with autocast(next(iter(feats.tensors.values())).device):
                out = own(sfm, *args, targets) if own is not None else sfm.decode(*args)
            losses = out if own is not None else set_losses(out, targets)
        total, parts_all = 0.0, []
        for r, (loss, parts) in zip(runs, losses):
            if r.cfg.anchor:
                loss = loss + r.cfg.anchor * r.prompts.regulariser()
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"step {step}: loss is {float(loss.detach())}; lower --lr")
            total = total + loss
            parts_all.append((loss, parts))
        for r in runs:
            r.opt.zero_grad(set_to_none=True)
        total.backward()
        for r, (loss, parts), logger in zip(runs, parts_all, run_loggers):
            all_reduce_mean_(r.params)
            r.opt.step()
            if step % r.cfg.log_every == 0 or step in (steps - 1, stop - 1):
                r.log.append({"step": step, "loss": round(float(loss.detach()), 5),
                              **{k: round(v, 5) for k, v in parts.items()}})
                if logger is not None:
                    logger(r.log[-1])
        for hook in run_hooks:
            if hook is not None:
                hook(step)
    logs = {id(r.prompts): r.log for r in runs}
    return [logs.get(id(p), []) for p, _, _ in jobs]


def _own_decodes(sfm, runs, feats, batches, spatial, semantic, targets):
    """One decoder pass per run (some state adapts ``decode``): each state decodes its own
    images with its own ``decode``."""
    losses, start = [], 0
    device = next(iter(feats.tensors.values())).device
    for r, idx, sp, se, tg in zip(runs, batches, spatial, semantic, targets):
        part = feats.index(list(range(start, start + len(idx))))
        start += len(idx)
        with autocast(device):
            out = r.prompts.decode(sfm, part, sp, se)
        losses += set_losses(out, [tg])
    return losses


def check_train_values(where: str, values: dict) -> dict:
    """``values`` as TrainConfig fields: unknown keys and values of the wrong type are refused
    in one line; an int is accepted where a float is expected."""
    bad = sorted(set(values) - TRAIN_KEYS)
    if bad:
        raise UserError(f"{where}: unknown key(s) {', '.join(bad)}; allowed: "
                        f"{', '.join(sorted(TRAIN_KEYS))}")
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    out = {}
    for k, v in values.items():
        t = types[k]
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            kind = "a number" if t is float else "an integer"
            raise UserError(f"{where}: {k}={v!r} must be {kind}")
        out[k] = v
    return out
