"""Evaluation speed with cached features, and old-vs-new equality of every metric.

    python -m bench.eval_speed [--quick] [--old /tmp/old]       # images/s, decoder share
    python -m bench.eval_speed --compare-old /tmp/old           # same numbers as the old code?
    python -m bench.eval_speed --ap-libraries                   # AP50 libraries side by side

``--old`` / ``--compare-old`` name a checkout of an earlier commit (``git worktree add /tmp/old
9ad490b``). Each code version runs in its own subprocess (``PYTHONPATH`` = its checkout), on the
same machine in the same run, with the same thread count, so the ratio is a side-by-side one.
``bench_eval(quick)`` is what ``python -m bench`` calls: plain numbers (the old code only where
$SSPROMPT_BENCH_OLD names a checkout). $SSPROMPT_BENCH_THREADS sets the children's torch
threads (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("shift", "novel", "stuff")
THREADS = int(os.environ.get("SSPROMPT_BENCH_THREADS", "2"))  # torch threads of each child


# ------------------------------------------------------------------------ child processes
def _load(task: str, n_test: int):
    """The committed SFM and a test split, with every scene composed beforehand."""
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.sfm import load_sfm

    sfm = load_sfm("embedded", device="cpu")
    test = SceneSplit(task, "test", n=n_test)
    _ = [test[i] for i in range(len(test))]
    return sfm, test


def _child_time(task: str, n_test: int, repeats: int) -> dict:
    """Cached evaluation of the default prompts (N = 100, bare names): best-of-``repeats``
    images/s, and the share of that evaluation spent in ``sfm.decode``."""
    import time

    from ssprompt.evaluation.evaluate import evaluate
    from ssprompt.sfm.features import FeatureCache
    from ssprompt.prompts.semantic import default_semantic
    from ssprompt.prompts.spatial import default_spatial

    sfm, test = _load(task, n_test)
    sp, se = default_spatial(sfm, 100), default_semantic(sfm, test.class_names)
    cache = FeatureCache()
    evaluate(sfm, sp, se, test, cache)                    # fills the cache, warms up
    decode, spent = sfm.decode, [0.0]

    def timed_decode(*a, **kw):
        t = time.perf_counter()
        out = decode(*a, **kw)
        spent[0] += time.perf_counter() - t
        return out

    sfm.decode = timed_decode
    runs = []
    for _ in range(repeats):
        spent[0] = 0.0
        t = time.perf_counter()
        evaluate(sfm, sp, se, test, cache)
        runs.append((time.perf_counter() - t, spent[0]))
    wall, dec = min(runs)
    return {"images": len(test), "img_per_s": len(test) / wall, "eval_s": wall,
            "decoder_s": dec, "decoder_share": dec / wall}


def _child_metrics(prompt_file: str, n_test: int, many: bool = False) -> dict:
    """Metrics of every prompt set in ``prompt_file`` ({name: (task, spatial, semantic)}), one
    ``evaluate`` each, or (``many``) one ``evaluate_many`` per task."""
    import torch

    from ssprompt.sfm.features import FeatureCache

    sets = torch.load(prompt_file)
    out, cache = {}, FeatureCache()
    for task in dict.fromkeys(t for t, _, _ in sets.values()):
        sfm, test = _load(task, n_test)
        names = [k for k, (t, _, _) in sets.items() if t == task]
        prompts = [sets[k][1:] for k in names]
        if many:
            from ssprompt.evaluation.evaluate import evaluate_many
            out.update(zip(names, evaluate_many(sfm, prompts, test, cache)))
        else:
            from ssprompt.evaluation.evaluate import evaluate
            out.update((k, evaluate(sfm, sp, se, test, cache)) for k, (sp, se) in zip(names, prompts))
    return out


def _run_child(root: Path, kind: str, **kw) -> dict:
    """Run ``_child_<kind>(**kw)`` of this file with ``root``'s ssprompt; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(kw)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if res.returncode:
        raise RuntimeError(f"{root}: {kind} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the bench
def bench_eval(quick: bool, old: str | None = None) -> dict:
    """Cached-feature evaluation of ``shift`` (default prompts, N = 100): images/s and the
    share of the time in the decoder; with ``old`` (a checkout of an earlier commit; default:
    $SSPROMPT_BENCH_OLD) also the old code's images/s and the speed-up, measured side by side."""
    old = old or os.environ.get("SSPROMPT_BENCH_OLD")
    n_test, repeats = (50, 2) if quick else (200, 3)
    new = _run_child(ROOT, "time", task="shift", n_test=n_test, repeats=repeats)
    out = {"images": new["images"], "img_per_s_cached": round(new["img_per_s"], 1),
           "decoder_share": round(new["decoder_share"], 3),
           "decoder_s": round(new["decoder_s"], 3), "eval_s": round(new["eval_s"], 3)}
    if old:
        was = _run_child(Path(old), "time", task="shift", n_test=n_test, repeats=repeats)
        out.update({"old_img_per_s_cached": round(was["img_per_s"], 1),
                    "old_decoder_share": round(was["decoder_share"], 3),
                    "speedup": round(new["img_per_s"] / was["img_per_s"], 2)})
    return out


# ------------------------------------------------------------------------ old-vs-new check
def _prompt_sets(n_test: int, steps: int) -> dict:
    """Zero-shot prompts (N = 100 grid, bare class names) and prompts learned for ``steps``
    steps (full SSPrompt and learned-only, seed 0, 16 shots) on every task:
    {name: (task, spatial, semantic)}."""
    import torch

    from ssprompt.data.scenes import SceneSplit
    from ssprompt.sfm.features import FeatureCache
    from ssprompt.prompts.promptset import PromptConfig, PromptSet
    from ssprompt.prompts.semantic import default_semantic
    from ssprompt.prompts.spatial import default_spatial
    from ssprompt.engine.train import TrainConfig, train_many

    sets, cache = {}, FeatureCache()
    for task in TASKS:
        sfm, test = _load(task, n_test)
        sets[f"{task}/zero-shot"] = (task, default_spatial(sfm, 100),
                                     default_semantic(sfm, test.class_names))
        train = SceneSplit(task, "train", shots=16, seed=0)
        for mode in ("weighted", "learned_only"):
            torch.manual_seed(0)
            prompts = PromptSet(sfm, test.class_names, PromptConfig(mode),
                                generator=torch.Generator().manual_seed(0))
            train_many(sfm, [(prompts, train, TrainConfig(steps=steps, warmup=2))], cache)
            with torch.no_grad():
                sp, se = prompts()
            sets[f"{task}/{mode}-{steps}steps"] = (task, sp.detach(), se.detach())
    return sets


def compare_old(old: str, n_test: int = 200, steps: int = 20) -> dict:
    """Every metric of every prompt set from the old code (``evaluate``) and the new one
    (``evaluate`` one set at a time, and ``evaluate_many`` all sets of a task in one pass):
    equal or not, per prompt set."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "prompts.pt")
        torch.save(_prompt_sets(n_test, steps), path)
        was = _run_child(Path(old), "metrics", prompt_file=path, n_test=n_test)
        new = _run_child(ROOT, "metrics", prompt_file=path, n_test=n_test)
        many = _run_child(ROOT, "metrics", prompt_file=path, n_test=n_test, many=True)
    report = {}
    for name in new:
        diff = {k: (was[name][k], new[name][k]) for k in new[name] if was[name][k] != new[name][k]}
        report[name] = {"equal": not diff, "evaluate_many_equal": many[name] == was[name],
                        "diff": diff, **{k: new[name][k] for k in ("mIoU", "AP50", "PQ", "SQ",
                                                                   "RQ", "PQ_th", "PQ_st")}}
    return report


# --------------------------------------------------------------------- AP50 libraries
def _ap_stats1(library: str, images: list[dict], gts: list[dict], dts: list[dict],
               num_classes: int) -> float:
    """A library's own COCO segm AP50 (``stats[1]`` of evaluate / accumulate / summarize with
    its default settings), on fresh copies of the annotations (loadRes adds keys)."""
    import contextlib
    import copy
    import io

    gts = copy.deepcopy(gts)
    dts = [{k: d[k] for k in ("image_id", "category_id", "score", "segmentation")} for d in dts]
    dataset = {"info": {}, "images": images, "annotations": gts,
               "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        if library == "hotcoco":
            import hotcoco
            gt = hotcoco.COCO(dataset)
            ev = hotcoco.COCOeval(gt, gt.load_res(dts), "segm")
        else:
            if library == "pycocotools":
                from pycocotools.coco import COCO
                from pycocotools.cocoeval import COCOeval
            else:
                from faster_coco_eval import COCO
                from faster_coco_eval import COCOeval_faster as COCOeval
            gt = COCO()
            gt.dataset = dataset
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(dts), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def ap_libraries(task: str = "novel", n_test: int = 200) -> dict:
    """AP50 and seconds of pycocotools, faster-coco-eval and hotcoco (their default settings)
    and of ssprompt's ``coco_ap50`` (hotcoco at the one setting AP50 needs) on the same
    detections: the zero-shot study's own on ``task``, and the same with a fifth of the ground
    truth instances made crowd regions."""
    import time

    import numpy as np

    from ssprompt.evaluation.evaluate import evaluate
    from ssprompt.evaluation.metrics import SegmentationEvaluator, coco_ap50
    from ssprompt.prompts.semantic import default_semantic
    from ssprompt.prompts.spatial import default_spatial

    sfm, test = _load(task, n_test)
    ev = SegmentationEvaluator(test.class_names, test.is_thing, sync=False)
    evaluate(sfm, default_spatial(sfm, 100), default_semantic(sfm, test.class_names), test,
             evaluator=ev)
    images, gts, dts = ev.ap._coco()
    rng = np.random.default_rng(0)
    crowd = [dict(g, iscrowd=int(rng.random() < 0.2)) for g in gts]
    c, out = len(test.class_names), {}
    for name, truth in ((f"{task} zero-shot", gts), (f"{task} with crowd", crowd)):
        row = {}
        for lib in ("pycocotools", "faster-coco-eval", "hotcoco", "ssprompt"):
            t = time.perf_counter()
            ap = (coco_ap50(images, [dict(g) for g in truth], [dict(d) for d in dts], c)[0]
                  if lib == "ssprompt" else _ap_stats1(lib, images, truth, dts, c))
            row[lib] = {"AP50": ap, "s": round(time.perf_counter() - t, 3)}
        ref = row["pycocotools"]["AP50"]
        for r in row.values():
            r["equal_1e-9"] = abs(r["AP50"] - ref) <= 1e-9
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--old", help="time this earlier checkout's evaluation too")
    ap.add_argument("--compare-old", help="check every metric against this earlier checkout")
    ap.add_argument("--ap-libraries", action="store_true",
                    help="AP50 of pycocotools, faster-coco-eval, hotcoco on the same detections")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(THREADS)
        kind, kw = args.child
        print(json.dumps(globals()[f"_child_{kind}"](**json.loads(kw))))
    elif args.ap_libraries:
        print(json.dumps(ap_libraries(n_test=50 if args.quick else 200), indent=1))
    elif args.compare_old:
        report = compare_old(args.compare_old, n_test=50 if args.quick else 200)
        print(json.dumps(report, indent=1))
        print("all equal:", all(r["equal"] and r["evaluate_many_equal"] for r in report.values()))
    else:
        print(json.dumps(bench_eval(args.quick, args.old), indent=1))


if __name__ == "__main__":
    main()
