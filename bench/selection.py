"""Held-out selection's level and power (issue 29): its simulated false acceptance over all
candidate steps with no true gain, and its power on the committed shots sweep (the share of
seeds whose as-trained prompts gain >= +2 points on test that it ships).

    python -m bench.selection            # prints the rows
    python -m bench --only selection     # and stores them in bench/results.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "results" / "shots" / "results.json"


def false_acceptance(k: int = 16, reps: int = 1000, m: int = 10, folds: int = 4,
                     seed: int = 0) -> float:
    """Share of runs in which ``decide`` ships a step when none is better than the defaults:
    ``m`` candidate steps whose per-image differences on the k cross-fitted held-out images
    are N(0, 3) noise."""
    from ssprompt.engine.selection import decide

    class Fold:   # a fold's held-out record, one column per metric
        def __init__(self, d):
            base = np.full((d.shape[1], 3), 50.0)
            self.default_images, self.default = base, {"score": 50.0}
            self.images = {10 * (j + 1): base + d[j][:, None] for j in range(len(d))}
            self.curve = [{"step": s, "score": float(x.mean())} for s, x in self.images.items()]
            self.default_pooled = base.mean(0)
            self.pooled = {s: x.mean(0) for s, x in self.images.items()}

    rng = np.random.default_rng(seed)
    shipped = 0
    for _ in range(reps):
        d = rng.normal(0, 3, (m, k))
        shipped += decide([Fold(d[:, f::folds]) for f in range(folds)])[0] is not None
    return shipped / reps


def power(path: Path = SHOTS, gain: float = 2.0) -> dict:
    """Per shots row: among the seeds whose as-trained Δ (mean of the metrics) is >= ``gain``,
    how many selection shipped (from the sweep's summary, ``intervals.shipped``)."""
    if not path.exists():
        return {}
    shipped = (json.loads(path.read_text()).get("intervals") or {}).get("shipped") or {}
    out = {}
    for row, tasks in shipped.items():
        for task, e in tasks.items():
            pw = e.get("power")
            if pw:
                out[f"{row} / {task}"] = [pw["shipped"], pw["seeds"]]
    total = [sum(v[0] for v in out.values()), sum(v[1] for v in out.values())]
    return {"rows": out, "total": total, "gain_at_least": gain}


def bench_selection() -> dict:
    return {"false_acceptance_k16": false_acceptance(16), "false_acceptance_k32":
            false_acceptance(32, reps=300), "power": power(), "target": "false acceptance <= 0.05"}


def render(r: dict) -> list[str]:
    lines = [f"| selection: false acceptance, no true gain, 10 steps, k = 16 / 32 | "
             f"{r['false_acceptance_k16']:.3f} / {r['false_acceptance_k32']:.3f} | <= 0.05 |"]
    p = r.get("power") or {}
    if p.get("total") and p["total"][1]:
        s, n = p["total"]
        lines.append(f"| selection: power on results/shots (ships / as-trained gain >= "
                     f"+{p['gain_at_least']:g}) | {s}/{n} = {s / n:.2f} | |")
    return lines


if __name__ == "__main__":
    r = bench_selection()
    print("\n".join(render(r)))
    for k, v in (r["power"].get("rows") or {}).items():
        print(f"  {k}: shipped {v[0]} of {v[1]}")
