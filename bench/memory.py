"""Peak memory of prediction at large image sizes and of a SAM 3 training step at many classes,
each in a fresh process (``python -m bench --only memory``; ``python -m bench.memory`` prints
the same and writes nothing).

* ``predict``: ``Predictor.predict`` (zero-shot, the embedded SFM, the shift task's classes,
  100 queries) on one RGB image of 0.75, 3 and 12 MP (a 96 x 96 scene upscaled), the process's
  peak RSS (``ru_maxrss``: it includes the ~650 MB of torch, the SFM and MiniLM) and that peak
  before ``predict`` (the loaded process). Goal: 12 MP <= 4 GB.
* ``sam3``: one prompt-learning step as ``engine.train`` takes it (fused prompts ->
  ``decode_losses``, or decode -> set loss where the SFM has none -> backward -> AdamW) of SAM 3
  with random weights at bench/backends.py's reduced size (112 px, D 256, 200 queries, masks
  32 x 32, 1 thread), one image with 3 segments, C = 10 / 50 / 150 classes: peak RSS of the
  process, before the step, and the step's time; then the same at 224 px (masks 64 x 64, 4x
  the area) for C in ``SAM3_LARGER``: what grows with the mask area.

``SSPROMPT_BENCH_OLD=DIR`` also measures ``predict`` with an older checkout's code (its
``ssprompt`` first on the path) at the sizes in ``OLD_MP`` (the old code needed ~20 GB at
12 MP: not run), and every SAM 3 step.
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
SAM3_LARGER = (224, (10, 50, 150))   # the same at 4x the mask area


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


def _build_sam3(px: int):
    """bench/backends.py's reduced SAM 3 (``px`` = 112), or the same at another input size
    (masks px / 3.5 square: 224 px gives 64 x 64, 4x the area)."""
    from bench.backends import build

    if px == 112:
        return build("sam3", True, "cpu")
    import torch
    from transformers import Sam3Config, Sam3Model

    from ssprompt.sfm.base import freeze
    from ssprompt.sfm.sam3 import Sam3SFM

    t = px // 14
    cfg = Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", image_size=px,
                                 num_hidden_layers=2, global_attn_indexes=[1], window_size=t),
            backbone_feature_sizes=[[4 * t, 4 * t], [2 * t, 2 * t], [t, t]]),
        text_config=dict(num_hidden_layers=1), detr_encoder_config=dict(num_layers=1),
        detr_decoder_config=dict(num_layers=1), geometry_encoder_config=dict(num_layers=1))
    torch.manual_seed(0)
    return (freeze(Sam3SFM(Sam3Model(cfg).eval(), tokenizer=None)),
            f"reduced as at 112 px, but {px} px")


def _child_sam3(c: int, px: int = 112) -> dict:
    import time

    import torch

    torch.set_num_threads(1)
    from bench.backends import _prompts, _targets
    from ssprompt.sfm.losses import set_losses

    sfm, note = _build_sam3(px)
    images = torch.rand(1, 3, sfm.image_size, sfm.image_size)
    feats = sfm.encode_image(images)
    prompts = _prompts(sfm, "sam3", sfm.num_queries, c, "cpu")
    opt = torch.optim.AdamW(prompts.parameters(), lr=1e-3)
    groups = [_targets(1, sfm.image_size, c, "cpu")]
    own = getattr(sfm, "decode_losses", None)   # what engine.train calls when the SFM has it

    def step():
        spatial, semantic = prompts[0](), prompts[1]()
        if own is not None:
            (loss, _), = own(feats, spatial, semantic, groups)
        else:
            (loss, _), = set_losses(sfm.decode(feats, spatial, semantic), groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    before = _rss_mb()
    t = time.perf_counter()
    step()
    return {"classes": c, "queries": sfm.num_queries, "px": px,
            "mask": list(feats.tensors["fpn0"].shape[-2:]), "peak_mb": _rss_mb(),
            "before_mb": before, "step_s": time.perf_counter() - t,
            "matched_only": own is not None, "size": note}


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


def bench_memory(sizes=(0.75, 3, 12), classes=SAM3_CLASSES, old: str | None = None,
                 larger=SAM3_LARGER) -> dict:
    old = old or os.environ.get("SSPROMPT_BENCH_OLD")
    res: dict = {"predict": {}, "sam3_step": {}, "sam3_step_larger": {}}
    for mp in sizes:
        res["predict"][mp] = _run(["predict", *map(str, SIZES[mp])])
        if old and mp in OLD_MP:
            res["predict"][mp]["old"] = _run(["predict", *map(str, SIZES[mp])], old)
    for c in classes:
        res["sam3_step"][c] = _run(["sam3", str(c)])
        if old:
            res["sam3_step"][c]["old"] = _run(["sam3", str(c)], old)
    px, cs = larger or (0, ())
    for c in cs:
        res["sam3_step_larger"][c] = _run(["sam3", str(c), str(px)])
        if old:
            res["sam3_step_larger"][c]["old"] = _run(["sam3", str(c), str(px)], old)
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
    for c, v in [*m.get("sam3_step", {}).items(), *m.get("sam3_step_larger", {}).items()]:
        old = v.get("old", {})
        was = (f" (old code: +{old['peak_mb'] - old['before_mb']:.0f} MB"
               + (f", {old['step_s']:.1f} s" if "step_s" in old else "") + ")") \
            if "peak_mb" in old else ""
        if "peak_mb" in v:
            px, mask = v.get("px", 112), v.get("mask", (32, 32))   # older results: defaults
            lines.append(f"| sam3 (reduced, {px} px, masks {mask[0]} x "
                         f"{mask[1]}) training step, C = {c}, {v['queries']} queries: "
                         f"peak RSS above the loaded process ({v['before_mb']:.0f} MB), step "
                         f"time | +{v['peak_mb'] - v['before_mb']:.0f} MB"
                         + (f", {v['step_s']:.1f} s" if "step_s" in v else "")
                         + f"{was} | |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, *vals = sys.argv[2:]
        r = _child_predict(*map(int, vals)) if kind == "predict" else \
            _child_sam3(*map(int, vals))
        print(json.dumps(r))
    else:
        print("\n".join(render(bench_memory())))
