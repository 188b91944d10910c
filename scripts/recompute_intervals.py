"""Recompute every interval of a committed study from its committed files, and check them.

    python scripts/recompute_intervals.py results/default [results/shots ...]

Reads the study folder's ``config.yaml``, the cells in ``results.json`` and the per-image
records in ``per_image.npz`` (nothing else: no SFM, no data), recomputes every interval
(``study.aggregate.study_intervals``: each Δ, gain comparison, row, the Holm / BH verdicts and
the shipped parts), and checks that each equals the one in ``results.json`` (to 1e-9) and that
each Δ's rendering in ``summary.md`` is the recomputed one. Exit 0 when all agree; otherwise
each disagreement on a line and exit 1.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path


def _walk(a, b, where: str, out: list[str]) -> None:
    """Every number of ``a`` (recomputed) against ``b`` (committed), recursively."""
    if isinstance(a, dict):
        for k in a:
            if k == "seconds":
                continue
            if not isinstance(b, dict) or k not in b:
                out.append(f"{where}.{k}: missing in the committed results")
                continue
            _walk(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            out.append(f"{where}: length {len(a)} recomputed, committed "
                       f"{len(b) if isinstance(b, list) else b!r}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{where}[{i}]", out)
    elif isinstance(a, float) or isinstance(b, float):
        x = float("nan") if a is None else float(a)
        y = float("nan") if b is None else float(b)
        if not ((math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-9 * max(1.0, abs(y))):
            out.append(f"{where}: recomputed {a!r}, committed {b!r}")
    elif a != b:
        out.append(f"{where}: recomputed {a!r}, committed {b!r}")


def check(run: Path) -> list[str]:
    import yaml

    from ssprompt.io import _clean
    from ssprompt.study.aggregate import ARCHIVE, study_intervals
    from ssprompt.study.config import load_config
    from ssprompt.study.report import _interval_table

    for name in ("config.yaml", "results.json", "summary.md", ARCHIVE):
        if not (run / name).exists():
            return [f"{run / name}: missing"]
    raw = yaml.safe_load((run / "config.yaml").read_text())
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    cfg = load_config(f.name)
    Path(f.name).unlink()
    committed = json.loads((run / "results.json").read_text())
    # no cells/ folder in a committed study: the records come from the archive
    got = study_intervals(run, cfg, committed["cells"])
    if got is None:
        return [f"{run}: per-image records incomplete"]
    got = json.loads(json.dumps(_clean(got)))   # as results.json holds it (NaN, inf: null)
    problems: list[str] = []
    _walk(got, committed["intervals"], "intervals", problems)
    summary = (run / "summary.md").read_text()
    n_base = sum(1 for v in cfg.variants if cfg.baseline_of(v.name))
    tables = [_interval_table(cfg, got, got["pairs"][:n_base]),
              _interval_table(cfg, got, got["pairs"][n_base:]) if got["pairs"][n_base:] else []]
    for line in (x for t in tables for x in t[2:]):
        if line not in summary:
            problems.append(f"{run / 'summary.md'}: has no line {line[:80]}...")
    return problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    bad = 0
    for arg in argv:
        problems = check(Path(arg))
        for p in problems:
            print(p)
        verdict = f"{len(problems)} differ" if problems else "every interval reproduced"
        print(f"{arg}: {verdict}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
