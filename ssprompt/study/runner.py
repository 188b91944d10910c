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

import json
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from ..engine.train import TrainConfig
from ..errors import UserError
from ..evaluation.metrics import METRICS
from ..io import write_bytes, write_json, write_text
from ..sfm.base import weights_hash_of
from .aggregate import aggregate
from .config import CONFIG_DIR, StudyConfig, Variant, cell_id, load_config


def run_study(config: str | None, out: str | None, quick: bool = False, force: bool = False,
              sfm: str = "embedded", checkpoint: str | None = None, device: str = "auto",
              cache_dir: str | None = None, sets: dict | None = None, workers: int = 1,
              threads: int | None = None) -> Path:
    """Run (or finish) a study; ``workers`` processes share its (variant, task) groups, each
    with ``threads`` torch threads (default: this process's threads / workers, at least 1)."""
    from ..distributed import barrier, init_from_env, rank_world
    from ..sfm import load_sfm

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
        if stored.exists() and _cell_config(stored) != cfg.cell_config():
            if not force:
                raise UserError(f"{run}: holds a study with a different config; use a new --out, "
                                "or --force to discard its finished cells")
            for p in cells_dir.glob("*"):
                p.unlink()
        cells_dir.mkdir(parents=True, exist_ok=True)
        write_text(stored, resolved)
    barrier()

    from ..engine.cell import Workspace
    from ..sfm.features import FeatureCache

    model = load_sfm(sfm, checkpoint, device)
    ws = Workspace(model, FeatureCache(cache_dir), test_from=cfg.test_from)
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


def _cell_config(stored: Path) -> dict | None:
    """The stored config's ``StudyConfig.cell_config``; None if unreadable or no longer
    valid."""
    try:
        return load_config(stored).cell_config()
    except (OSError, UserError, yaml.YAMLError):
        return None


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
    from ..distributed import local_only
    from ..engine.cell import CellSpec, run_cells
    from ..prompts.promptset import save_prompts

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
            if variant.fixed:  # nothing learned: one evaluation serves all
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
                             {"config": spec.as_dict(), "seed": seed,
                              "weights_hash": result["weights_hash"],
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
        from ..sfm import load_sfm
        cfg = load_config(args["config"], args["sets"])
        by_key = {(g[0][0].name, g[0][1]): g for g in study_groups(cfg)}
        from ..engine.cell import Workspace
        from ..sfm.features import FeatureCache
        model = load_sfm(args["sfm"], args["checkpoint"], args["device"])
        done = finished_cells(Path(args["cells_dir"]), model.weights_hash())
        mine = [[c for c in by_key[k] if cell_id(*c) not in done] for k in groups]
        run_groups(Workspace(model, FeatureCache(args["cache_dir"]), test_from=cfg.test_from), cfg,
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
            if weights_hash_of(json.loads(p.read_text())) == sfm_hash:
                done.add(p.stem)
        except (OSError, ValueError):  # a cell file cut short: run the cell again
            continue
    return done


# ------------------------------------------------------------------------------ aggregation
