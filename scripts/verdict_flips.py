"""How many of a study's verdicts flip when the same study runs again on a perturbed machine
(another torch thread count, another CPU): a robustness check of summary.md's stars.

    python scripts/verdict_flips.py results/default runs/default-threads1 --out results/default/robustness.md

A verdict is the sign an interval gives a difference (every row's Δ to its baseline, every
comparison, every gain comparison; per task and metric): ``+`` (the 95% interval lies above 0),
``-`` (below 0) or ``0`` (it contains 0: no detectable difference). A verdict that differs
between the two runs is *not robust*. Writes OUT (Markdown) and OUT with .json (every verdict
of both runs, the flips), and prints the count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def verdicts(results: dict) -> dict[str, dict]:
    """{"a - b | task | metric": interval dict} of one results.json."""
    iv = results.get("intervals") or {}
    out = {}
    for e in iv.get("pairs", []):
        for t, ms in e["tasks"].items():
            for m, d in ms.items():
                out[f"{e['a']} - {e['b']} | {t} | {m}"] = d
    for e in iv.get("gains", []):
        for t, ms in e["tasks"].items():
            for m, d in ms.items():
                out[f"({e['a']} - {e['base_a']}) - ({e['b']} - {e['base_b']}) | {t} | {m}"] = d
    return out


def sign(d: dict) -> str:
    if d["lo"] is None or d["hi"] is None or d["lo"] != d["lo"] or d["hi"] != d["hi"]:
        return "?"
    return "+" if d["lo"] > 0 else "-" if d["hi"] < 0 else "0"


def cell_changes(first: dict, second: dict) -> tuple[int, int, int]:
    """(cells in both runs, cells whose mIoU, AP50 or PQ differ, cells whose selection chose
    another step) between two results.json."""
    def key(c):
        return c["variant"], c["task"], c["seed"]

    def selected(c):
        return (c.get("selection") or {}).get("selected")

    b = {key(c): c for c in second.get("cells", [])}
    pairs = [(c, b[key(c)]) for c in first.get("cells", []) if key(c) in b]
    moved = sum(any(x.get(m) != y.get(m) for m in ("mIoU", "AP50", "PQ")) for x, y in pairs)
    return len(pairs), moved, sum(selected(x) != selected(y) for x, y in pairs)


def fmt(d: dict) -> str:
    return f"{d['delta']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", help="a study run folder (its results.json)")
    p.add_argument("second", help="the same study rerun on a perturbed machine")
    p.add_argument("--out", required=True, help="Markdown report (a .json beside it)")
    a = p.parse_args(argv)
    runs = []
    for folder in (a.first, a.second):
        path = Path(folder) / "results.json"
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read a study's results ({e})", file=sys.stderr)
            return 2
    va, vb = (verdicts(r) for r in runs)
    if not va or set(va) != set(vb):
        print(f"{a.first}, {a.second}: not the same study (their intervals differ in what they "
              "compare)", file=sys.stderr)
        return 2
    rows, flips = [], []
    for key in va:
        sa, sb = sign(va[key]), sign(vb[key])
        rows.append({"verdict": key, "first": va[key], "second": vb[key], "sign_first": sa,
                     "sign_second": sb, "flipped": sa != sb})
        if sa != sb:
            flips.append(rows[-1])
    starred = sum(r["sign_first"] in "+-" for r in rows)
    lines = [f"# Robustness: {a.first} vs {a.second}", "",
             f"{len(rows)} verdicts (every Δ and comparison, per task and metric); "
             f"{starred} exclude 0 in the first run. **{len(flips)} flip** (not robust):", ""]
    if flips:
        lines += ["| verdict | first run | second run |", "|---|---|---|"]
        lines += [f"| {r['verdict']} | {fmt(r['first'])} {r['sign_first']} | "
                  f"{fmt(r['second'])} {r['sign_second']} |" for r in flips]
    else:
        lines.append("none.")
    n, moved, reselected = cell_changes(*runs)
    lines += ["", f"Cells: {moved} of {n} differ in mIoU, AP50 or PQ; selection chose another "
              f"step in {reselected}."]
    for r, w in zip(runs, (a.first, a.second)):
        wall = r.get("study_wall_s")
        lines.append("")
        lines.append(f"- {w}: study wall time "
                     f"{'?' if wall is None else f'{wall / 60:.1f} min'}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"n_verdicts": len(rows),
                                                    "n_flips": len(flips), "n_cells": n,
                                                    "n_cells_moved": moved,
                                                    "n_cells_reselected": reselected,
                                                    "verdicts": rows},
                                                   indent=1))
    print(f"{len(flips)} of {len(rows)} verdicts flip; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
