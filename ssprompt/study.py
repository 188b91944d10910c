"""``ssprompt study``: the whole ablation study, (variant x task x seed) cells, in one command.

The run folder holds ``config.yaml`` (the resolved config), ``cells/`` (one JSON and one prompts
file per finished cell, each written atomically) and the aggregates: ``results.csv``,
``results.json``, ``summary.md`` and plots. A study killed at any point and run again with the
same config skips finished cells and loses only the cells in progress (the seeds of one
variant and task train together in one batched pass, so up to one cell per seed); a different
config refuses to mix into the folder unless ``--force``. Under ``torchrun`` (or with
``--workers N`` processes) whole (variant, task) groups are shared out, so a cell's numbers do
not depend on who ran it; rank 0 (the parent) aggregates.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from dataclasses import dataclass, field, fields
from importlib.resources import files
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from .errors import UserError
from .io import write_bytes, write_json, write_text
from .prompts.promptset import PromptConfig
from .selection import SelectionConfig
from .train import TrainConfig

CONFIG_DIR = Path(str(files("ssprompt").joinpath("configs")))  # package data
METRICS = ("mIoU", "AP50", "PQ")
TOP_KEYS = {"name", "tasks", "seeds", "shots", "n_test", "train", "selection", "variants",
            "comparisons"}
SELECTION_KEYS = {f.name for f in fields(SelectionConfig)}
VARIANT_KEYS = {"name", "mode", "learners", "n_prompts", "init", "weight", "weight_init",
                "anchored", "group", "train", "shots"}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"seed"}
FIXED_MODES = ("default", "prompt_engineering")  # variants with nothing to learn
# A cell whose kept prompts score this many points below the baseline row (same task and seed)
# on mIoU, AP50 or PQ is listed as a loss in summary.md and announced at the end of a study.
LARGE_LOSS = 5.0


@dataclass
class Variant:
    name: str
    prompt: PromptConfig
    group: str = "main"
    train: dict = field(default_factory=dict)
    shots: int | None = None    # None: the study's
    base: str = ""              # the config's variant name (before a shots sweep's suffix)


@dataclass
class StudyConfig:
    name: str
    tasks: list[str]
    seeds: list[int]
    shots: int
    n_test: int | None
    train: dict
    variants: list[Variant]
    raw: dict
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    comparisons: list[tuple[str, str]] = field(default_factory=list)

    def shots_of(self, v: Variant) -> int:
        return v.shots if v.shots is not None else self.shots

    def cells(self) -> list[tuple[Variant, str, int]]:
        return [(v, t, s) for t in self.tasks for v in self.variants for s in self.seeds]


def _check_keys(where: str, got: dict, allowed: set[str]) -> None:
    bad = sorted(set(got) - allowed)
    if bad:
        raise UserError(f"{where}: unknown key(s) {', '.join(bad)}; allowed: "
                        f"{', '.join(sorted(allowed))}")


def parse_sets(items: list[str] | None) -> dict:
    """``--set key=value`` arguments -> {key: value}, each value parsed as YAML (``50``,
    ``0.01``, ``[0, 1]``, ``true``, ``weighted``)."""
    out = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {item}: expected key=value (e.g. --set train.steps=50)")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item}: value is not valid YAML "
                            f"({str(e).splitlines()[0]})") from None
    return out


def apply_sets(raw: dict, sets: dict) -> dict:
    """``raw`` with the ``--set`` overrides applied: a dotted key walks into mappings, and
    ``variants.NAME.key`` into the variant called NAME (``--set variants.ssprompt.n_prompts=25``).
    Unknown keys are caught by the config's own checks."""
    raw = copy.deepcopy(raw)
    for key, value in sets.items():
        node, parts = raw, key.split(".")
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[:i + 1])
            if isinstance(node, list):  # variants: by name
                hit = [v for v in node if isinstance(v, dict) and v.get("name") == part]
                if not hit:
                    raise UserError(f"--set {key}: no variant named {part!r}")
                node = hit[0]
            elif isinstance(node, dict):
                if node.get(part) is None and part != "variants":
                    node[part] = {}
                node = node[part]
            else:
                raise UserError(f"--set {key}: {where} is not a mapping")
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")
        node[parts[-1]] = value
    return raw


def check_train_values(where: str, values: dict) -> dict:
    """``values`` as TrainConfig fields: unknown keys and values of the wrong type are refused
    in one line; an int is accepted where a float is expected."""
    _check_keys(where, values, TRAIN_KEYS)
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    out = {}
    for k, v in values.items():
        t = types[k]
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            kind = "a number" if t is float else "an integer"
            raise UserError(f"{where}: {k}={v!r} must be {kind}")
        out[k] = v
    return out


def load_config(path: str | Path, sets: dict | None = None) -> StudyConfig:
    """A study config from YAML, with ``--set`` overrides (``parse_sets``) applied."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: study config not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a study config must be a mapping")
    if sets:
        raw = apply_sets(raw, sets)
        path = Path(f"{path} (with --set {', '.join(sets)})")
    _check_keys(str(path), raw, TOP_KEYS)
    for key in ("tasks", "seeds", "variants"):
        if not raw.get(key):
            raise UserError(f"{path}: '{key}' must be a non-empty list")
    train = check_train_values(f"{path}: train", dict(raw.get("train") or {}))
    selection = dict(raw.get("selection") or {})
    _check_keys(f"{path}: selection", selection, SELECTION_KEYS)
    variants, names = [], set()
    for i, v in enumerate(raw["variants"]):
        where = f"{path}: variants[{i}]"
        if not isinstance(v, dict) or "name" not in v or "mode" not in v:
            raise UserError(f"{where}: each variant needs a name and a mode")
        _check_keys(where, v, VARIANT_KEYS)
        vtrain = check_train_values(f"{where}.train", v.get("train") or {})
        if v["name"] in names:
            raise UserError(f"{where}: duplicate variant name {v['name']!r}")
        names.add(v["name"])
        try:
            prompt = PromptConfig(mode=v["mode"],
                                  learners=tuple(v.get("learners", ("spatial", "semantic"))),
                                  n_prompts=v.get("n_prompts", 100), init=v.get("init"),
                                  weight=v.get("weight", "prompt"),
                                  weight_init=v.get("weight_init", 0.5),
                                  anchored=v.get("anchored"))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        vshots = v.get("shots")
        if vshots is not None and (not isinstance(vshots, int) or vshots <= 0):
            raise UserError(f"{where}: shots must be a positive integer")
        variants.append(Variant(v["name"], prompt, v.get("group", "main"), vtrain, vshots,
                                v["name"]))
    shots = raw.get("shots", 16)
    sweep = shots if isinstance(shots, list) else None
    if sweep is not None:  # a shots sweep: each learned variant once per k ("NAME-kK")
        if not sweep or any(not isinstance(k, int) or k <= 0 for k in sweep):
            raise UserError(f"{path}: shots must be a positive integer or a list of them")
        variants = [v for v in variants if v.prompt.mode in FIXED_MODES] + [
            Variant(f"{v.name}-k{k}", v.prompt, v.group, v.train, k, v.name)
            for v in variants if v.prompt.mode not in FIXED_MODES for k in sweep]
        shots = max(sweep)
    elif not isinstance(shots, int) or shots <= 0:
        raise UserError(f"{path}: shots must be a positive integer or a list of them")
    names = {v.name for v in variants}
    comparisons = []
    for i, pair in enumerate(raw.get("comparisons") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(x in names for x in pair)):
            raise UserError(f"{path}: comparisons[{i}]: expected [variant, variant] of this "
                            f"study's variants, got {pair!r}")
        comparisons.append((pair[0], pair[1]))
    return StudyConfig(raw.get("name", path.stem), list(raw["tasks"]), list(raw["seeds"]),
                       shots, raw.get("n_test"), train, variants, raw,
                       SelectionConfig(**selection), comparisons)


def cell_id(variant: Variant, task: str, seed: int) -> str:
    return f"{variant.name}__{task}__s{seed}"


def run_study(config: str | None, out: str | None, quick: bool = False, force: bool = False,
              sfm: str = "embedded", checkpoint: str | None = None, device: str = "auto",
              cache_dir: str | None = None, sets: dict | None = None, workers: int = 1,
              threads: int | None = None) -> Path:
    """Run (or finish) a study; ``workers`` processes share its (variant, task) groups, each
    with ``threads`` torch threads (default: this process's threads / workers, at least 1)."""
    from .distributed import barrier, init_from_env, rank_world
    from .sfm import load_sfm

    cfg_path = Path(config) if config else CONFIG_DIR / ("quick.yaml" if quick else "default.yaml")
    cfg = load_config(cfg_path, sets)
    run = Path(out) if out else Path("runs") / cfg.name
    init_from_env()
    rank, world = rank_world()
    if workers < 1 or (threads is not None and threads < 1):
        raise UserError(f"--workers {workers} --threads {threads}: both must be at least 1")
    if workers > 1 and world > 1:
        raise UserError("--workers: not under torchrun (its ranks already share the groups)")
    cells_dir = run / "cells"
    resolved = yaml.safe_dump(cfg.raw, sort_keys=True)
    stored = run / "config.yaml"
    if rank == 0:
        if stored.exists() and stored.read_text() != resolved:
            if not force:
                raise UserError(f"{run}: holds a study with a different config; use a new --out, "
                                "or --force to discard its finished cells")
            for p in cells_dir.glob("*"):
                p.unlink()
        cells_dir.mkdir(parents=True, exist_ok=True)
        write_text(stored, resolved)
    barrier()

    from .experiment import Workspace
    from .features import FeatureCache

    model = load_sfm(sfm, checkpoint, device)
    ws = Workspace(model, FeatureCache(cache_dir))
    done = finished_cells(cells_dir, model.weights_hash())
    # whole (variant, task) groups go to a rank or worker, so that a group's seeds train
    # together exactly as in one process (a group's cells do not depend on who runs it)
    mine = [g for i, g in enumerate(study_groups(cfg)) if i % world == rank]
    todo = [[c for c in g if cell_id(*c) not in done] for g in mine]
    todo = [g for g in todo if g]
    n_mine = sum(len(g) for g in mine)
    bar = tqdm(total=n_mine, desc=f"study {cfg.name}", disable=rank != 0, unit="cell",
               initial=n_mine - sum(len(g) for g in todo))
    t_study = time.time()
    if workers > 1 and len(todo) > 1:
        threads = threads or max(1, torch_threads() // workers)
        _run_workers(todo, workers, threads, bar, dict(
            config=str(cfg_path), sets=sets, sfm=sfm, checkpoint=checkpoint, device=device,
            cache_dir=cache_dir, cells_dir=str(cells_dir)))
    else:
        if threads:
            import torch
            torch.set_num_threads(threads)
        run_groups(ws, cfg, todo, cells_dir, on_cell=lambda: bar.update(1),
                   on_group=lambda vname, task, seeds: bar.set_postfix_str(
                       f"{vname} / {task} / seeds {seeds}"))
    bar.close()
    barrier()
    if rank == 0:
        wall = time.time() - t_study
        previous = run / "results.json"
        peak = None
        if not todo and previous.exists():  # nothing ran now: keep the run's own numbers
            before = json.loads(previous.read_text())
            wall, peak = before.get("study_wall_s") or wall, before.get("peak_rss_mb")
        elif workers > 1:   # the largest process: this one or a worker
            import resource
            peak = max(resource.getrusage(who).ru_maxrss for who in
                       (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
        aggregate(run, cfg, wall_s=wall, peak_rss_mb=peak,
                  test_split=lambda t: ws.dataset(t, "test", n_test=cfg.n_test), sfm=model)
        print(f"study {cfg.name}: {len(cfg.cells())} cells; results in {run}/summary.md")
    return run


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def study_groups(cfg: StudyConfig) -> list[list[tuple[Variant, str, int]]]:
    """The study's cells as (variant, task) groups (the seeds of one group train together), in
    config order."""
    groups: dict[tuple[str, str], list] = {}
    for c in cfg.cells():
        groups.setdefault((c[0].name, c[1]), []).append(c)
    return list(groups.values())


def run_groups(ws, cfg: StudyConfig, groups: list[list[tuple[Variant, str, int]]],
               cells_dir: Path, on_cell=None, on_group=None) -> None:
    """Run the given (variant, task) groups' cells in this process (``ws``: an
    ``experiment.Workspace``); each finished cell is written to ``cells_dir`` (JSON last: its
    presence marks the cell done)."""
    from .distributed import local_only
    from .experiment import CellSpec, run_cells
    from .prompts.promptset import save_prompts

    for cells in groups:
        variant, task = cells[0][0], cells[0][1]
        if on_group is not None:
            on_group(variant.name, task, [s for _, _, s in cells])
        specs = [CellSpec(task=task, prompt=variant.prompt,
                          train=TrainConfig(**{**cfg.train, **variant.train}),
                          shots=cfg.shots_of(variant),
                          seed=seed, n_test=cfg.n_test, selection=cfg.selection)
                 for _, _, seed in cells]
        with local_only():  # ranks run different cells: no sharding, no gradient all-reduce
            if variant.prompt.mode in FIXED_MODES:  # nothing learned: one evaluation serves all
                first = run_cells(ws, specs[:1], per_image=True)[0]
                outs = [first] + [({**first[0], "spec": sp.as_dict(), "wall_s": 0.0}, first[1],
                                   []) for sp in specs[1:]]
            else:
                outs = run_cells(ws, specs, per_image=True)
        for (_, _, seed), spec, (result, prompts, log) in zip(cells, specs, outs):
            cid = cell_id(variant, task, seed)
            result["loss_log"] = log
            result["fusion_weights"] = {k: v.tolist() for k, v in prompts.fusion_weights().items()}
            if result["trained_params"]:
                test = ws.dataset(task, "test", n_test=cfg.n_test)  # its vocabulary
                save_prompts(cells_dir / f"{cid}.safetensors", prompts,
                             {"config": spec.as_dict(), "seed": seed, "sfm": result["sfm"],
                              "class_names": test.class_names, "is_thing": test.is_thing,
                              "metrics": {m: result[m] for m in METRICS}})
            result.update({"variant": variant.name, "group": variant.group, "task": task,
                           "seed": seed, "shots": spec.shots, "torch_threads": torch_threads()})
            # per-image test statistics (the bootstrap's input) first: the JSON marks it done
            write_bytes(cells_dir / f"{cid}.stats.npz", result.pop("per_image").to_bytes())
            write_json(cells_dir / f"{cid}.json", result)
            if on_cell is not None:
                on_cell()


def _worker(index: int, threads: int, groups: list[tuple[str, str]], args: dict, queue) -> None:
    """One ``--workers`` process: its own SFM, feature cache and ``threads`` torch threads."""
    import torch

    try:
        torch.set_num_threads(threads)
        from .sfm import load_sfm
        cfg = load_config(args["config"], args["sets"])
        by_key = {(g[0][0].name, g[0][1]): g for g in study_groups(cfg)}
        from .experiment import Workspace
        from .features import FeatureCache
        model = load_sfm(args["sfm"], args["checkpoint"], args["device"])
        done = finished_cells(Path(args["cells_dir"]), model.weights_hash())
        mine = [[c for c in by_key[k] if cell_id(*c) not in done] for k in groups]
        run_groups(Workspace(model, FeatureCache(args["cache_dir"])), cfg,
                   [g for g in mine if g], Path(args["cells_dir"]),
                   on_cell=lambda: queue.put(("cell", index, "")))
        queue.put(("done", index, ""))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which exits with it
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        queue.put(("error", index, (msg.strip().splitlines() or [""])[0]))


def _run_workers(groups: list[list[tuple[Variant, str, int]]], workers: int, threads: int,
                 bar, args: dict) -> None:
    """Share ``groups`` out over ``workers`` spawned processes (round robin in config order:
    a fixed assignment), with a progress bar fed by their finished cells."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    keys = [(g[0][0].name, g[0][1]) for g in groups]
    n = min(workers, len(keys))
    procs = [ctx.Process(target=_worker, args=(i, threads, keys[i::n], args, q), daemon=True)
             for i in range(n)]
    bar.set_postfix_str(f"{n} workers x {threads} thread(s)")
    for p in procs:
        p.start()
    finished: set[int] = set()
    try:
        while len(finished) < n:
            try:
                kind, i, msg = q.get(timeout=5)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in finished]
                if dead and q.empty():
                    raise UserError(f"study worker {dead[0]} exited with code "
                                    f"{procs[dead[0]].exitcode} (out of memory?); finished "
                                    "cells are kept, run the study again to resume") from None
                continue
            if kind == "cell":
                bar.update(1)
            elif kind == "done":
                finished.add(i)
            else:
                raise UserError(f"study worker {i}: {msg}; finished cells are kept, run the "
                                "study again to resume")
    finally:
        for p in procs:
            if p.is_alive() and len(finished) < n:
                p.terminate()
            p.join()


def finished_cells(cells_dir: Path, sfm_hash: str) -> set[str]:
    """Ids of the cells already run with these SFM weights: a cell from other weights (the
    SFM was re-pretrained, or --checkpoint changed) is run again, never mixed in."""
    done = set()
    for p in cells_dir.glob("*.json"):
        try:
            if json.loads(p.read_text()).get("sfm") == sfm_hash:
                done.add(p.stem)
        except (OSError, ValueError):  # a cell file cut short: run the cell again
            continue
    return done


# ------------------------------------------------------------------------------ aggregation
def load_cells(run: Path, cfg: StudyConfig) -> list[dict]:
    rows = []
    for variant, task, seed in cfg.cells():
        p = run / "cells" / f"{cell_id(variant, task, seed)}.json"
        if not p.exists():
            raise UserError(f"{p}: cell missing; rerun the study to finish it")
        rows.append(json.loads(p.read_text()))
    return rows


def study_intervals(run: Path, cfg: StudyConfig, rows: list[dict]) -> dict | None:
    """Paired bootstrap intervals (``ssprompt.bootstrap``) of every variant's Δ to the first
    (baseline) variant and of each configured comparison, per task and metric; and each row's
    own interval. None when a cell has no per-image statistics (a study from an older
    version)."""
    from . import bootstrap as bs

    t0 = time.time()
    draws = bs.seed_draws(len(cfg.seeds))
    by_key = {(r["variant"], r["task"], r["seed"]): r for r in rows}
    values: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    memo: dict[bytes, dict[str, np.ndarray]] = {}   # zero-shot's seeds share one evaluation
    for t in cfg.tasks:
        weights = None
        for v in cfg.variants:
            per_seed = []
            for seed in cfg.seeds:
                p = run / "cells" / f"{cell_id(v, t, seed)}.stats.npz"
                if not p.exists():
                    return None
                data = p.read_bytes()
                if data not in memo:
                    stats = bs.PerImage.from_bytes(data)
                    if weights is None or weights.shape[1] != len(stats):
                        weights = bs.image_weights(len(stats))
                    memo[data] = {m: f(stats, weights) for m, f in bs.METRIC_FNS.items()}
                    memo[data]["class_iou"] = bs.class_iou(stats, weights)
                per_seed.append(memo[data])
            values[(v.name, t)] = {m: np.stack([d[m] for d in per_seed])
                                   for m in (*METRICS, "class_iou")}

    def observed(name: str, t: str, m: str) -> float:
        return _mean_std([by_key[(name, t, s)].get(m) for s in cfg.seeds])[0]

    base = cfg.variants[0].name
    pairs = [(v.name, base) for v in cfg.variants[1:]] + list(cfg.comparisons)
    out: dict = {"n_boot": int(draws.shape[0]), "level": bs.LEVEL, "seed": bs.BOOT_SEED,
                 "pairs": [], "rows": {}}
    for a, b in dict.fromkeys(pairs):
        entry = {"a": a, "b": b, "tasks": {}}
        for t in cfg.tasks:
            entry["tasks"][t] = {}
            for m in METRICS:
                iv = bs.paired_interval(values[(a, t)][m], values[(b, t)][m],
                                        (observed(a, t, m), observed(b, t, m)), draws)
                entry["tasks"][t][m] = {"delta": iv.delta, "lo": iv.lo, "hi": iv.hi,
                                        "excludes_zero": iv.excludes_zero}
        out["pairs"].append(entry)
    out["things_vs_stuff"] = _things_vs_stuff(cfg, values, rows, draws)
    for v in cfg.variants:
        out["rows"][v.name] = {t: {m: [observed(v.name, t, m),
                                       *bs.row_interval(values[(v.name, t)][m], draws)]
                                   for m in METRICS} for t in cfg.tasks}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _things_vs_stuff(cfg: StudyConfig, values: dict, rows: list[dict], draws) -> dict:
    """Per task: does full SSPrompt gain more IoU over stuff classes than over thing classes?
    The mean per-class IoU gain over zero-shot over thing classes and over stuff classes, each
    with its bootstrap interval, and the interval of stuff minus things (classes absent from a
    resample's ground truth are left out of its means)."""
    import warnings

    from . import bootstrap as bs
    from .plots import full_ssprompt_variant

    target, base = full_ssprompt_variant(cfg), cfg.variants[0].name
    if target is None:
        return {}
    out = {}
    for t in cfg.tasks:
        mine = [r for r in rows if r["task"] == t]
        flags = np.array([pc["isthing"] for pc in mine[0]["per_class"].values()])
        if flags.all() or not flags.any():
            continue

        def observed(sel: np.ndarray) -> float:   # on the test set as it is, mean over seeds
            gains = []
            for seed in cfg.seeds:
                a, b = ([r for r in mine if r["variant"] == v and r["seed"] == seed][0]
                        ["per_class"] for v in (target, base))
                g = [a[n]["IoU"] - b[n]["IoU"] for n, f in zip(a, sel)
                     if f and a[n]["IoU"] is not None and b[n]["IoU"] is not None]
                gains.append(np.mean(g) if g else np.nan)
            return float(np.nanmean(gains))

        gain = values[(target, t)]["class_iou"] - values[(base, t)]["class_iou"]  # (S, B, C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # a resample without a class
            things = np.nanmean(gain[..., flags], -1)
            stuff = np.nanmean(gain[..., ~flags], -1)
        th, st = observed(flags), observed(~flags)
        iv = bs.paired_interval(stuff, things, (st, th), draws)
        out[t] = {"things": [th, *bs.row_interval(things, draws)],
                  "stuff": [st, *bs.row_interval(stuff, draws)],
                  "stuff_minus_things": {"delta": iv.delta, "lo": iv.lo, "hi": iv.hi,
                                         "excludes_zero": iv.excludes_zero}}
    return out


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
                mark = " *" if d["excludes_zero"] else ""
                cells.append(f"{d['delta']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]{mark}")
        lines.append(f"| {e['a']} − {e['b']} | " + " | ".join(cells) + " |")
    return lines


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
        if v.prompt.mode != "weighted" or "semantic" not in v.prompt.learners:
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


def _raw(r: dict, m: str):
    """The metric the cell's prompts had at their last training step, before selection (the
    same as the selected one where selection kept the last step or was off)."""
    return (r.get("raw") or r).get(m) if r.get("selection") else r.get(m)


def _flat(r: dict) -> dict:
    sel = r.get("selection") or {}
    moved = r.get("z_moved") or {}
    return {**r, "selected": sel.get("selected", ""),
            **{f"raw_{m}": _raw(r, m) for m in METRICS},
            **{f"z_moved_{k}": moved.get(k) for k in ("spatial", "semantic")}}


def aggregate(run: Path, cfg: StudyConfig, wall_s: float | None = None, test_split=None,
              sfm=None, peak_rss_mb: float | None = None) -> dict:
    """results.csv / results.json / summary.md and the plots of a finished study; with
    ``sfm`` and ``test_split(task)``, also the qualitative figures (they decode images)."""
    rows = load_cells(run, cfg)
    cols = ["variant", "group", "task", "seed", *METRICS, "SQ", "RQ", "PQ_th", "PQ_st",
            "trained_params", "wall_s", "final_loss", "selected", *(f"raw_{m}" for m in METRICS),
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
            summary[v.name][t]["raw"] = {m: _mean_std([_raw(r, m) for r in sel])
                                         for m in METRICS}
            summary[v.name][t]["selected"] = [(r.get("selection") or {}).get("selected")
                                              for r in sel]
            summary[v.name][t]["trained_params"] = sel[0]["trained_params"]
            summary[v.name][t]["wall_s"] = float(np.mean([r["wall_s"] for r in sel]))
    total_wall = sum(r["wall_s"] for r in rows)
    import resource
    if peak_rss_mb is None:
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process
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
              f"{cfg.variants[0].name} (same task and seed) on mIoU, AP50 or PQ; listed in "
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
    """Cells whose kept prompts score more than ``by`` points below the baseline row (the first
    variant, same task and seed) on any of mIoU / AP50 / PQ: the losses a row's mean and
    interval can hide when the other seeds kept the defaults."""
    base_name = cfg.variants[0].name
    base = {(r["task"], r["seed"]): r for r in rows if r["variant"] == base_name}
    out = []
    for r in rows:
        b = base.get((r["task"], r["seed"]))
        if b is None or r["variant"] == base_name:
            continue
        drops = {m: [r[m], b[m]] for m in METRICS
                 if r.get(m) is not None and b.get(m) is not None and b[m] - r[m] > by}
        if drops:
            out.append({"variant": r["variant"], "task": r["task"], "seed": r["seed"],
                        "selected": (r.get("selection") or {}).get("selected"),
                        "metrics": drops})
    return out


def _n_cells(n: int) -> str:
    return f"{n} cell{'s' * (n != 1)}"


def _worse_table(cfg: StudyConfig, worse: list[dict]) -> list[str]:
    base = cfg.variants[0].name
    head = ["", f"## Cells more than {LARGE_LOSS:g} points below `{base}`", ""]
    if not worse:
        return head + [f"None: no cell's kept prompts score more than {LARGE_LOSS:g} points "
                       f"below `{base}` (same task and seed) on mIoU, AP50 or PQ."]
    return head + [
        f"{_n_cells(len(worse))}: what a user with this seed's shots would have got instead of "
        "doing nothing. `kept` is the step selection kept (`default`: the defaults).", "",
        f"| variant | task | seed | kept | this cell vs `{base}` |", "|---|---|---:|---|---|",
        *(f"| {w['variant']} | {w['task']} | {w['seed']} | {w['selected']} | "
          + ", ".join(f"{m} {a:.1f} vs {b:.1f} ({a - b:+.1f})"
                      for m, (a, b) in w["metrics"].items()) + " |" for w in worse)]


def _table(cfg: StudyConfig, stats) -> list[str]:
    """A markdown table, one row a variant; ``stats(variant, task)`` -> {metric: (mean, std)}."""
    zs = cfg.variants[0].name
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
                if v.name != zs:
                    s += f" ({mean - stats(zs, t)[m][0]:+.1f})"
                cells.append(s)
        lines.append(f"| {v.name} | {stats.params(v.name)} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(cfg: StudyConfig, summary: dict, wall_s: float | None,
                     rows: list[dict] | None = None, intervals: dict | None = None,
                     worse: list[dict] | None = None) -> str:
    zs = cfg.variants[0].name
    sel = cfg.selection
    rule = (f"Every trained variant uses held-out-shot selection: {sel.holdout:.0%} of the "
            f"{cfg.shots} shots are held out, candidates are scored there every {sel.every} "
            "steps, and a variant keeps its default prompts unless a step beats them."
            if sel.enabled else "No held-out selection: the last training step is kept.")
    lines = [f"# Study `{cfg.name}`", "",
             f"{len(cfg.variants)} variants x {len(cfg.tasks)} tasks x {len(cfg.seeds)} seeds "
             f"(seeds {cfg.seeds}), {cfg.shots}-shot, test images per task: "
             f"{cfg.n_test or 'all'}. Mean ± std over seeds, in percent; **bold** = best in "
             f"the column; (Δ) = difference to `{zs}`."
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
        n_base = len(cfg.variants) - 1
        lines += ["", "## Differences with 95% intervals", "",
                  f"Δ = mean over seeds of (row − baseline), in points; [95% interval] from a "
                  f"paired bootstrap ({intervals['n_boot']} resamples, seeded): the test images "
                  "and the seeds are both resampled with replacement, the same draw for both "
                  "rows (`ssprompt/bootstrap.py`). * = the interval excludes 0; without it, "
                  "the difference is not detectable with these test images and seeds. "
                  f"Bootstrap time: {intervals['seconds']:.0f} s.", ""]
        lines += _interval_table(cfg, intervals, intervals["pairs"][:n_base])
        if intervals["pairs"][n_base:]:
            lines += ["", "### Comparisons (controls)", ""]
            lines += _interval_table(cfg, intervals, intervals["pairs"][n_base:])
    if intervals is not None and intervals.get("things_vs_stuff"):
        from .plots import full_ssprompt_variant

        lines += ["", f"## Things vs stuff: `{full_ssprompt_variant(cfg)}`'s IoU gain over "
                  f"`{zs}`", "",
                  "Mean per-class IoU gain over the thing classes and over the stuff classes "
                  "(mean over seeds), with 95% bootstrap intervals, and stuff minus things.", "",
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
        lines += ["", "## The same runs without selection", "",
                  "Test metrics of the prompts at the last training step (fitted on the same "
                  "shots minus the held-out ones), i.e. what prompt learning gives when nothing "
                  "checks it.", ""]
        lines += _table(cfg, Stats("raw"))
    lines += _per_class_tables(cfg, rows) if rows else []
    return "\n".join(lines) + "\n"


def _per_class_tables(cfg: StudyConfig, rows: list[dict]) -> list[str]:
    """Per task: each class's IoU and PQ for zero-shot and full SSPrompt (mean over seeds) and
    the difference, largest gain first; then the mean difference over things and over stuff."""
    from .plots import full_ssprompt_variant

    zs, target = cfg.variants[0].name, full_ssprompt_variant(cfg)
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
