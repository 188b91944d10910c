"""Peak memory of prediction at large image sizes and of a SAM 3 training step at many classes,
each in a fresh process (``python -m bench --only memory``; ``python -m bench.memory`` prints
the same and writes nothing).

* ``predict``: ``Predictor.predict`` (zero-shot, the embedded SFM, the shift task's classes,
  100 queries) on one RGB image of 0.75, 3 and 12 MP (a 96 x 96 scene upscaled), the process's
  peak RSS (``ru_maxrss``: it includes the ~650 MB of torch, the SFM and MiniLM) and that peak
  before ``predict`` (the loaded process). Goal: 12 MP <= 4 GB.
* ``sam3``: one prompt-learning step (fused prompts -> decode -> set loss -> backward -> AdamW)
  of SAM 3 with random weights at bench/backends.py's reduced size (112 px, D 256, 200
  queries, masks 32 x 32, 1 thread), one image, C = 10 / 50 / 150 classes: peak RSS of the
  process and before the step.

``SSPROMPT_BENCH_OLD=DIR`` also measures ``predict`` with an older checkout's code (its
``ssprompt`` first on the path) at the sizes in ``OLD_MP`` (the old code needed ~20 GB at
12 MP: not run).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {0.75: (750, 1000), 3: (1500, 2000), 12: (3000, 4000)}   # MP -> (H, W)
OLD_MP = (0.75, 3)
SAM3_CLASSES = (10, 50, 150)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_predict(h: int, w: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(2)
    from ssprompt import Predictor, load_sfm
    from ssprompt.data.scenes import SceneSplit

    test = SceneSplit("shift", "test", n=1)
    image = np.asarray(Image.fromarray(test[0].image).resize((w, h), Image.BILINEAR))
    predictor = Predictor(load_sfm(), class_names=test.class_names,
                          is_thing=test.is_thing)
    before = _rss_mb()
    pred = predictor.predict(image)
    return {"mp": h * w / 1e6, "peak_mb": _rss_mb(), "before_mb": before,
            "instances": len(pred.instances), "segments": len(pred.segments)}


def _child_sam3(c: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from bench.backends import _step_fn, build

    sfm, note = build("sam3", True, "cpu")
    images = torch.rand(1, 3, sfm.image_size, sfm.image_size)
    feats = sfm.encode_image(images)
    step = _step_fn(sfm, "sam3", lambda: feats, sfm.num_queries, c, 1, "cpu")
    before = _rss_mb()
    step()
    return {"classes": c, "queries": sfm.num_queries, "peak_mb": _rss_mb(),
            "before_mb": before, "size": note}


def _run(args: list[str], old: str | None = None) -> dict:
    """One measurement in a fresh interpreter (``old``: that checkout's code)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    path = [str(ROOT)] if old is None else [old, str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *args],
                         cwd=old or ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(sizes=(0.75, 3, 12), classes=SAM3_CLASSES, old: str | None = None) -> dict:
    old = old or os.environ.get("SSPROMPT_BENCH_OLD")
    res: dict = {"predict": {}, "sam3_step": {}}
    for mp in sizes:
        res["predict"][mp] = _run(["predict", *map(str, SIZES[mp])])
        if old and mp in OLD_MP:
            res["predict"][mp]["old"] = _run(["predict", *map(str, SIZES[mp])], old)
    for c in classes:
        res["sam3_step"][c] = _run(["sam3", str(c)])
    return res


def render(m: dict) -> list[str]:
    lines = []
    for mp, v in m.get("predict", {}).items():
        old = v.get("old", {})
        was = f" (old code: {old['peak_mb'] / 1024:.2f} GB)" if "peak_mb" in old else ""
        if "peak_mb" in v:
            lines.append(f"| predict, one {mp} MP image, embedded SFM: peak RSS (loaded: "
                         f"{v['before_mb']:.0f} MB) | {v['peak_mb'] / 1024:.2f} GB{was} | "
                         f"{'<= 4 GB' if str(mp) == '12' else ''} |")
    for c, v in m.get("sam3_step", {}).items():
        old = v.get("old", {})
        was = f" (old code: {old['peak_mb']:.0f} MB)" if "peak_mb" in old else ""
        if "peak_mb" in v:
            lines.append(f"| sam3 (reduced) step, C = {c}, {v['queries']} queries: peak RSS "
                         f"(before: {v['before_mb']:.0f} MB) | {v['peak_mb']:.0f} MB{was} | |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, *vals = sys.argv[2:]
        r = _child_predict(*map(int, vals)) if kind == "predict" else _child_sam3(int(vals[0]))
        print(json.dumps(r))
    else:
        print("\n".join(render(bench_memory())))
