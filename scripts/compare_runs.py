"""Compare two study run folders (or two prompts files) exactly: every cells/*.json value except
timings, every cells/*.safetensors tensor bit for bit. Exit 1 on any difference.

    python scripts/compare_runs.py /tmp/seam_before /tmp/seam_after
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TIMING = {"wall_s", "torch_threads"}


def _diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in TIMING:
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def compare_tensors(a: Path, b: Path, out: list[str]) -> int:
    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        out.append(f"{a.name}: tensor names differ {sorted(set(ta) ^ set(tb))}")
    for k in sorted(set(ta) & set(tb)):
        if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
            out.append(f"{a.name}:{k}: tensors differ")
    return len(ta)


def main(before: str, after: str) -> int:
    a, b = Path(before), Path(after)
    out: list[str] = []
    if a.is_file():
        n = compare_tensors(a, b, out)
        print(f"{n} tensors compared; {len(out)} differences")
    else:
        ja, jb = sorted((a / "cells").glob("*.json")), sorted((b / "cells").glob("*.json"))
        if [p.name for p in ja] != [p.name for p in jb]:
            out.append("cell JSON files differ")
        for p in ja:
            q = b / "cells" / p.name
            if q.exists():
                _diff(json.loads(p.read_text()), json.loads(q.read_text()), p.stem, out)
        sa, sb = sorted((a / "cells").glob("*.safetensors")), \
            sorted((b / "cells").glob("*.safetensors"))
        if [p.name for p in sa] != [p.name for p in sb]:
            out.append("cell prompts files differ")
        n = sum(compare_tensors(p, b / "cells" / p.name, out) for p in sa
                if (b / "cells" / p.name).exists())
        print(f"{len(ja)} cell JSONs, {len(sa)} prompts files ({n} tensors) compared; "
              f"{len(out)} differences")
    for line in out[:50]:
        print(" ", line)
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
