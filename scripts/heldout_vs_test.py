"""What the held-out shots show of a cell against what its test split shows: is a loss on test
visible on the held-out images at all?

    python scripts/heldout_vs_test.py --out results/shots/heldout_vs_test.md

For each variant and seed of one task at one k >= 16 (one held-out fold, as in the study), the
cell is trained as the study trains it (same config, same shots, same fold) and the prompts of
every scored step are evaluated on the fitted shots, the held-out shots and the test split,
each pooled over its images (as a split's metrics are computed), as differences to the default
prompts on the same images. It also applies the study's selection rule (``decide``), so the
selected step is the study's. Writes OUT (Markdown) and OUT with .json, and prints the table.

Used to check whether any held-out rule could have rejected the shots sweep's last worse cells
(learned-only, novel, seed 2): not a tuning tool, it reads the test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ssprompt.engine.cell import Workspace
from ssprompt.engine.selection import (
    Subset,
    Tracker,
    decide,
    default_embeddings,
    folds,
    pooled_scores,
)
from ssprompt.engine.train import TrainConfig, train_many
from ssprompt.evaluation.evaluate import evaluate_many
from ssprompt.evaluation.metrics import METRICS
from ssprompt.io import write_json, write_text
from ssprompt.prompts.promptset import PromptSet
from ssprompt.sfm import load_sfm
from ssprompt.sfm.features import FeatureCache
from ssprompt.study.config import CONFIG_DIR, load_config

LARGE_LOSS = 5.0  # points below the defaults on test: a worse cell (as the study's worse_cells)


def run(config: Path, task: str, k: int, variants: list[str], seeds: list[int]) -> list[dict]:
    torch.set_num_threads(2)
    cfg = load_config(config)
    ws = Workspace(load_sfm("embedded", device="cpu"), FeatureCache())
    test = ws.dataset(task, "test", n_test=cfg.n_test)
    rows = []
    for name in variants:
        variant = cfg.variant(name)
        cells = []
        for seed in seeds:
            torch.manual_seed(seed)
            prompts = PromptSet(ws.sfm, test.class_names, variant.prompt,
                                generator=torch.Generator().manual_seed(seed))
            train = ws.dataset(task, "train", shots=k, seed=seed)
            fl = folds(len(train), seed, cfg.selection.holdout)
            if len(fl) != 1:
                sys.exit(f"--k {k}: use k >= 16 (one held-out fold); got {len(fl)} folds")
            fit, held = fl[0]
            tcfg = TrainConfig(**{**cfg.train, **variant.train, "seed": seed})
            tracker = Tracker(ws.sfm, prompts, Subset(train, held), ws.cache,
                              cfg.selection.every, tcfg.steps, ws.eval_batch)
            cells.append((seed, prompts, train, fit, held, tcfg, tracker))
        train_many(ws.sfm, [(p, Subset(tr, fit), c) for _, p, tr, fit, _, c, _ in cells],
                   ws.cache, on_step=[t for *_, t in cells])
        for seed, prompts, train, fit, held, _, tracker in cells:
            selected, _, _, _ = decide([tracker], cfg.selection)
            steps = sorted(tracker.states)
            sets = [default_embeddings(prompts, ws.sfm)]
            for s in steps:
                prompts.load_state_dict(tracker.states[s])
                with torch.no_grad():
                    sets.append(tuple(None if x is None else x.detach().clone()
                                      for x in prompts()))
            deltas = {}
            for split, ds in (("fit", Subset(train, fit)), ("held", Subset(train, held)),
                              ("test", test)):
                ms = evaluate_many(ws.sfm, sets, ds, ws.cache, batch=ws.eval_batch,
                                   per_image=True)
                p = [pooled_scores(m["per_image"]) for m in ms]
                deltas[split] = [p[i + 1] - p[0] for i in range(len(steps))]
            for i, s in enumerate(steps):
                rows.append({"variant": name, "seed": seed, "step": s,
                             "selected": selected == s,
                             **{f"{split}_{m}": round(float(deltas[split][i][j]), 2)
                                for split in ("fit", "held", "test")
                                for j, m in enumerate(METRICS)}})
            print(f"{name} seed {seed}: selected {selected or 'default'}", flush=True)
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [f"# Held-out shots against test ({args.task}, k = {args.k})", "",
             ("Each scored step's prompts, as differences to the default prompts on the same "
              "images (points; each split's metrics pooled over its images). `*`: the step the "
              "study's selection rule picks. Written by `scripts/heldout_vs_test.py`."), "",
             "| variant | seed | step | " + " | ".join(
                 f"{s} {m}" for s in ("held", "fit", "test") for m in METRICS) + " |",
             "|---|---:|---:|" + "---:|" * (3 * len(METRICS))]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['step']}{' *' if r['selected'] else ''}"
                     " | " + " | ".join(f"{r[f'{s}_{m}']:+.1f}" for s in ("held", "fit", "test")
                                        for m in METRICS) + " |")
    worse = [r for r in rows if r["selected"]
             and min(r[f"test_{m}"] for m in METRICS) < -LARGE_LOSS]
    lines += ["", f"Selected steps more than {LARGE_LOSS:g} points below the defaults on test: "
              f"{len(worse)}" + "".join(
                  f"; {r['variant']} seed {r['seed']} step {r['step']}: held-out "
                  + ", ".join(f"{m} {r[f'held_{m}']:+.1f}" for m in METRICS) + ", test "
                  + ", ".join(f"{m} {r[f'test_{m}']:+.1f}" for m in METRICS) for r in worse)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG_DIR / "shots.yaml")
    ap.add_argument("--task", default="novel")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--variants", default="ssprompt-k16,learned-only-k16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    rows = run(a.config, a.task, a.k, a.variants.split(","),
               [int(s) for s in a.seeds.split(",")])
    md = markdown(rows, a)
    write_json(a.out.with_suffix(".json"), {"args": {k: str(v) for k, v in vars(a).items()},
                                            "rows": rows})
    write_text(a.out, md)
    print(md)


if __name__ == "__main__":
    main()
