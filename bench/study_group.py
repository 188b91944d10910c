"""Where one trained group of the default study spends its time, old code against new.

A group is one (variant, task) with all the study's seeds trained together: the unit the study
runs. ``python -m bench --only study_group`` times ``ssprompt`` / ``novel`` (the full-SSPrompt
row) with the default config's seeds, shots, training and selection, split into training steps,
held-out selection and test evaluation, and the steps' FLOP/s against this CPU's matmul peak.
``SSPROMPT_BENCH_OLD=DIR`` runs the same measurement on an older checkout (its own config and
code) in a subprocess first, so both numbers come from the same machine in the same minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

GROUP = ("ssprompt", "novel")


def _seeds() -> int:
    """The seed count of this checkout's default config (the old checkout runs as many)."""
    from ssprompt.study.config import CONFIG_DIR, load_config

    return len(load_config(CONFIG_DIR / "default.yaml").seeds)


def _imports():
    """The names this measurement needs, from a checkout of either layout (round 2 was flat)."""
    try:
        from ssprompt.engine import cell, selection, train
        from ssprompt.study.config import CONFIG_DIR, load_config
    except ImportError:   # round-2 layout
        from ssprompt import experiment as cell
        from ssprompt import selection, train
        from ssprompt.study import CONFIG_DIR, load_config
    return cell, selection, train, CONFIG_DIR, load_config


def measure() -> dict:
    """Run the group once, timing each phase (monkeypatched wrappers, no change to the work),
    with the default config's seeds or ``SSPROMPT_BENCH_SEEDS`` of them."""
    import torch

    torch.set_num_threads(2)
    cell, selection, train, config_dir, load_config = _imports()
    cfg = load_config(config_dir / "default.yaml")
    variant = next(v for v in cfg.variants if v.name == GROUP[0])
    n = os.environ.get("SSPROMPT_BENCH_SEEDS")
    seed_list = list(range(int(n))) if n else list(cfg.seeds)
    from ssprompt.sfm import load_sfm

    try:
        from ssprompt.sfm.features import FeatureCache
    except ImportError:
        from ssprompt.features import FeatureCache
    ws = cell.Workspace(load_sfm("embedded", device="cpu"), FeatureCache())
    spent = {"train_s": 0.0, "test_eval_s": 0.0, "heldout_eval_s": 0.0}

    depth = {k: 0 for k in spent}

    def timed(key, fn):
        def wrapper(*a, **k):   # the outermost call of a key counts (evaluate_many recurses)
            depth[key] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[key] -= 1
                if not depth[key]:
                    spent[key] += time.perf_counter() - t
        return wrapper

    cell.train_many = timed("train_s", cell.train_many)
    cell.evaluate_many = timed("test_eval_s", cell.evaluate_many)
    # held-out selection: each scoring of a tracker (evaluation, per-image and pooled metrics)
    selection.Tracker._score = timed("heldout_eval_s", selection.Tracker._score)
    # warm the feature cache (the study encodes each image once, outside any group's cost)
    test = ws.dataset(GROUP[1], "test", n_test=cfg.n_test)
    ws.cache.get(ws.sfm, [test[i].image for i in range(len(test))])
    for s in seed_list:
        tr = ws.dataset(GROUP[1], "train", shots=cfg.shots, seed=s)
        ws.cache.get(ws.sfm, [tr[i].image for i in range(len(tr))])
    specs = [cell.CellSpec(task=GROUP[1], prompt=variant.prompt,
                           train=train.TrainConfig(**{**cfg.train, **variant.train}),
                           shots=cfg.shots, seed=s, n_test=cfg.n_test, selection=cfg.selection)
             for s in seed_list]
    t = time.perf_counter()
    results = cell.run_cells(ws, specs, per_image=True)
    total = time.perf_counter() - t
    spent["train_s"] -= spent["heldout_eval_s"]     # selection runs inside training's hooks
    # (per_set_step_ms below: training alone, the held-out scoring taken out)
    steps = specs[0].train.steps
    return {"seeds": len(seed_list), "group_s": round(total, 2),
            **{k: round(v, 2) for k, v in spent.items()},
            "per_set_step_ms": round(1000 * spent["train_s"] / steps / len(seed_list), 1),
            "selected": [(r.get("selection") or {}).get("selected") for r, _, _ in results],
            "metrics": [{m: r[m] for m in ("mIoU", "AP50", "PQ")} for r, _, _ in results]}


def bench_study_group(step_flop: float | None = None) -> dict:
    """``measure`` for this checkout (and ``SSPROMPT_BENCH_OLD``'s, first). With ``step_flop``
    (the FLOPs of one prompt step of one set, ``bench.core.step_flops``) each code's training
    FLOP/s per set and step, against this CPU's matmul peak measured in the same minutes."""
    out = {}
    old = os.environ.get("SSPROMPT_BENCH_OLD")
    if old:
        code = ("import importlib.util, json, sys; sys.path.insert(0, %r); "
                "spec = importlib.util.spec_from_file_location('study_group', %r); "
                "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                "print(json.dumps(m.measure()))" % (old, __file__))
        r = subprocess.run([sys.executable, "-c", code], cwd=old, capture_output=True,
                           text=True, check=True,
                           env={**os.environ, "SSPROMPT_BENCH_SEEDS": str(_seeds())})
        out["old"] = json.loads(r.stdout.strip().splitlines()[-1])
        out["old_commit"] = subprocess.run(["git", "-C", old, "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    out["new"] = measure()
    if old:
        out["speedup"] = round(out["old"]["group_s"] / out["new"]["group_s"], 2)
    if step_flop:
        from bench.core import matmul_peak_flops

        peak = matmul_peak_flops()
        out["peak_flop_s_matmul"] = round(peak)
        for key in ("old", "new"):
            if key in out:
                rate = step_flop / (out[key]["per_set_step_ms"] / 1000)
                out[key]["train_flop_s"] = round(rate)
                out[key]["train_share_of_matmul_peak"] = round(rate / peak, 3)
    return out
