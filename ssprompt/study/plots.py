"""Study plots (matplotlib, PNG): metric vs N, all variants, learned fusion weights, losses."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..evaluation.metrics import METRICS
from ..engine.curves import held_out_gain
from .config import cell_id


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_study(run: Path, cfg, rows: list[dict], summary: dict) -> None:
    plt = _plt()
    tasks = cfg.tasks
    # 1. ablation 2: metric vs N for full SSPrompt (weighted, both learners)
    n_rows = {v.prompt.n_prompts: v.name for v in cfg.variants
              if cfg.shots_of(v) == cfg.shots
              and v.kind == "weighted" and len(v.prompt.learners) == 2
              and v.prompt.init == "default" and v.prompt.weight_shape == "prompt"}
    if len(n_rows) > 1:
        ns = sorted(n_rows)
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            for m in METRICS:
                mean = [summary[n_rows[n]][t][m][0] for n in ns]
                std = [summary[n_rows[n]][t][m][1] for n in ns]
                ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=m)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("N spatial prompts")
            ax.set_title(t)
        axes[0][0].set_ylabel("percent")
        axes[0][0].legend()
        fig.suptitle("Ablation 2: SSPrompt vs number of spatial prompts")
        fig.tight_layout()
        fig.savefig(run / "ablation_n_prompts.png", dpi=100)
        plt.close(fig)

    # 2. every variant, grouped by task, one panel a metric
    names = [v.name for v in cfg.variants]
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(max(8, 0.7 * len(names) * len(tasks) / 2),
                                                       8), squeeze=False)
    width = 0.8 / len(tasks)
    x = np.arange(len(names))
    for ax, m in zip(axes[:, 0], METRICS):
        for i, t in enumerate(tasks):
            mean = [summary[n][t][m][0] for n in names]
            std = [summary[n][t][m][1] for n in names]
            ax.bar(x + i * width, mean, width, yerr=std, capsize=2, label=t)
        ax.set_ylabel(m)
        ax.set_xticks(x + width * (len(tasks) - 1) / 2, names, rotation=35, ha="right",
                      fontsize=8)
    axes[0, 0].legend(ncol=len(tasks))
    fig.tight_layout()
    fig.savefig(run / "variants.png", dpi=100)
    plt.close(fig)

    # 3. learned fusion weights of full SSPrompt (N = 100 row, else the first weighted row)
    target = cfg.full
    if target is not None:
        _plot_weights(run, plt, [r for r in rows if r["variant"] == target], tasks, target)

    # 4. loss curves and held-out selection curves of every trained variant (mean over seeds)
    # one fixed colour per variant in both rows; tab10 repeats past 10 variants
    colour = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6.2), squeeze=False)
    for col, t in enumerate(tasks):
        for i, n in enumerate(names):
            sel = [r for r in rows if r["variant"] == n and r["task"] == t]
            logs = [r["loss_log"] for r in sel if r.get("loss_log")]
            if logs:
                steps = [e["step"] for e in logs[0]]
                loss = np.mean([[e["loss"] for e in lg] for lg in logs], axis=0)
                axes[0][col].plot(steps, loss, label=n, lw=1, color=colour(i))
            gains = [held_out_gain(r.get("selection")) for r in sel]
            gains = [g for g in gains if g is not None]
            if gains:
                axes[1][col].plot(gains[0][0], np.mean([g[1] for g in gains], axis=0),
                                  label=n, lw=1, marker=".", color=colour(i))
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(t)
        axes[1][col].axhline(0, color="k", lw=0.8)
        axes[1][col].set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel("held-out score - defaults'")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(run / "loss_curves.png", dpi=100)
    plt.close(fig)


def _plot_weights(run: Path, plt, rows: list[dict], tasks, name: str) -> None:
    from ..data import open_dataset
    from ..prompts.layout import grid_layout

    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for j, t in enumerate(tasks):
        sel = [r["fusion_weights"] for r in rows if r["task"] == t and r.get("fusion_weights")]
        if not sel:
            continue
        ax = axes[0, j]
        if "semantic" in sel[0]:
            sem = np.mean([s["semantic"] for s in sel], axis=0)
            try:
                ds = open_dataset(t, "test", n_test=1)
                labels, things = ds.class_names, ds.is_thing
            except Exception:  # a dataset that cannot be opened here: plot without names
                labels, things = [str(i) for i in range(len(sem))], [True] * len(sem)
            colours = ["tab:blue" if th else "tab:orange" for th in things]
            ax.bar(range(len(sem)), sem, color=colours)
            ax.set_xticks(range(len(sem)), labels, rotation=70, fontsize=6)
            ax.set_ylim(0, 1)
            ax.set_title(f"{t}: semantic w (blue thing, orange stuff)", fontsize=9)
        ax = axes[1, j]
        if "spatial" in sel[0]:
            spa = np.mean([s["spatial"] for s in sel], axis=0)
            pts = grid_layout(len(spa)).numpy()
            sc = ax.scatter(pts[:, 0], pts[:, 1], c=spa, cmap="viridis", vmin=0, vmax=1, s=60)
            ax.invert_yaxis()
            ax.set_aspect("equal")
            ax.set_title(f"{t}: spatial w at each default point", fontsize=9)
            fig.colorbar(sc, ax=ax, fraction=0.046)
    fig.suptitle(f"Learned fusion weights of {name} (mean over seeds; 1 = learned, 0 = default)")
    fig.tight_layout()
    fig.savefig(run / "fusion_weights.png", dpi=100)
    plt.close(fig)


def plot_qualitative(run: Path, cfg, sfm, dataset_of, n_images: int = 3) -> list[Path]:
    """One figure per task: the first ``n_images`` test images, their ground truth and the
    panoptic predictions of zero-shot, full SSPrompt and learned-only (the first seed's
    prompts of each), side by side. ``dataset_of(task)`` gives the task's test split."""
    import types

    import matplotlib
    import torch

    from ..io import write_bytes
    from ..predict import overlay
    from ..predictor import Predictor
    from ..prompts.promptset import load_prompts

    names = [cfg.baseline, cfg.full,
             next((v.name for v in sorted(cfg.variants, key=lambda v: cfg.shots_of(v) != cfg.shots) if v.kind == "learned_only"),
                  None)]
    variants = [v for n in names if n for v in cfg.variants if v.name == n]
    written = []
    for task in cfg.tasks:
        test = dataset_of(task)
        predictors = []
        for v in variants:
            path = run / "cells" / f"{cell_id(v, task, cfg.seeds[0])}.safetensors"
            predictors.append(Predictor(sfm, load_prompts(path)) if path.exists() else
                              Predictor(sfm, class_names=test.class_names,
                                        is_thing=test.is_thing, n_prompts=v.prompt.n_prompts))
        cols = ["image", "ground truth"] + [v.name for v in variants]
        fig = matplotlib.figure.Figure(figsize=(2.6 * len(cols), 2.7 * n_images))
        axes = fig.subplots(n_images, len(cols), squeeze=False)
        for row in range(min(n_images, len(test))):
            scene = test[row]
            truth = types.SimpleNamespace(panoptic=torch.from_numpy(scene.instance),
                                          segments=scene.segments)
            panels = [scene.image.repeat(4, 0).repeat(4, 1),
                      overlay(scene.image, truth, test.class_names)]
            panels += [overlay(scene.image, p.predict(scene.image), test.class_names)
                       for p in predictors]
            for ax, panel, title in zip(axes[row], panels, cols):
                ax.imshow(panel)
                ax.set_axis_off()
                if row == 0:
                    ax.set_title(title, fontsize=9)
        fig.suptitle(f"{task}: test images 0-{n_images - 1}, panoptic predictions "
                     f"(seed {cfg.seeds[0]})", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        write_bytes(run / f"qualitative_{task}.png", buf.getvalue())
        written.append(run / f"qualitative_{task}.png")
    return written


def plot_shots(run: Path, cfg, intervals: dict) -> None:
    """A shots sweep (study ``shots: [k, ...]``): each metric against k for every swept
    variant, mean over seeds with its 95% interval (``study_intervals``: over seeds and
    test-image resamples, centred on the observed mean), and the fixed variants (zero-shot)
    as flat bands. Written as shots.png; nothing without a sweep."""
    swept: dict[str, list] = {}
    for v in cfg.variants:
        if v.base != v.name:
            swept.setdefault(v.base, []).append(v)
    if not swept:
        return
    plt = _plt()
    rows = intervals["rows"]
    fig, axes = plt.subplots(len(METRICS), len(cfg.tasks),
                             figsize=(max(7, 4 * len(cfg.tasks)), 3 * len(METRICS)), squeeze=False)
    for j, t in enumerate(cfg.tasks):
        for i, m in enumerate(METRICS):
            ax = axes[i][j]
            ks_all = sorted({v.shots for vs in swept.values() for v in vs})
            for v in cfg.variants:
                if v.base == v.name and v.name in rows:   # not swept: a flat band
                    mean, lo, hi = rows[v.name][t][m]
                    ax.axhline(mean, color="grey", lw=1, ls="--", label=v.name)
                    ax.fill_between([ks_all[0], ks_all[-1]], lo, hi, color="grey", alpha=0.15)
            for base, vs in swept.items():
                vs = sorted(vs, key=lambda v: v.shots)
                ks = [v.shots for v in vs]
                mean = np.array([rows[v.name][t][m][0] for v in vs], dtype=float)
                lo = np.array([rows[v.name][t][m][1] for v in vs], dtype=float)
                hi = np.array([rows[v.name][t][m][2] for v in vs], dtype=float)
                line, = ax.plot(ks, mean, marker="o", label=base)
                ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks_all, [str(k) for k in ks_all])
            ax.set_title(f"{t}: {m}")
            if i == len(METRICS) - 1:
                ax.set_xlabel("shots k")
            if j == 0:
                ax.set_ylabel("percent")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Metric vs number of shots (mean over seeds, 95% interval over seeds and images)")
    fig.tight_layout()
    fig.savefig(run / "shots.png", dpi=100)
    plt.close(fig)
