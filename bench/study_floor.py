"""How fast could the default study be on this machine? Its model work, counted in FLOPs.

For every (variant, task) group of a study config, the FLOPs of the work every run must do:
- training: one real ``train_many`` step of the group's seeds (and folds) together (forward,
  backward, optimiser), times the configured steps (a refit after leave-one-out folds is left
  out);
- held-out selection: one evaluation per seed of the default prompts and one every
  ``selection.every`` steps, on the held-out shots;
- test evaluation: one per seed (one per group for variants with nothing to learn) on the test
  split; the evaluation of unselected prompts (``report_raw``) is left out, so this is a floor.
Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, attention, einsums; no
element-wise work, no matching, no metrics), then divided by this CPU's matmul peak (a large
fp32 ``torch.mm``) and by the prompt step's achieved FLOP/s: the first is a hard lower bound
on the study's wall time, the second what the model work costs at the rate it runs now.

    python -m bench --only study_floor
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def study_flops(config: str | None = None, eval_images: int = 8) -> dict:
    """FLOPs of the default (or given) study config's model work, by part and by group."""
    from ssprompt.data import open_dataset
    from ssprompt.evaluation.evaluate import evaluate
    from ssprompt.sfm.features import FeatureCache
    from ssprompt.prompts.promptset import PromptSet
    from ssprompt.engine.selection import Subset, folds
    from ssprompt.sfm import load_sfm
    from ssprompt.study.config import CONFIG_DIR, load_config
    from ssprompt.engine.train import TrainConfig, train_many

    cfg = load_config(config or CONFIG_DIR / "default.yaml")
    sfm = load_sfm("embedded", device="cpu")
    cache = FeatureCache()
    per_image: dict = {}   # (task, n_prompts, agnostic) -> evaluation FLOPs of one image
    totals = {"train": 0, "selection": 0, "test": 0}
    groups = []
    for task in cfg.tasks:
        test = open_dataset(task, "test", n_test=cfg.n_test)
        n_test = len(test)
        for v in cfg.variants:
            seeds = list(cfg.seeds)
            shots = cfg.shots_of(v)
            make = [PromptSet(sfm, test.class_names, v.prompt,
                              generator=torch.Generator().manual_seed(s)) for s in seeds]
            with torch.no_grad():
                sp, se = make[0]()
            key = (task, sp.shape[-2], se is None)
            if key not in per_image:
                sub = Subset(test, range(min(eval_images, n_test)))
                evaluate(sfm, sp, se, sub, cache)   # features outside the count
                per_image[key] = _flops(lambda: evaluate(sfm, sp, se, sub, cache)) / len(sub)
            one = per_image[key]
            g = {"variant": v.name, "task": task, "train": 0, "selection": 0}
            if v.fixed or not make[0].num_trainable():
                g["test"] = one * n_test
            else:
                tc = TrainConfig(**{**cfg.train, **v.train})
                jobs = []
                held = 0
                for s, p in zip(seeds, make):
                    train = open_dataset(task, "train", shots=shots, seed=s)
                    fl = folds(len(train), s, cfg.selection.holdout) \
                        if cfg.selection.enabled else [(range(len(train)), [])]
                    for fit, out in fl:   # k = 1: no fold, the defaults are kept untrained
                        held += len(out)
                        jobs.append((p, Subset(train, fit),
                                     TrainConfig(**{**asdict(tc), "steps": 1, "seed": s})))
                if jobs:
                    train_many(sfm, jobs, cache)      # features outside the count
                    g["train"] = _flops(lambda: train_many(sfm, jobs, cache)) * tc.steps
                checks = 1 + math.ceil(tc.steps / cfg.selection.every) \
                    if cfg.selection.enabled else 0
                g["selection"] = one * held * checks
                g["test"] = one * n_test * len(seeds)
            for k in totals:
                totals[k] += g[k]
            groups.append(g)
    return {"config": cfg.name, "flop": totals, "total_flop": sum(totals.values()),
            "groups": groups}


def bench_study_floor(step_flop_s: float | None = None, peak: float | None = None) -> dict:
    """``study_flops`` of the default study, and the wall time it implies on this CPU at its
    matmul ``peak`` FLOP/s (measured here unless given)."""
    from bench.core import matmul_peak_flops

    out = study_flops()
    peak = peak or matmul_peak_flops()
    out["peak_flop_s_matmul"] = peak
    out["floor_s_at_peak"] = out["total_flop"] / peak
    if step_flop_s:
        out["achieved_flop_s_prompt_step"] = step_flop_s
        out["s_at_prompt_step_rate"] = out["total_flop"] / step_flop_s
    out["how"] = ("FlopCounterMode over one real training step per (variant, task) group x "
                  "steps, plus evaluations per image x (held-out checks + one test pass per "
                  "seed); unselected-prompt evaluations, element-wise work, matching and "
                  "metrics not counted; peak = a 2048 x 2048 fp32 torch.mm on the same threads")
    return out


def bench_study_workers(variants=("ssprompt", "sem-weighted", "spa-weighted", "ssprompt-N50"),
                        task: str = "novel") -> dict:
    """Wall time of a slice of the default study (``variants`` on ``task``, 3 seeds each) run
    as one process and as ``--workers 2`` processes, and whether the cells agree. Shows what
    ``--workers`` buys on this machine: at the same threads per process the cells are
    identical; at fewer threads per process they move within the seed spread."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    from ssprompt.study import CONFIG_DIR

    root = Path(__file__).resolve().parents[1] / "runs" / "bench-workers"
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    raw.update(name="bench-workers", tasks=[task], comparisons=[],
               variants=[v for v in raw["variants"] if v["name"] in variants])
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))

    def cells(run: Path) -> dict:
        keep = ("mIoU", "AP50", "PQ", "per_class", "selection", "raw", "loss_log")
        return {f.name: {k: json.loads(f.read_text()).get(k) for k in keep}
                for f in sorted((run / "cells").glob("*.json"))}

    out = {"groups": len(raw["variants"]), "task": task}
    runs = {}
    for name, extra in [("1x2", ["--threads", "2"]), ("2x2", ["--workers", "2", "--threads", "2"]),
                        ("2x1", ["--workers", "2", "--threads", "1"])]:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ssprompt.cli", "study", "--config", str(cfg),
                        "--out", str(root / name), "--force", "--device", "cpu", *extra],
                       check=True, capture_output=True)
        out[f"wall_s_{name}"] = time.perf_counter() - t
        runs[name] = cells(root / name)
    out["identical_2x2_vs_1x2"] = runs["2x2"] == runs["1x2"]
    out["identical_2x1_vs_1x2"] = runs["2x1"] == runs["1x2"]
    return out
