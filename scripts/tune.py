"""Tune prompt learning's optimiser settings on the `val` split (train-distribution scenes never
drawn as shots), never on test. Writes runs/tune/tune.csv. Usage: python scripts/tune.py"""

from __future__ import annotations

import csv
import itertools
import sys
import time
from pathlib import Path

import torch

from ssprompt.evaluate import evaluate
from ssprompt.experiment import Workspace
from ssprompt.prompts.promptset import PromptConfig, PromptSet
from ssprompt.sfm import load_sfm
from ssprompt.train import TrainConfig, train_prompts

GRID = {"init": ["random", "default"], "lr": [2e-3, 1e-2], "steps": [150]}
TASKS = ["shift", "novel", "stuff"]


def main() -> None:
    torch.set_num_threads(2)
    ws = Workspace(load_sfm("embedded", device="cpu"))
    out = Path("runs/tune")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in TASKS:
        val = ws.dataset(task, "val", n_test=100)
        zs = PromptSet(ws.sfm, val.class_names, PromptConfig("default"))
        m = evaluate(ws.sfm, *zs(), val, ws.cache)
        rows.append({"task": task, "init": "-", "lr": 0, "steps": 0, **{k: m[k] for k in
                     ("mIoU", "AP50", "PQ")}})
        print(rows[-1], flush=True)
        train = ws.dataset(task, "train", shots=16, seed=0)
        for init, lr, steps in itertools.product(*GRID.values()):
            t = time.time()
            ps = PromptSet(ws.sfm, val.class_names, PromptConfig("weighted", init=init),
                           generator=torch.Generator().manual_seed(0))
            log = train_prompts(ws.sfm, ps, train, TrainConfig(steps=steps, lr=lr), ws.cache)
            with torch.no_grad():
                m = evaluate(ws.sfm, *ps(), val, ws.cache)
            rows.append({"task": task, "init": init, "lr": lr, "steps": steps,
                         **{k: m[k] for k in ("mIoU", "AP50", "PQ")},
                         "final_loss": log[-1]["loss"], "s": round(time.time() - t, 1)})
            print(rows[-1], flush=True)
    with open(out / "tune.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[1]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
