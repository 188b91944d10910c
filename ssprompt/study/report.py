"""summary.md: the study's tables (means, intervals, controls, losses, per class) in Markdown."""

from __future__ import annotations

import numpy as np

from ..evaluation.metrics import METRICS
from .config import LARGE_LOSS, StudyConfig


def _interval_table(cfg: StudyConfig, intervals: dict, pairs: list[dict]) -> list[str]:
    lines = ["| difference | " + " | ".join(f"{t} {m}" for t in cfg.tasks for m in METRICS)
             + " |", "|---|" + "---:|" * (len(cfg.tasks) * len(METRICS))]
    for e in pairs:
        cells = []
        for t in cfg.tasks:
            for m in METRICS:
                d = e["tasks"][t][m]
                if not np.isfinite(d["delta"]) or not np.isfinite(d["lo"]):
                    cells.append("n/a")
                    continue
                if d.get("zero_inflated"):     # some seed kept the defaults: see What ships
                    cells.append(f"{d['delta']:+.1f} (0-inflated)")
                    continue
                cells.append(f"{d['delta']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]{_mark(d)}")
        lines.append(f"| {e['a']} − {e['b']} | " + " | ".join(cells) + " |")
    return lines


def _mark(d: dict) -> str:
    """``*`` the 95% interval excludes 0 (unadjusted); ``‡`` a primary verdict Holm keeps;
    ``†`` an exploratory one with BH q < 0.05; ``≡`` equivalent (TOST at the margin)."""
    mark = " *" if d["excludes_zero"] else ""
    if d.get("holm_rejects"):
        mark += "‡"
    elif d.get("q") is not None and d["q"] < 0.05:
        mark += "†"
    if d.get("equivalent"):
        mark += " ≡"
    return mark


def _primary_table(cfg: StudyConfig, intervals: dict) -> list[str]:
    """The primary family's verdicts: each Δ with its interval, p, Holm-adjusted p."""
    fam = intervals.get("multiplicity") or {}
    if not fam.get("primary"):
        return []
    margin = fam.get("equivalence_margin")
    lines = ["", "## Primary family (Holm)", "",
             f"The questions named in the config before the run ({fam['primary_tests']} tests: "
             "every task and metric of "
             + ", ".join(f"`{a} − {b}`" for a, b in fam["primary"])
             + "; a pair of rows with different zero-shot grids is their gain comparison). "
             f"Holm's step-down adjustment keeps the chance of any false claim among them at "
             f"{fam['alpha']:g}; **{fam['primary_rejected']} of {fam['primary_tests']}** survive. "
             "Every other Δ in this file is exploratory: its BH q-value is in results.json "
             f"({fam['exploratory_q05']} of {fam['exploratory_tests']} have q < 0.05, marked †)."
             + (f" ≡: equivalent within ±{margin:g} points (TOST, 90% interval inside the "
                "margin, fixed before the run)." if margin else ""), "",
             "| difference | task | metric | Δ [95%] | p | Holm p | verdict |",
             "|---|---|---|---:|---:|---:|---|"]
    entries = [(e, f"{e['a']} − {e['b']}") for e in intervals["pairs"]] + [
        (e, f"({e['a']} − {e['base_a']}) − ({e['b']} − {e['base_b']})")
        for e in intervals.get("gains", [])]
    for e, name in entries:
        for t in cfg.tasks:
            for m in METRICS:
                d = e["tasks"][t][m]
                if d.get("family") != "primary" or d.get("p_holm") is None:
                    continue
                verdict = ("**holds**" if d["holm_rejects"] else
                           ("equivalent" if d.get("equivalent") else "not shown"))
                lines.append(f"| {name} | {t} | {m} | {d['delta']:+.1f} [{d['lo']:+.1f}, "
                             f"{d['hi']:+.1f}] | {d['p']:.2g} | {d['p_holm']:.2g} | "
                             f"{verdict} |")
    return lines


def _shipped_tables(cfg: StudyConfig, intervals: dict) -> list[str]:
    """The product estimand per trained row and task: share shipped [Clopper-Pearson], gain
    when shipped [95%], shipped Δ [95%] or not estimable; selection's power."""
    from ..evaluation.shipped import SIMULATED_COVERAGE

    shipped = intervals.get("shipped") or {}
    if not shipped:
        return []
    cov = ", ".join(f"{c:.3f} at keep {k:g}" for k, c in sorted(SIMULATED_COVERAGE.items()))
    lines = ["", "## What ships (the product estimand)", "",
             "Per row: the share of seeds whose selection shipped learned prompts (exact "
             "Clopper-Pearson 95%), the Δ to zero-shot over those seeds (95%, as above), and "
             "the shipped Δ over all seeds (kept ones count 0) = share × gain, with the product "
             "of the two parts' 97.5% intervals (`ssprompt/evaluation/shipped.py`; simulated "
             "coverage at 8 seeds among estimable rows "
             + (cov or "in tests/evaluation/test_shipped.py")
             + "); *not estimable* with fewer than 2 seeds shipped. Power: among the seeds "
             "whose as-trained prompts (all shots, last step) gain at least +2 points on test "
             "(mean of the metrics), the share selection shipped.", "",
             "| row | task | shipped | " + " | ".join(f"gain when shipped {m}" for m in METRICS)
             + " | " + " | ".join(f"shipped Δ {m}" for m in METRICS) + " | power |",
             "|---|---|---|" + "---:|" * (2 * len(METRICS) + 1)]
    for name, by_task in shipped.items():
        for t, e in by_task.items():
            ms = e["metrics"]
            first = next(iter(ms.values()))
            share = (f"{first['shipped']}/{first['seeds']} [{first['share_lo']:.2f}, "
                     f"{first['share_hi']:.2f}]")
            gains, deltas = [], []
            for m in METRICS:
                d = ms[m]
                g = d.get("gain")
                if g is None or not np.isfinite(g["delta"]):
                    gains.append("-")
                elif not np.isfinite(g["lo"]):
                    gains.append(f"{g['delta']:+.1f}")
                else:
                    gains.append(f"{g['delta']:+.1f} [{g['lo']:+.1f}, {g['hi']:+.1f}]")
                if not np.isfinite(d["delta"]):
                    deltas.append("n/a")
                elif d["estimable"]:
                    deltas.append(f"{d['delta']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]")
                else:
                    deltas.append("not estimable")
            pw = e.get("power")
            power = "-" if pw is None else (f"{pw['shipped']}/{pw['seeds']}" if pw["seeds"]
                                            else "0/0")
            lines.append(f"| {name} | {t} | {share} | " + " | ".join(gains) + " | "
                         + " | ".join(deltas) + f" | {power} |")
    return lines


def _method_note(intervals: dict) -> str:
    """What the intervals are, and their simulated coverage at the study's seed count."""
    from ..evaluation import bootstrap as bs

    s = intervals.get("n_seeds")
    note = ("a t-interval over the seeds' paired differences (each on all test images; "
            "Welch–Satterthwaite degrees of freedom), its variance s²/S plus the image-sampling "
            "variance all seeds share (estimated from "
            f"{intervals['n_boot']} seeded resamples of the test images, the same for every "
            "row and seed), centred on Δ (`ssprompt/evaluation/bootstrap.py`).")
    if s == 1:
        return note + (" With one seed, only the test images' sampling is in the interval: "
                       "it says nothing about other seeds.")
    known = sorted(bs.SIMULATED_COVERAGE)
    at = min(known, key=lambda k: abs(k - (s or 0)))
    cov = " / ".join(f"{c:.2f}" for c in bs.SIMULATED_COVERAGE[at])
    sds = " / ".join(str(x) for x in bs.SIMULATED_SEED_SD)
    where = f"at this study's {s} seeds" if at == s else f"at {at} seeds (this study has {s})"
    return note + (f" Simulated coverage {where}: {cov} at a seed SD of the Δ of {sds} points "
                   "(200 images, known Δ, 1000 replications; "
                   "`tests/evaluation/test_bootstrap.py`).")


def _moved_table(cfg: StudyConfig, rows: list[dict]) -> list[str]:
    """How far training moved the fused embeddings z from the defaults (last step, before
    selection; mean over seeds): the quantity a step-size confound changes."""
    out = []
    for v in cfg.variants:
        cells, any_moved = [], False
        for t in cfg.tasks:
            sel = [r.get("z_moved") or {} for r in rows if r["variant"] == v.name
                   and r["task"] == t]
            parts = []
            for k in ("spatial", "semantic"):
                vals = [m[k] for m in sel if k in m]
                if vals:
                    parts.append(f"{k[:3]} {np.mean(vals):.3f}")
                    any_moved = True
            cells.append(", ".join(parts) or "-")
        if any_moved:
            out.append(f"| {v.name} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["", "## How far training moved z", "",
            "RMS(z − z_default) / RMS(z_default) of the fused embeddings at the last training "
            "step (before selection), mean over seeds; `spa` spatial, `sem` semantic.", "",
            "| variant | " + " | ".join(cfg.tasks) + " |", "|---|" + "---|" * len(cfg.tasks),
            *out]


def _weights_by_kind(cfg: StudyConfig, rows: list[dict]) -> list[str]:
    """Mean learned semantic fusion weight over thing classes and over stuff classes, for the
    variants that learn it, over the seeds whose trained prompts were kept by selection."""
    out = []
    for v in cfg.variants:
        if v.kind != "weighted" or "semantic" not in v.prompt.learners:
            continue
        cells = []
        for t in cfg.tasks:
            th, st, kept = [], [], 0
            for r in rows:
                if r["variant"] != v.name or r["task"] != t:
                    continue
                if (r.get("selection") or {}).get("selected") == "default":
                    continue
                w = (r.get("fusion_weights") or {}).get("semantic")
                if not w:
                    continue
                kept += 1
                flags = [pc["isthing"] for pc in r["per_class"].values()]
                th += [x for x, f in zip(w, flags) if f]
                st += [x for x, f in zip(w, flags) if not f]
            cells.append(f"{np.mean(th):.2f} / {np.mean(st):.2f} ({kept})" if kept and th and st
                         else (f"{np.mean(th or st):.2f} / - ({kept})" if kept else "-"))
        out.append(f"| {v.name} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["", "## Learned semantic fusion weights: things vs stuff", "",
            "Mean learned w over thing classes / over stuff classes (seeds whose trained "
            "prompts selection kept, in brackets; w = 1 keeps only the learned embedding, "
            "0 only the encoder's). A task whose classes are all things or all stuff has one "
            "side only.", "", "| variant | " + " | ".join(cfg.tasks) + " |",
            "|---|" + "---|" * len(cfg.tasks), *out]


def _mean_std(vals: list) -> tuple[float, float]:
    v = np.array([x for x in vals if x is not None], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _n_cells(n: int) -> str:
    return f"{n} cell{'s' * (n != 1)}"


def _worse_table(cfg: StudyConfig, worse: list[dict]) -> list[str]:
    head = ["", f"## Cells more than {LARGE_LOSS:g} points below their zero-shot baseline", ""]
    if not worse:
        return head + [f"None: no cell's kept prompts score more than {LARGE_LOSS:g} points "
                       "below its zero-shot baseline (same grid, task and seed) on mIoU, AP50 "
                       "or PQ."]
    return head + [
        f"{_n_cells(len(worse))}: what a user with this seed's shots would have got instead of "
        "doing nothing. `kept` is the step selection kept (`default`: the defaults).", "",
        "| variant | task | seed | kept | this cell vs its baseline |", "|---|---|---:|---|---|",
        *(f"| {w['variant']} | {w['task']} | {w['seed']} | {w['selected']} | "
          + f"`{w.get('baseline')}`: "
          + ", ".join(f"{m} {a:.1f} vs {b:.1f} ({a - b:+.1f})"
                      for m, (a, b) in w["metrics"].items()) + " |" for w in worse)]


def _table(cfg: StudyConfig, stats) -> list[str]:
    """A markdown table, one row a variant; ``stats(variant, task)`` -> {metric: (mean, std)}."""
    head = "| variant | params |" + "".join(f" {t} {m} |" for t in cfg.tasks for m in METRICS)
    lines = [head, "|---|---:|" + "---:|" * (len(cfg.tasks) * len(METRICS))]
    best = {(t, m): max((stats(v.name, t)[m][0] for v in cfg.variants
                         if not np.isnan(stats(v.name, t)[m][0])), default=np.nan)
            for t in cfg.tasks for m in METRICS}
    for v in cfg.variants:
        cells = []
        for t in cfg.tasks:
            for m in METRICS:
                mean, std = stats(v.name, t)[m]
                if np.isnan(mean):
                    cells.append("n/a")
                    continue
                s = f"{mean:.1f} ± {std:.1f}"
                if mean == best[(t, m)]:
                    s = f"**{s}**"
                base = cfg.baseline_of(v.name)
                if base is not None:
                    s += f" ({mean - stats(base, t)[m][0]:+.1f})"
                cells.append(s)
        lines.append(f"| {v.name} | {stats.params(v.name)} | " + " | ".join(cells) + " |")
    return lines


def _shots(cfg: StudyConfig) -> str:
    """"16-shot", or for a shots sweep "k = 1, 2, 4 shots"."""
    ks = sorted({cfg.shots_of(v) for v in cfg.variants if not v.fixed})
    return f"{cfg.shots}-shot" if len(ks) <= 1 else f"k = {', '.join(map(str, ks))} shots"


def summary_markdown(cfg: StudyConfig, summary: dict, wall_s: float | None,
                     rows: list[dict] | None = None, intervals: dict | None = None,
                     worse: list[dict] | None = None) -> str:
    zs = cfg.baseline
    sel = cfg.selection
    rule = ("**The product estimand**: every trained variant ships what held-out selection "
            "chooses (`ssprompt/engine/selection.py`): the k shots are cross-fitted "
            f"({round(1 / sel.holdout)} folds, every shot held out once; leave-one-out for "
            f"small k), candidates scored on each held-out image every {sel.every} steps, and a "
            "step ships only if a sign-flip permutation test (max over all candidate steps, "
            f"family-wise level {sel.alpha:g}) finds it better than the default prompts and "
            "it is not worse on any one of mIoU, AP50 and PQ (each over a fold's held-out "
            "images pooled, mean over folds); it is then refit on all k shots to that step. "
            "Otherwise the default prompts ship; k = 1 always keeps them."
            if sel.enabled else
            "**The method estimand**: every trained variant trains on all k shots with the "
            "schedule fixed in advance and is scored on test as trained (no held-out "
            "selection, no fallback to the default prompts).")
    lines = [f"# Study `{cfg.name}`", "",
             f"{len(cfg.variants)} variants x {len(cfg.tasks)} tasks x {len(cfg.seeds)} seeds "
             f"(seeds {cfg.seeds}), {_shots(cfg)}, test images per task: "
             f"{cfg.n_test or 'all'}. Mean ± std over seeds, in percent; **bold** = best in "
             f"the column; (Δ) = difference to the row's zero-shot baseline: the zero-shot "
             f"row with the same number of spatial prompts N, else `{zs}`."
             + (f" Wall time of this run: {wall_s / 60:.1f} min." if wall_s else ""), "", rule,
             ""]

    class Stats:
        def __init__(self, key=None):
            self.key = key

        def __call__(self, v, t):
            return summary[v][t] if self.key is None else summary[v][t][self.key]

        def params(self, v):
            return summary[v][cfg.tasks[0]]["trained_params"]

    lines += _table(cfg, Stats())
    if intervals is not None:
        n_base = sum(1 for v in cfg.variants if cfg.baseline_of(v.name))
        lines += ["", "## Differences with 95% intervals", "",
                  "Δ = mean over seeds of (row − baseline), in points. [95% interval]: "
                  + _method_note(intervals)
                  + " * = the interval excludes 0 (unadjusted); without it, the difference is "
                  "not detectable with these test images and seeds. ‡ = a primary verdict that "
                  "survives Holm, † = an exploratory one with BH q < 0.05 (see *Primary "
                  "family*); claims rest on ‡ only. *0-inflated*: some seed's selection kept "
                  "the default prompts (Δ = 0 there), a mixture this interval does not cover: "
                  "see *What ships*. "
                  f"Interval time: {intervals['seconds']:.0f} s.", ""]
        lines += _interval_table(cfg, intervals, intervals["pairs"][:n_base])
        if intervals["pairs"][n_base:]:
            lines += ["", "### Comparisons (controls)", ""]
            lines += _interval_table(cfg, intervals, intervals["pairs"][n_base:])
        if intervals.get("gains"):
            lines += ["", "### Gain comparisons", "",
                      "(a − base(a)) − (b − base(b)): does `a` gain more over its own "
                      "zero-shot baseline than `b` over its own? Per seed, then as above.", ""]
            lines += _interval_table(cfg, intervals, [
                {**e, "a": f"({e['a']} − {e['base_a']})", "b": f"({e['b']} − {e['base_b']})"}
                for e in intervals["gains"]])
    if intervals is not None:
        lines += _primary_table(cfg, intervals)
        lines += _shipped_tables(cfg, intervals)
    if intervals is not None and intervals.get("things_vs_stuff"):

        lines += ["", f"## Things vs stuff: `{cfg.full}`'s IoU gain over "
                  f"`{zs}`", "",
                  "Mean per-class IoU gain over the thing classes and over the stuff classes "
                  "(mean over seeds), with 95% intervals as above, and stuff minus things.", "",
                  "| task | things | stuff | stuff − things |", "|---|---:|---:|---:|"]
        for t, d in intervals["things_vs_stuff"].items():
            diff = d["stuff_minus_things"]
            mark = " *" if diff["excludes_zero"] else ""
            lines.append(f"| {t} | {d['things'][0]:+.1f} [{d['things'][1]:+.1f}, "
                         f"{d['things'][2]:+.1f}] | {d['stuff'][0]:+.1f} [{d['stuff'][1]:+.1f}, "
                         f"{d['stuff'][2]:+.1f}] | {diff['delta']:+.1f} [{diff['lo']:+.1f}, "
                         f"{diff['hi']:+.1f}]{mark} |")
    if worse is not None:
        lines += _worse_table(cfg, worse)
    if rows:
        lines += _weights_by_kind(cfg, rows)
        lines += _moved_table(cfg, rows)
    if sel.enabled:
        lines += ["", "## What selection chose", "",
                  "Per task, the step each seed kept (`default`: no step beat the default "
                  "prompts on the held-out shots).", "",
                  "| variant | " + " | ".join(cfg.tasks) + " |",
                  "|---|" + "---|" * len(cfg.tasks)]
        for v in cfg.variants:
            picks = [", ".join(str(x) for x in summary[v.name][t]["selected"] if x is not None)
                     or "-" for t in cfg.tasks]
            lines.append(f"| {v.name} | " + " | ".join(picks) + " |")
        if sel.report_raw:
            lines += ["", "## The same rows as trained (the method estimand)", "",
                      "Test metrics of the prompts trained on all k shots to the last step "
                      "(the refit run to its end), i.e. what prompt learning gives when "
                      "nothing checks it.", ""]
            lines += _table(cfg, Stats("as_trained"))
    lines += _per_class_tables(cfg, rows) if rows else []
    return "\n".join(lines) + "\n"


def _per_class_tables(cfg: StudyConfig, rows: list[dict]) -> list[str]:
    """Per task: each class's IoU and PQ for zero-shot and full SSPrompt (mean over seeds) and
    the difference, largest gain first; then the mean difference over things and over stuff."""

    zs, target = cfg.baseline, cfg.full
    if target is None:
        return []
    out = ["", f"## Per class: `{target}` vs `{zs}`", "",
           "Mean over seeds, percent; a class with no ground truth in a task is left out."]

    def per_class(variant: str, task: str) -> dict:
        sel = [r["per_class"] for r in rows if r["variant"] == variant and r["task"] == task]
        names = list(sel[0]) if sel else []
        return {n: {m: _mean_std([pc[n].get(m) for pc in sel])[0] for m in ("IoU", "PQ")}
                | {"isthing": sel[0][n]["isthing"]} for n in names}

    for t in cfg.tasks:
        a, b = per_class(zs, t), per_class(target, t)
        keep = [n for n in a if not np.isnan(a[n]["IoU"]) and not np.isnan(b[n]["IoU"])]
        keep.sort(key=lambda n: b[n]["IoU"] - a[n]["IoU"], reverse=True)
        out += ["", f"**{t}**", "", "| class | kind | IoU zero-shot | IoU SSPrompt | Δ IoU | "
                "Δ PQ |", "|---|---|---:|---:|---:|---:|"]
        for n in keep:
            dpq = b[n]["PQ"] - a[n]["PQ"]
            out.append(f"| {n} | {'thing' if a[n]['isthing'] else 'stuff'} | "
                       f"{a[n]['IoU']:.1f} | {b[n]['IoU']:.1f} | {b[n]['IoU'] - a[n]['IoU']:+.1f} | "
                       + ("n/a" if np.isnan(dpq) else f"{dpq:+.1f}") + " |")
        for kind, flag in (("things", True), ("stuff", False)):
            d = [b[n]["IoU"] - a[n]["IoU"] for n in keep if a[n]["isthing"] == flag]
            if d:
                out.append(f"| *mean over {kind}* | | | | {np.mean(d):+.1f} | |")
    return out
