"""The whole path as functions: open a dataset, learn prompts few-shot, evaluate, predict.

    from ssprompt import Predictor, evaluate, learn_prompts, load_sfm, open_dataset

    sfm = load_sfm()                                        # the packaged embedded SFM
    run = learn_prompts(sfm, "shift", shots=4, steps=20)    # few-shot, held-out selection
    run.metrics["mIoU"], run.save("runs/shift")             # ``ssprompt train``'s run folder
    evaluate(sfm, run, open_dataset("shift", "test"))       # {"mIoU", "AP50", "PQ", ...}
    Predictor(sfm, run).predict(image)

``ssprompt train`` / ``ssprompt eval`` are thin parsers over ``learn_prompts`` (``LearnConfig``:
one field a ``train`` flag) and ``evaluate``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .data import open_dataset
from .errors import UserError
from .methods import DEFAULT_METHOD, get_method, with_method_keywords
from .prompts.promptset import LearnedPrompts

__all__ = ["LearnConfig", "TrainedPrompts", "check_data", "evaluate", "learn_prompts",
           "open_dataset", "workspace"]



@dataclass
class LearnConfig:
    """How ``learn_prompts`` trains: one field per ``ssprompt train`` flag (``--n-prompts`` ->
    ``n_prompts``; ``--no-select`` -> ``select=False``; ``--set KEY=VALUE`` -> ``train``).
    The data (``--task`` / ``--data``) and the SFM (``--sfm``, ``--checkpoint``, ``--device``)
    are ``learn_prompts``' own arguments."""

    # the method (``ssprompt.methods``); its options (``learners``, ``n_prompts``,
    # ``weight_init``, ...) are fields added below from the methods' options dataclasses, each
    # None by default: the method's own default (``with_method_keywords``)
    kind: str = DEFAULT_METHOD
    # the shots and the training (``TrainConfig``; None: its default)
    shots: int = 16
    seed: int = 0
    steps: int | None = None
    lr: float | None = None
    batch: int | None = None
    spatial_lr_mult: float | None = None
    train: dict = field(default_factory=dict)   # any TrainConfig field; wins over the four above
    # held-out selection (``SelectionConfig``)
    select: bool = True
    holdout: float = 0.25
    select_every: int = 10
    # the data and the evaluation
    n_test: int | None = None
    train_split: str | None = None  # a COCO folder's split names for the roles train / test
    test_split: str | None = None
    eval_batch: int = 50
    cache_dir: str | None = None    # keep frozen image features on disk here

    def cell_spec(self, task: str):
        """The ``engine.cell.CellSpec`` this config trains ``task`` with."""
        from .engine.cell import CellSpec
        from .engine.selection import SelectionConfig
        from .engine.train import TrainConfig
        from .engine.train import check_train_values
        from .methods import make_options, method_keywords

        given = {k: v for k, v in (("steps", self.steps), ("lr", self.lr), ("batch", self.batch),
                                   ("spatial_lr_mult", self.spatial_lr_mult)) if v is not None}
        return CellSpec(
            task=task,
            prompt=make_options(self.kind, {k: getattr(self, k) for k in method_keywords()}),
            train=TrainConfig(seed=self.seed, **{**given,
                                                 **check_train_values("train", dict(self.train))}),
            shots=self.shots, seed=self.seed, n_test=self.n_test,
            selection=SelectionConfig(enabled=self.select, holdout=self.holdout,
                                      every=self.select_every))


LearnConfig = with_method_keywords(LearnConfig)


def _config(config: LearnConfig | None, overrides: dict) -> LearnConfig:
    config = config if config is not None else LearnConfig()
    names = {f.name for f in fields(LearnConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise UserError(f"learn_prompts: unknown setting {', '.join(bad)} (LearnConfig has "
                        f"{', '.join(sorted(names))})")
    return replace(config, **overrides) if overrides else config


def workspace(sfm, eval_batch: int = 50, cache_dir: str | None = None,
              train_split: str | None = None, test_split: str | None = None):
    """An ``engine.cell.Workspace``: datasets and image features shared across calls.
    ``sfm`` may be None while its datasets are opened and checked (the CLI loads the SFM
    after the data passed its checks, then sets ``ws.sfm``)."""
    from .engine.cell import Workspace
    from .sfm.features import FeatureCache

    if not isinstance(eval_batch, int) or eval_batch <= 0:
        raise UserError(f"eval_batch {eval_batch}: must be a positive integer")
    splits = {role: name for role, name in (("train", train_split), ("test", test_split))
              if name}
    return Workspace(sfm, FeatureCache(cache_dir), eval_batch=eval_batch, split_names=splits)


def _task_of(data) -> str:
    """A task spec from a name / ``coco:PATH`` or an ``open_dataset`` result."""
    if isinstance(data, str):
        return data
    if hasattr(data, "root") and hasattr(data, "split"):       # a COCO folder
        return f"coco:{data.root}"
    if hasattr(data, "task"):                                  # an embedded scene task
        return data.task
    raise UserError(f"{type(data).__name__}: not a task name, coco:PATH or open_dataset result")


def _check(data, labelled: bool):
    if hasattr(data, "check"):      # a COCO split; scene tasks are made, not read
        data.check(labelled)
    return data


def check_data(ws, data, config: LearnConfig | None = None) -> None:
    """Every check ``learn_prompts`` needs before its first step, on every split it reads:
    the test split (its first ``n_test`` images) and, for a kind that learns, the k shots of
    the train split: each image decodes whole, its size agrees with the annotations, the
    split has annotations, category names are unique, k fits the split. One ``UserError``
    naming the file; nothing is written."""
    cfg = config if config is not None else LearnConfig()
    task = _task_of(data)
    _check(ws.dataset(task, "test", n_test=cfg.n_test), labelled=True)
    if get_method(cfg.kind).uses_shots:
        _check(ws.dataset(task, "train", shots=cfg.shots, seed=cfg.seed), labelled=True)


@dataclass
class TrainedPrompts:
    """What ``learn_prompts`` learned, usable wherever a ``load_prompts`` result is
    (``Predictor``, ``evaluate``): ``spatial``, ``semantic``, ``meta``, ``class_names``,
    ``is_thing``. ``metrics``: the test-split result (mIoU, AP50, PQ, per class, held-out
    ``selection``, ...); ``log``: the loss log; ``prompt_set``: the trained ``PromptSet``."""

    prompt_set: object
    metrics: dict
    log: list[dict]
    meta: dict

    @property
    def spatial(self):
        return self.prompt_set()[0].detach()

    @property
    def semantic(self):
        s = self.prompt_set()[1]
        return None if s is None else s.detach()

    # the vocabulary, read from ``meta`` as a ``load_prompts`` result reads it
    class_names = LearnedPrompts.class_names
    is_thing = LearnedPrompts.is_thing

    def save(self, out: str | Path) -> Path:
        """``ssprompt train``'s run folder: prompts.safetensors (for ``load_prompts`` /
        ``--prompts``), metrics.json, config.json, loss.csv and curves.png."""
        from .io import write_json, write_text
        from .prompts.promptset import save_prompts
        from .engine.curves import plot_train_curves

        out = Path(out)
        save_prompts(out / "prompts.safetensors", self.prompt_set, self.meta)
        if self.log:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(self.log[0]))
            w.writeheader()
            w.writerows(self.log)
            write_text(out / "loss.csv", buf.getvalue())
        write_json(out / "config.json", self.meta)
        write_json(out / "metrics.json", self.metrics)
        plot_train_curves(out / "curves.png", self.log, self.metrics["selection"])
        return out


class _LiveLog:
    """The loss log, one JSON row a line, flushed as training goes (for ``tail -f`` or a
    plotting tool); the file is created with the first row."""

    def __init__(self, path: Path):
        self.path, self.f = path, None

    def __call__(self, row: dict) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "w")
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def learn_prompts(sfm, data="shift", config: LearnConfig | None = None, *,
                  out: str | Path | None = None, progress: bool = False,
                  on_log: Callable[[dict], None] | None = None, ws=None,
                  **settings) -> TrainedPrompts | None:
    """Learn prompts for the frozen ``sfm`` from ``config.shots`` labelled images of ``data``
    (a task name: ``shift``, ``novel``, ``stuff``, ``source``; ``coco:PATH``; or an
    ``open_dataset`` result), keep the step the held-out shots pick, and score them on the test
    split (its first ``n_test`` images). ``settings`` override ``config``'s fields
    (``learn_prompts(sfm, "novel", shots=4, steps=20)``).

    ``out``: also write the run folder (``TrainedPrompts.save``), with loss.jsonl streamed
    while training (a failed run leaves none). ``ws``: a ``workspace`` to share datasets and
    features across calls. Under torchrun every rank trains; only rank 0 gets the result (the
    others None)."""
    from .distributed import rank_world
    from .engine.cell import run_cell

    cfg = _config(config, settings)
    task = _task_of(data)
    if ws is None:
        ws = workspace(sfm, cfg.eval_batch, cfg.cache_dir, cfg.train_split, cfg.test_split)
    spec = cfg.cell_spec(task)
    check_data(ws, task, cfg)      # a damaged test image is found before the first step
    main = rank_world()[0] == 0
    live = _LiveLog(Path(out) / "loss.jsonl") if out is not None and main else None
    def both(row, _user=on_log):
        live(row)
        if _user is not None:
            _user(row)

    hook = both if live is not None else on_log
    try:
        result, prompts, log = run_cell(ws, spec, progress=progress and main, on_log=hook)
    except BaseException:
        if live is not None:
            live.discard()   # a failed run leaves no log behind
        raise
    finally:
        if live is not None:
            live.close()
    if not main:
        return None
    test = ws.dataset(spec.task, "test", n_test=spec.n_test)
    meta = {"config": spec.as_dict(), "seed": cfg.seed, "weights_hash": ws.sfm.weights_hash(),
            "class_names": test.class_names, "is_thing": test.is_thing,
            "metrics": {k: result[k] for k in ("mIoU", "AP50", "PQ")}}
    trained = TrainedPrompts(prompts, result, log, meta)
    if out is not None:
        trained.save(out)
    return trained


def evaluate(sfm, prompts=None, dataset="shift", *, n_test: int | None = None,
             n_prompts: int | None = None, ws=None, eval_batch: int = 50,
             cache_dir: str | None = None, test_split: str | None = None,
             where: str | Path | None = None) -> dict:
    """Metrics (percent: mIoU, AP50, PQ, per class, ...) of the frozen ``sfm`` prompted with
    ``prompts`` (a ``learn_prompts`` result, a ``load_prompts`` result or a prompts file's path;
    None: zero-shot, the default ``n_prompts``-point grid and the bare class names) on
    ``dataset``'s test split (a task name, ``coco:PATH`` or an ``open_dataset`` result, which
    is scored as it is). Prompts learned for other SFM weights or another class list are
    refused. Under torchrun each rank scores its shard; every rank gets the synced metrics.
    ``where``: the prompts' file, named in errors when ``prompts`` is already loaded."""
    from .distributed import shard
    from .evaluation.evaluate import evaluate as _evaluate
    from .prompts.promptset import check_prompts, default_prompts, load_prompts
    from .sfm.base import sfm_device

    if ws is None:
        ws = workspace(sfm, eval_batch, cache_dir, test_split=test_split)
    test = ws.dataset(dataset, "test", n_test=n_test) if isinstance(dataset, str) else dataset
    _check(test, labelled=True)
    if prompts is None:
        spatial, semantic = default_prompts(sfm, test.class_names, n_prompts)
    else:
        where = prompts if isinstance(prompts, (str, Path)) else (where or "prompts")
        if isinstance(prompts, (str, Path)):
            from .io import expect_file

            prompts = load_prompts(expect_file(prompts, "a prompts file (prompts.safetensors)",
                                               "prompts"))
        check_prompts(prompts, sfm, test.class_names, where)
        spatial, semantic = prompts.spatial, prompts.semantic
    dev = sfm_device(sfm)
    return _evaluate(sfm, spatial.to(dev), None if semantic is None else semantic.to(dev), test,
                     ws.cache, batch=ws.eval_batch, indices=shard(len(test)))
