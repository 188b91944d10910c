"""Speed and memory of ssprompt on this machine: prints a table, writes bench/results.json.

Every comparison is a ratio measured in the same run, median of >= 5 repeats. Peak memory of a
configuration is measured in a fresh subprocess (CPU: peak RSS; CUDA: max allocated).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.core import _child, _median_time, _setup, matmul_peak_flops, step_flops
from bench.study_floor import bench_study_floor, bench_study_workers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results.json"


def _isolated(kind: str, value: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, value, repeats, q))  # bench/core.py
    p.start()
    out = q.get()
    p.join()
    return out


def bench_eval(repeats: int) -> dict:
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.evaluation.evaluate import evaluate
    from ssprompt.sfm.features import FeatureCache
    from ssprompt.prompts.semantic import default_semantic
    from ssprompt.prompts.spatial import default_spatial
    from ssprompt.sfm import load_sfm

    sfm = load_sfm("embedded", device="cpu")
    test = SceneSplit("shift", "test", n=200)
    _ = [test[i] for i in range(len(test))]  # compose scenes outside the timing
    sp, se = default_spatial(sfm, 100), default_semantic(sfm, test.class_names)
    cold = []
    for _ in range(max(1, repeats // 2)):
        t = time.perf_counter()
        evaluate(sfm, sp, se, test, FeatureCache())
        cold.append(time.perf_counter() - t)
    cache = FeatureCache()
    evaluate(sfm, sp, se, test, cache)
    warm = _median_time(lambda: evaluate(sfm, sp, se, test, cache), repeats, warmup=0)
    return {"images": len(test), "img_per_s_with_encoder": len(test) / statistics.median(cold),
            "img_per_s_cached_features": len(test) / warm}


def bench_pretrain(repeats: int) -> dict:
    """One SFM pretraining step (batch 16, N = 100, every layer supervised) in each precision;
    scene making (~25 ms a batch) is outside the timing."""
    from ssprompt.data.scenes import CLASS_NAMES, TASKS
    from ssprompt.pretraining.pretrain import SceneStream, train_step
    from ssprompt.prompts.layout import grid_layout
    from ssprompt.sfm.embedded import EmbeddedSFM
    from ssprompt.sfm.modeling.text_encoder import sentence_embeddings

    images, targets = next(iter(SceneStream(16, seed=0)))
    sent = sentence_embeddings([CLASS_NAMES[c] for c in TASKS["source"].vocab])
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = EmbeddedSFM().train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
        out[f"step_s_{precision}"] = _median_time(
            lambda: train_step(model, opt, images, targets, grid_layout(100), sent, precision),
            repeats)
    out["speedup_bf16"] = out["step_s_fp32"] / out["step_s_bf16"]
    return out


def bench_train_batching(repeats: int) -> dict:
    """Prompt learning of J prompt sets (a study's seeds) in shared decoder passes
    (``train_many``; full SSPrompt, N = 100, batch 8, the novel task's 16 shots): wall time per
    optimiser step, and per step of one set. Shared passes pay when the per-set cost stays flat
    as J grows."""
    from ssprompt.data import open_dataset
    from ssprompt.sfm.features import FeatureCache
    from ssprompt.prompts.promptset import PromptConfig, PromptSet
    from ssprompt.sfm import load_sfm
    from ssprompt.engine.train import TrainConfig, train_many

    sfm = load_sfm("embedded", device="cpu")
    data = open_dataset("novel", "train", shots=16, seed=0)
    cache = FeatureCache()
    steps = 5

    def run(j: int) -> None:
        jobs = [(PromptSet(sfm, data.class_names, PromptConfig("weighted"),
                           generator=torch.Generator().manual_seed(s)), data,
                 TrainConfig(steps=steps, seed=s)) for s in range(j)]
        train_many(sfm, jobs, cache)

    run(1)   # features into the cache
    out = {}
    for j in (1, 3, 6):
        t = _median_time(lambda: run(j), max(3, repeats // 2)) / steps
        out[j] = {"step_ms": 1e3 * t, "per_set_ms": 1e3 * t / j}
    return out


def bench_params() -> dict:
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.prompts.promptset import PromptConfig, PromptSet
    from ssprompt.sfm import load_sfm

    sfm = load_sfm("embedded", device="cpu")
    names = SceneSplit("shift", "test", n=1).class_names
    decoder = sum(p.numel() for p in sfm.decoder.parameters())
    rows = {}
    for name, cfg in [("vanilla_2d", PromptConfig("vanilla_2d", ("spatial",))),
                      ("spa-weighted", PromptConfig("weighted", ("spatial",))),
                      ("sem-weighted", PromptConfig("weighted", ("semantic",))),
                      ("ssprompt (N=100)", PromptConfig("weighted")),
                      ("ssprompt N=200", PromptConfig("weighted", n_prompts=200)),
                      ("ssprompt dim-weights", PromptConfig("weighted", weight_shape="dim"))]:
        n = PromptSet(sfm, names, cfg, generator=torch.Generator().manual_seed(0)).num_trainable()
        rows[name] = {"params": n, "ratio_to_decoder": n / decoder}
    return {"decoder_params": decoder, "variants": rows}


def bench_study(quick_only: bool) -> dict:
    out = {}
    t = time.perf_counter()
    tmp = ROOT / "runs" / "bench-quick"
    subprocess.run([sys.executable, "-m", "ssprompt.cli", "study", "--quick", "--force",
                    "--device", "cpu", "--out", str(tmp)], cwd=ROOT, check=True,
                   capture_output=True)
    out["quick_study_s_fresh"] = time.perf_counter() - t
    default = ROOT / "runs" / "default" / "results.json"
    if default.exists():
        out["default_study_s"] = json.loads(default.read_text()).get("study_wall_s")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7; skip studies")
    ap.add_argument("--only", choices=["train_batching", "study_floor", "study_workers",
                                       "study_group", "cli_speed", "memory", "selection"],
                    help="measure this one part and update it in bench/results.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    repeats = 3 if a.quick else 7
    if a.only:
        res = json.loads(OUT.read_text()) if OUT.exists() else {}
        if a.only == "study_floor":
            rate = (res.get("flops") or {}).get("achieved_flop_s")
            res[a.only] = bench_study_floor(rate)
        elif a.only == "study_workers":   # ~10 min: three runs of a 4-group slice
            res[a.only] = bench_study_workers()
        elif a.only == "study_group":     # one trained group, new (and old) code, ~3 min each
            from bench.study_group import bench_study_group
            res[a.only] = bench_study_group((res.get("flops") or {}).get("step_flop"))
        elif a.only == "cli_speed":       # `ssprompt --help` in a fresh process, ~5 s
            from bench.cli_speed import bench_cli_speed
            res[a.only] = bench_cli_speed()
        elif a.only == "memory":          # predict at 0.75-12 MP, SAM 3 at C <= 150: ~3 min
            from bench.memory import bench_memory
            res[a.only] = bench_memory()
        elif a.only == "selection":       # false acceptance (simulated), power on results/shots
            from bench.selection import bench_selection
            res[a.only] = bench_selection()
        else:
            res[a.only] = bench_train_batching(repeats)
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(OUT)
        print(json.dumps(res[a.only], indent=2) if a.only == "study_group" else render(res))
        return
    res: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(),
                             "cuda": torch.cuda.is_available()}, "repeats": repeats}

    _, _, step = _setup()
    cached = _median_time(step, repeats)
    recompute = _median_time(lambda: step(True), repeats)
    res["cache"] = {"step_s_cached": cached, "step_s_recompute": recompute,
                    "speedup": recompute / cached, "target": ">= 10x"}
    res["n_prompts"] = {n: _isolated("n", n, repeats) for n in (25, 50, 100, 200)}
    res["n_prompts_ratio_200_25"] = res["n_prompts"][200]["step_s"] / res["n_prompts"][25]["step_s"]
    res["n_classes"] = {c: _isolated("c", c, repeats) for c in (10, 50, 150)}
    res["eval"] = bench_eval(repeats)
    from bench.cli_speed import bench_cli_speed
    res["cli_speed"] = bench_cli_speed()
    from bench.memory import bench_memory
    res["memory"] = bench_memory()
    from bench.selection import bench_selection
    res["selection"] = bench_selection()
    from bench.eval_speed import bench_eval as bench_eval_speed
    res["eval_speed"] = bench_eval_speed(a.quick)   # old code too with $SSPROMPT_BENCH_OLD
    peak = matmul_peak_flops()
    flops = step_flops(step)
    res["flops"] = {"step_flop": flops, "step_s": cached, "achieved_flop_s": flops / cached,
                    "peak_flop_s_matmul": peak, "share_of_peak": flops / cached / peak,
                    "how": "FLOPs: torch.utils.flop_counter.FlopCounterMode over one prompt "
                           "step (forward + backward; matmuls, attention, einsums, not "
                           "element-wise ops); peak: a 2048 x 2048 fp32 torch.mm on the same "
                           "threads (this CPU's best BLAS case)"}
    res["study_floor"] = bench_study_floor(flops / cached, peak)
    from bench.backends import bench_backends
    res["backends"] = bench_backends(quick=True)   # reduced sizes on a CPU: see 'size'
    res["train_batching"] = bench_train_batching(repeats)
    res["pretrain"] = bench_pretrain(repeats)
    res["params"] = bench_params()
    if not a.quick:
        res["study"] = bench_study(False)
    res["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    OUT.parent.mkdir(exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(OUT)
    print(render(res))


def render(r: dict) -> str:
    lines = ["| measurement | value | target |", "|---|---:|---|"]
    c = r["cache"]
    lines.append(f"| prompt step, cached features | {c['step_s_cached'] * 1e3:.1f} ms | |")
    lines.append(f"| prompt step, encoder recomputed | {c['step_s_recompute'] * 1e3:.1f} ms | |")
    lines.append(f"| cache speed-up | {c['speedup']:.1f}x | >= 10x |")
    for n, v in r["n_prompts"].items():
        lines.append(f"| step, N = {n} | {v['step_s'] * 1e3:.1f} ms, peak {v['peak_mb']:.0f} MB | |")
    lines.append(f"| step time N=200 / N=25 | {r['n_prompts_ratio_200_25']:.2f}x | <= 2x |")
    for cnum, v in r["n_classes"].items():
        lines.append(f"| step, C = {cnum} classes | {v['step_s'] * 1e3:.1f} ms, peak "
                     f"{v['peak_mb']:.0f} MB | |")
    if r.get("cli_speed"):
        h = r["cli_speed"]
        lines.append(f"| `ssprompt --help`, fresh process | {h['help_s']:.2f} s (max "
                     f"{h['help_max_s']:.2f} s) | < 1 s |")
    if r.get("memory"):
        from bench.memory import render as render_memory
        lines += render_memory(r["memory"])
    if r.get("selection"):
        from bench.selection import render as render_selection
        lines += render_selection(r["selection"])
    e = r["eval"]
    lines.append(f"| evaluation, with image encoder | {e['img_per_s_with_encoder']:.0f} img/s | >= 50 |")
    lines.append(f"| evaluation, cached features | {e['img_per_s_cached_features']:.0f} img/s | |")
    if "eval_speed" in r:
        v = r["eval_speed"]
        lines.append(f"| evaluation, cached, share of time in the decoder | "
                     f"{100 * v['decoder_share']:.0f}% | >= 50% |")
        if "speedup" in v:
            lines.append(f"| evaluation, cached: new / old code, same run | {v['img_per_s_cached']:.0f}"
                         f" / {v['old_img_per_s_cached']:.0f} img/s = {v['speedup']:.2f}x | >= 5x |")
    for j, v in (r.get("train_batching") or {}).items():
        lines.append(f"| prompt learning, {j} set(s) in shared passes: per step / per set-step | "
                     f"{v['step_ms']:.0f} / {v['per_set_ms']:.0f} ms | |")
    if "flops" in r:
        f = r["flops"]
        lines.append(f"| prompt step (N = 100, batch 8): FLOPs, achieved | {f['step_flop'] / 1e9:.2f} "
                     f"GFLOP, {f['achieved_flop_s'] / 1e9:.1f} GFLOP/s | |")
        lines.append(f"| ... share of this CPU's matmul peak ({f['peak_flop_s_matmul'] / 1e9:.0f} "
                     f"GFLOP/s) | {100 * f['share_of_peak']:.0f}% | |")
    if "study_floor" in r:
        f = r["study_floor"]
        part = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in f["flop"].items())
        lines.append(f"| {f['config']} study, model work counted (TFLOP; {part}) | "
                     f"{f['total_flop'] / 1e12:.1f} TFLOP | |")
        lines.append(f"| ... at this CPU's matmul peak ({f['peak_flop_s_matmul'] / 1e9:.0f} "
                     f"GFLOP/s): the study's floor | {f['floor_s_at_peak'] / 60:.1f} min | "
                     f"<= 4 min |")
        if f.get("s_at_prompt_step_rate"):
            lines.append(f"| ... at the prompt step's achieved "
                         f"{f['achieved_flop_s_prompt_step'] / 1e9:.0f} GFLOP/s | "
                         f"{f['s_at_prompt_step_rate'] / 60:.1f} min | |")
    if "study_workers" in r:
        w = r["study_workers"]
        lines.append(f"| default-study slice ({w['groups']} groups on {w['task']}, 3 seeds): "
                     f"1 process x 2 threads / 2 workers x 2 / 2 workers x 1 | "
                     f"{w['wall_s_1x2']:.0f} / {w['wall_s_2x2']:.0f} / {w['wall_s_2x1']:.0f} s | |")
        lines.append(f"| ... cells identical to 1 x 2: 2 x 2 / 2 x 1 | "
                     f"{w['identical_2x2_vs_1x2']} / {w['identical_2x1_vs_1x2']} | |")
    for kind, b in (r.get("backends") or {}).items():
        if not isinstance(b, dict) or "encoder_ms" not in b:
            continue
        lines.append(f"| {kind}: image encoder ({b['size']}) | {b['encoder_ms']:.0f} ms | |")
        lines.append(f"| {kind}: step cached / encoder recomputed | {b['step_cached_ms']:.0f} / "
                     f"{b['step_recomputed_ms']:.0f} ms ({b['cache_speedup']:.2f}x) | |")
        steps = ", ".join(f"{b[f'step_N{n}_ms']:.0f}" for n in (25, 50, 100, 200))
        peaks = ", ".join(f"{b[f'step_N{n}_peak_mb']:.0f}" for n in (25, 50, 100, 200))
        lines.append(f"| {kind}: step at N = 25, 50, 100, 200 | {steps} ms; peak +{peaks} MB | |")
        if "step_C10_ms" in b:
            lines.append(f"| {kind}: step at C = 10, 150 | {b['step_C10_ms']:.0f}, "
                         f"{b['step_C150_ms']:.0f} ms | |")
    if "pretrain" in r:
        t = r["pretrain"]
        lines.append(f"| SFM pretraining step (batch 16, N = 100), fp32 | "
                     f"{t['step_s_fp32'] * 1e3:.0f} ms | |")
        lines.append(f"| SFM pretraining step, bf16 autocast | {t['step_s_bf16'] * 1e3:.0f} ms "
                     f"({t['speedup_bf16']:.2f}x) | |")
    p = r["params"]
    for name, v in p["variants"].items():
        lines.append(f"| trained params, {name} | {v['params']} "
                     f"({100 * v['ratio_to_decoder']:.2f}% of decoder's {p['decoder_params']}) "
                     f"| <= 1% |")
    if "study" in r:
        s = r["study"]
        lines.append(f"| quick study wall | {s['quick_study_s_fresh']:.0f} s | <= 120 s |")
        if s.get("default_study_s"):
            lines.append(f"| default study wall (runs/default) | {s['default_study_s'] / 60:.1f} "
                         f"min | <= 15 min |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
