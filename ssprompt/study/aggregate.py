"""A study's aggregates: its cells read back, 95% intervals (over seeds and image resamples),
results.csv / .json, summary.md and the plots."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..evaluation.metrics import METRICS
from ..io import write_json, write_text
from .config import LARGE_LOSS, StudyConfig, cell_id
from .report import _mean_std, _n_cells, summary_markdown


def load_cells(run: Path, cfg: StudyConfig) -> list[dict]:
    rows = []
    for variant, task, seed in cfg.cells():
        p = run / "cells" / f"{cell_id(variant, task, seed)}.json"
        if not p.exists():
            raise UserError(f"{p}: cell missing; rerun the study to finish it")
        rows.append(json.loads(p.read_text()))
    return rows


ARCHIVE = "per_image.npz"   # a study's per-image records, all cells in one committed file


def pack_records(run: Path, cfg: StudyConfig) -> Path | None:
    """Write ``run/per_image.npz``: every cell's per-image records (``cells/*.stats.npz``, the
    intervals' input) in one file, identical records stored once (a fixed row's seeds share
    one evaluation), so a committed study's intervals can be recomputed from what is committed
    (``scripts/recompute_intervals.py``). None when a cell has no records."""
    blobs: dict[bytes, str] = {}
    index: dict[str, str] = {}
    for v, t, seed in cfg.cells():
        cid = cell_id(v, t, seed)
        p = run / "cells" / f"{cid}.stats.npz"
        if not p.exists():
            return None
        data = p.read_bytes()
        index[cid] = blobs.setdefault(data, f"r{len(blobs)}")
    buf = io.BytesIO()
    np.savez(buf, index=np.frombuffer(json.dumps(index).encode(), np.uint8),
             **{key: np.frombuffer(data, np.uint8) for data, key in blobs.items()})
    from ..io import write_bytes
    write_bytes(run / ARCHIVE, buf.getvalue())
    return run / ARCHIVE


def record_reader(run: Path):
    """``read(cell_id) -> bytes | None``: a cell's per-image records from ``cells/`` where the
    run has them, else from its ``per_image.npz`` archive."""
    archive = run / ARCHIVE
    z = index = None

    def read(cid: str) -> bytes | None:
        nonlocal z, index
        p = run / "cells" / f"{cid}.stats.npz"
        if p.exists():
            return p.read_bytes()
        if not archive.exists():
            return None
        if z is None:
            z = np.load(archive)
            index = json.loads(z["index"].tobytes())
        return z[index[cid]].tobytes() if cid in index else None

    return read


def study_intervals(run: Path, cfg: StudyConfig, rows: list[dict]) -> dict | None:
    """95% intervals (``ssprompt.evaluation.bootstrap``: a t-interval over seeds with the
    shared image-sampling variance from image resamples) of every row's Δ to its baseline
    (``cfg.baseline_of``), of each configured comparison, and, for each comparison whose two
    rows have different baselines, of the gain comparison (a - base(a)) - (b - base(b)); per
    task and metric; and each row's own interval. None when a cell has no per-image
    statistics (a study from an older version)."""
    from ..evaluation import bootstrap as bs

    t0 = time.time()
    by_key = {(r["variant"], r["task"], r["seed"]): r for r in rows}
    values: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    memo: dict[bytes, dict[str, np.ndarray]] = {}   # zero-shot's seeds share one evaluation
    read = record_reader(run)
    for t in cfg.tasks:
        weights = None
        for v in cfg.variants:
            per_seed = []
            for seed in cfg.seeds:
                data = read(cell_id(v, t, seed))
                if data is None:
                    return None
                if data not in memo:
                    stats = bs.PerImage.from_bytes(data)
                    if weights is None or weights.shape[1] != len(stats):
                        weights = bs.image_weights(len(stats))
                    memo[data] = {m: f(stats, weights) for m, f in bs.METRIC_FNS.items()}
                    memo[data]["class_iou"] = bs.class_iou(stats, weights)
                per_seed.append(memo[data])
            values[(v.name, t)] = {m: np.stack([d[m] for d in per_seed])
                                   for m in (*METRICS, "class_iou")}

    def observed(name: str, t: str, m: str) -> np.ndarray:
        """The row's per-seed values (S,) on the test set as it is (NaN where undefined)."""
        return np.array([np.nan if by_key[(name, t, s)].get(m) is None
                         else by_key[(name, t, s)][m] for s in cfg.seeds], dtype=float)

    pairs = [(v.name, cfg.baseline_of(v.name)) for v in cfg.variants
             if cfg.baseline_of(v.name)] + list(cfg.comparisons)
    out: dict = {"method": "t over seeds + shared image variance", "n_boot": bs.N_BOOT,
                 "level": bs.LEVEL, "seed": bs.BOOT_SEED, "n_seeds": len(cfg.seeds),
                 "pairs": [], "gains": [], "rows": {}}
    for a, b in dict.fromkeys(pairs):
        entry = {"a": a, "b": b, "tasks": {}}
        for t in cfg.tasks:
            entry["tasks"][t] = {
                m: bs.paired_interval(values[(a, t)][m], values[(b, t)][m],
                                      (observed(a, t, m), observed(b, t, m))).as_dict()
                for m in METRICS}
        out["pairs"].append(entry)
    for a, b in dict.fromkeys(cfg.comparisons):
        ba, bb = cfg.baseline_of(a), cfg.baseline_of(b)
        if ba is None or bb is None or ba == bb:   # same baseline: the pair's Δ is the gain's
            continue
        entry = {"a": a, "base_a": ba, "b": b, "base_b": bb, "tasks": {}}
        for t in cfg.tasks:
            entry["tasks"][t] = {
                m: bs.gain_interval(*(values[(x, t)][m] for x in (a, ba, b, bb)),
                                    tuple(observed(x, t, m) for x in (a, ba, b, bb))).as_dict()
                for m in METRICS}
        out["gains"].append(entry)
    out["things_vs_stuff"] = _things_vs_stuff(cfg, values, rows)
    _mark_zero_inflated(cfg, out, rows)
    out["multiplicity"] = _verdicts(cfg, out)
    if cfg.selection.enabled:
        out["shipped"] = _shipped(cfg, values, observed, by_key)
    for v in cfg.variants:
        out["rows"][v.name] = {}
        for t in cfg.tasks:
            out["rows"][v.name][t] = {}
            for m in METRICS:
                obs = observed(v.name, t, m)
                mean = float(np.nanmean(obs)) if np.isfinite(obs).any() else float("nan")
                out["rows"][v.name][t][m] = [mean, *bs.row_interval(values[(v.name, t)][m],
                                                                    obs)]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _mark_zero_inflated(cfg: StudyConfig, out: dict, rows: list[dict]) -> None:
    """A Δ involving a row where some seed's selection kept the default prompts (Δ exactly 0
    there) is a mixture the t-interval does not cover (``evaluation.shipped``): it is marked
    ``zero_inflated``, its p is not used (no verdict, no equivalence), and the row is reported
    by its parts under *What ships*."""
    kept = {(r["variant"], r["task"]) for r in rows
            if (r.get("selection") or {}).get("selected") == "default"}
    for e in out["pairs"] + out["gains"]:
        names = [e["a"], e["b"], e.get("base_a"), e.get("base_b")]
        for t in cfg.tasks:
            if any((n, t) in kept for n in names if n):
                for d in e["tasks"][t].values():
                    d["zero_inflated"], d["p"] = True, float("nan")


def _primary_entries(cfg: StudyConfig, out: dict) -> set[int]:
    """ids of the interval entries (pairs / gains) that the config's primary family names: a
    pair [a, b] is a's Δ to b, or, where a and b have different zero-shot baselines, the gain
    comparison (a - base(a)) - (b - base(b)) (what learning adds at a's grid against b's)."""
    ids = set()
    for a, b in cfg.primary:
        ba, bb = cfg.baseline_of(a), cfg.baseline_of(b)
        gain = ba is not None and bb is not None and ba != bb
        for e in out["gains" if gain else "pairs"]:
            if e["a"] == a and e["b"] == b:
                ids.add(id(e))
    return ids


def _verdicts(cfg: StudyConfig, out: dict) -> dict:
    """Holm-adjusted p for the primary family (every task and metric of its pairs), BH
    q-values for every other Δ (``evaluation.multiplicity``), and TOST equivalence at the
    config's margin; written into each interval dict (``family``, ``p_holm`` / ``q``,
    ``equivalent``). Returns the family's summary."""
    from ..evaluation.multiplicity import ALPHA, bh_qvalues, equivalent, holm

    primary = _primary_entries(cfg, out)
    fam: dict[str, list[dict]] = {"primary": [], "exploratory": []}
    for e in out["pairs"] + out["gains"]:
        kind = "primary" if id(e) in primary else "exploratory"
        for t in cfg.tasks:
            for m in METRICS:
                d = e["tasks"][t][m]
                d["family"] = kind
                if cfg.equivalence_margin is not None and not d.get("zero_inflated"):
                    d["equivalent"] = equivalent(d["delta"], d["se"], d["df"],
                                                 cfg.equivalence_margin)
                fam[kind].append(d)
    for d, p in zip(fam["primary"], holm([d["p"] for d in fam["primary"]])):
        d["p_holm"] = None if np.isnan(p) else float(p)
        d["holm_rejects"] = bool(np.isfinite(p) and p < ALPHA)
    for d, q in zip(fam["exploratory"], bh_qvalues([d["p"] for d in fam["exploratory"]])):
        d["q"] = None if np.isnan(q) else float(q)
    n_prim = sum(1 for d in fam["primary"] if np.isfinite(d["p"]))
    return {"alpha": ALPHA, "primary": [list(x) for x in cfg.primary],
            "primary_tests": n_prim,
            "primary_rejected": sum(1 for d in fam["primary"] if d.get("holm_rejects")),
            "exploratory_tests": sum(1 for d in fam["exploratory"] if np.isfinite(d["p"])),
            "exploratory_q05": sum(1 for d in fam["exploratory"]
                                   if d.get("q") is not None and d["q"] < ALPHA),
            "equivalence_margin": cfg.equivalence_margin}


def _shipped(cfg: StudyConfig, values: dict, observed, by_key: dict) -> dict:
    """The product estimand per trained row, task and metric (``evaluation.shipped``): the
    share of seeds that shipped learned prompts (Clopper-Pearson), the gain when shipped, the
    shipped Δ or "not estimable"; with ``report_raw``, the as-trained Δ per seed and the
    selection's power (the share shipped among seeds whose as-trained Δ, the mean over the
    metrics, is >= POWER_GAIN points)."""
    from ..evaluation.shipped import shipped_interval

    out: dict = {}
    for v in cfg.variants:
        base = cfg.baseline_of(v.name)
        if v.fixed or base is None:
            continue
        for t in cfg.tasks:
            cells = [by_key[(v.name, t, s)] for s in cfg.seeds]
            mask = np.array([(r.get("selection") or {}).get("selected", "default") != "default"
                             for r in cells])
            entry: dict = {"shipped_seeds": [int(s) for s, k in zip(cfg.seeds, mask) if k],
                           "metrics": {}}
            trained = []
            for m in METRICS:
                a, b = observed(v.name, t, m), observed(base, t, m)
                res = values[(v.name, t)][m] - values[(base, t)][m]
                entry["metrics"][m] = shipped_interval(a - b, res, mask).as_dict()
                raw = np.array([np.nan if (r.get("raw") or {}).get(m) is None else r["raw"][m]
                                for r in cells], float)
                trained.append(raw - b)
            trained = np.array(trained)                          # (metrics, seeds)
            if np.isfinite(trained).any():
                ok = np.isfinite(trained).any(0)
                gain = np.full(len(cfg.seeds), np.nan)
                gain[ok] = np.nanmean(trained[:, ok], 0)
                entry["as_trained_gain"] = [None if np.isnan(x) else float(x) for x in gain]
                big = gain >= POWER_GAIN
                entry["power"] = {"gain_at_least": POWER_GAIN, "seeds": int(big.sum()),
                                  "shipped": int((big & mask).sum())}
            out.setdefault(v.name, {})[t] = entry
    return out


POWER_GAIN = 2.0   # points: an as-trained gain selection should ship (its power is reported)


def _things_vs_stuff(cfg: StudyConfig, values: dict, rows: list[dict]) -> dict:
    """Per task: does full SSPrompt gain more IoU over stuff classes than over thing classes?
    The mean per-class IoU gain over zero-shot over thing classes and over stuff classes, each
    with its interval, and the interval of stuff minus things (classes absent from a
    resample's ground truth are left out of its means)."""
    import warnings

    from ..evaluation import bootstrap as bs

    target, base = cfg.full, cfg.baseline
    if target is None:
        return {}
    out = {}
    for t in cfg.tasks:
        mine = [r for r in rows if r["task"] == t]
        flags = np.array([pc["isthing"] for pc in mine[0]["per_class"].values()])
        if flags.all() or not flags.any():
            continue

        def observed(sel: np.ndarray) -> np.ndarray:   # per seed, on the test set as it is
            gains = []
            for seed in cfg.seeds:
                a, b = ([r for r in mine if r["variant"] == v and r["seed"] == seed][0]
                        ["per_class"] for v in (target, base))
                g = [a[n]["IoU"] - b[n]["IoU"] for n, f in zip(a, sel)
                     if f and a[n]["IoU"] is not None and b[n]["IoU"] is not None]
                gains.append(np.mean(g) if g else np.nan)
            return np.array(gains, dtype=float)

        gain = values[(target, t)]["class_iou"] - values[(base, t)]["class_iou"]  # (S, B, C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # a resample without a class
            things = np.nanmean(gain[..., flags], -1)
            stuff = np.nanmean(gain[..., ~flags], -1)
        th, st = observed(flags), observed(~flags)
        iv = bs.paired_interval(stuff, things, (st, th))
        out[t] = {"things": [float(np.nanmean(th)), *bs.row_interval(things, th)],
                  "stuff": [float(np.nanmean(st)), *bs.row_interval(stuff, st)],
                  "stuff_minus_things": iv.as_dict()}
    return out


def _as_trained(r: dict, m: str):
    """The test metric of the cell's prompts as trained on all its shots to the last step: the
    cell's own metric where selection was off, the refit's last step with ``report_raw``,
    else None (not measured)."""
    if not r.get("selection"):
        return r.get(m)
    return (r.get("raw") or {}).get(m)


def _flat(r: dict) -> dict:
    sel = r.get("selection") or {}
    moved = r.get("z_moved") or {}
    return {**r, "selected": sel.get("selected", ""),
            **{f"as_trained_{m}": _as_trained(r, m) for m in METRICS},
            **{f"z_moved_{k}": moved.get(k) for k in ("spatial", "semantic")}}


def aggregate(run: Path, cfg: StudyConfig, wall_s: float | None = None, test_split=None,
              sfm=None, peak_rss_mb: float | None = None) -> dict:
    """results.csv / results.json / summary.md and the plots of a finished study; with
    ``sfm`` and ``test_split(task)``, also the qualitative figures (they decode images)."""
    rows = load_cells(run, cfg)
    # the as-trained columns only where they differ from the shipped ones and were measured
    as_trained = [f"as_trained_{m}" for m in METRICS] if cfg.selection.enabled \
        and cfg.selection.report_raw else []
    cols = ["variant", "group", "task", "seed", *METRICS, "SQ", "RQ", "PQ_th", "PQ_st",
            "trained_params", "wall_s", "final_loss", "selected", *as_trained,
            "z_moved_spatial", "z_moved_semantic"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(_flat(r) for r in rows)
    write_text(run / "results.csv", buf.getvalue())

    summary: dict = {}
    for v in cfg.variants:
        for t in cfg.tasks:
            sel = [r for r in rows if r["variant"] == v.name and r["task"] == t]
            summary.setdefault(v.name, {})[t] = {
                m: _mean_std([r.get(m) for r in sel]) for m in METRICS}
            summary[v.name][t]["as_trained"] = {m: _mean_std([_as_trained(r, m) for r in sel])
                                                for m in METRICS}
            summary[v.name][t]["selected"] = [(r.get("selection") or {}).get("selected")
                                              for r in sel]
            summary[v.name][t]["trained_params"] = sel[0]["trained_params"]
            summary[v.name][t]["wall_s"] = float(np.mean([r["wall_s"] for r in sel]))
    total_wall = sum(r["wall_s"] for r in rows)
    import resource
    if peak_rss_mb is None:
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process
    pack_records(run, cfg)
    intervals = study_intervals(run, cfg, rows)
    worse = worse_cells(cfg, rows)
    write_json(run / "results.json", {"config": cfg.raw, "cells": rows, "summary": summary,
                                      "intervals": intervals, "worse_cells": worse,
                                      "study_wall_s": wall_s,
                                      "cells_wall_s": total_wall,
                                      "peak_rss_mb": round(peak_rss_mb)})
    write_text(run / "summary.md",
               summary_markdown(cfg, summary, wall_s, rows, intervals, worse))
    if worse:
        print(f"warning: {_n_cells(len(worse))} more than {LARGE_LOSS:g} points below "
              "their zero-shot baseline (same grid, task and seed) on mIoU, AP50 or PQ; listed in "
              f"{run}/summary.md")
    from .plots import plot_shots, plot_study
    plot_study(run, cfg, rows, summary)
    if intervals is not None:
        plot_shots(run, cfg, intervals)
    if sfm is not None and test_split is not None:
        from .plots import plot_qualitative
        plot_qualitative(run, cfg, sfm, test_split)
    return summary


def worse_cells(cfg: StudyConfig, rows: list[dict], by: float = LARGE_LOSS) -> list[dict]:
    """Cells whose kept prompts score more than ``by`` points below their baseline row
    (``StudyConfig.baseline_of``: the zero-shot row of the same grid; same task and seed) on any of mIoU / AP50 / PQ: the losses a row's mean and
    interval can hide when the other seeds kept the defaults."""
    by_key = {(r["variant"], r["task"], r["seed"]): r for r in rows}
    out = []
    for r in rows:
        base_name = cfg.baseline_of(r["variant"])
        b = by_key.get((base_name, r["task"], r["seed"]))
        if b is None:
            continue
        drops = {m: [r[m], b[m]] for m in METRICS
                 if r.get(m) is not None and b.get(m) is not None and b[m] - r[m] > by}
        if drops:
            out.append({"variant": r["variant"], "task": r["task"], "seed": r["seed"],
                        "baseline": base_name,
                        "selected": (r.get("selection") or {}).get("selected"),
                        "metrics": drops})
    return out
