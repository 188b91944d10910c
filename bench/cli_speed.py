"""``ssprompt --help`` time in a fresh process (issue 30: under 1 s; nothing heavy is imported
before the arguments are parsed).

    python -m bench.cli_speed            # prints the row
    python -m bench --only cli_speed     # and stores it in bench/results.json
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ssprompt.cli", *argv], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_cli_speed(repeats: int = 5) -> dict:
    """Median and worst wall time of ``ssprompt --help`` and ``ssprompt train --help``, each a
    fresh interpreter (its start included), and of ``python -c pass`` for the floor."""
    out = {}
    for name, argv in (("help_s", ["--help"]), ("train_help_s", ["train", "--help"])):
        times = [_once(argv) for _ in range(repeats)]
        out[name], out[name.replace("_s", "_max_s")] = statistics.median(times), max(times)
    floor = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        floor.append(time.perf_counter() - t0)
    out["python_start_s"] = statistics.median(floor)
    out["target"] = "help_s < 1 s"
    return out


if __name__ == "__main__":
    r = bench_cli_speed()
    print(f"ssprompt --help: {r['help_s']:.2f} s (max {r['help_max_s']:.2f}); train --help: "
          f"{r['train_help_s']:.2f} s; python start alone: {r['python_start_s']:.2f} s "
          f"(target: < 1 s)")
