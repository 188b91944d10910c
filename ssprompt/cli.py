"""The ``ssprompt`` command line: pretrain, eval, predict, train, study (benchmarks: ``python -m bench`` in the repository).

Every command writes its results as files next to the run; bad input ends in one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


def _table(rows: list[tuple[str, dict]]) -> str:
    out = [f"{'':24s} {'mIoU':>7s} {'AP50':>7s} {'PQ':>7s}"]
    for name, m in rows:
        cells = [f"{m[k]:7.2f}" if isinstance(m.get(k), (int, float)) else f"{'n/a':>7s}"
                 for k in ("mIoU", "AP50", "PQ")]
        out.append(f"{name:24s} " + " ".join(cells))
    return "\n".join(out)


class _Help(argparse.HelpFormatter):
    """Every flag's help names its default: "(default: X)" is added where the text does not
    say it already."""

    def _get_help_string(self, action):
        text, d = action.help or "", action.default
        unset = d is None or d is False or d is argparse.SUPPRESS or d == []
        if "default" not in text and not action.required and action.option_strings \
                and not unset:
            text += " (default: %(default)s)"
        return text


def backends_help() -> str:
    """``ssprompt.sfm.backends_help()`` without importing torch (``--help`` answers in well
    under a second): read from the registry's source unless ``ssprompt.sfm`` is already
    imported (then backends registered with ``register_backend`` are listed too)."""
    if "ssprompt.sfm" in sys.modules:
        return sys.modules["ssprompt.sfm"].backends_help()
    import ast

    found = []
    try:
        tree = ast.parse((Path(__file__).parent / "sfm" / "__init__.py").read_text())
        for node in tree.body:
            target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
            if getattr(target, "id", None) == "REGISTRY" and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    found.append(f"{ast.literal_eval(k)}: {ast.literal_eval(v.args[1])}")
    except (OSError, SyntaxError, ValueError, AttributeError, IndexError):
        found = []
    if not found:
        from .sfm import backends_help as from_registry

        return from_registry()
    return "; ".join(found)


def _add_sfm_args(s: argparse.ArgumentParser, precision: bool = True) -> None:
    s.add_argument("--sfm", default="embedded", help="backend (default: embedded). "
                   + backends_help())
    s.add_argument("--checkpoint", default=None,
                   help="embedded: weights .safetensors (default: the committed weights); "
                        "sam, sam2, sam3: a local transformers save_pretrained directory")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    if precision:
        s.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                       help="decoding precision (default fp32 on every device; bf16: autocast)")
    s.add_argument("--cache-dir", default=None,
                   help="keep frozen image features on disk here (keyed by SFM weights + "
                        "image; default: in memory only)")
    s.add_argument("--eval-batch", type=int, default=50,
                   help="images per decoder pass in evaluation (lower it to save memory)")


def _add_split_args(s: argparse.ArgumentParser, train: bool = True) -> None:
    if train:   # only where shots are drawn (train): a flag that does nothing is not offered
        s.add_argument("--train-split", default=None,
                       help="with --data coco:PATH: the split the shots come from "
                            "(default train)")
    s.add_argument("--test-split", default=None,
                   help="with --data coco:PATH: the split scored (default test; e.g. val2017)")


def _check_paths(a: argparse.Namespace) -> None:
    """Paths checked for what they must be (a file, a folder), before any data or model is
    read: a folder where a file is expected, and the reverse, get their own message."""
    from .io import expect_file, expect_folder

    data = getattr(a, "data", None)
    if data is not None:
        if not data.startswith("coco:"):
            raise UserError(f"{data}: not a dataset spec; give coco:PATH for a COCO folder "
                            f"(did you mean coco:{data}?)", field="data")
        if data[5:]:
            expect_folder(data[5:], "a COCO dataset folder (annotations/, SPLIT/)", "data")
    if getattr(a, "prompts", None):
        expect_file(a.prompts, "a prompts file (prompts.safetensors)", "prompts")
    if getattr(a, "predictions", None):
        expect_folder(a.predictions, "the folder `ssprompt predict` wrote", "predictions")
    if getattr(a, "images", None):
        expect_folder(a.images, "a folder of images", "images")
    out = getattr(a, "out", None)
    if out and Path(out).is_file():
        raise UserError(f"{out}: is a file, expected a folder for the results", field="out")
    ckpt = getattr(a, "checkpoint", None)
    if ckpt and Path(ckpt).exists():
        if a.sfm == "embedded" and Path(ckpt).is_dir():
            expect_file(ckpt, "a weights file (.safetensors)", "checkpoint")
        elif a.sfm != "embedded" and Path(ckpt).is_file():
            raise UserError(f"{ckpt}: is a file, expected a transformers save_pretrained "
                            f"folder for --sfm {a.sfm}", field="checkpoint")


def _workspace(a: argparse.Namespace):
    """The run's workspace without its SFM (``ws.sfm`` is None until ``_load_sfm``): its
    datasets are opened and checked first, so bad data is reported before any model loads."""
    from .api import workspace

    _check_paths(a)
    if a.eval_batch <= 0:
        raise UserError(f"--eval-batch {a.eval_batch}: must be a positive integer")
    return workspace(None, a.eval_batch, a.cache_dir, getattr(a, "train_split", None),
                     getattr(a, "test_split", None))


def _load_sfm(ws, a: argparse.Namespace):
    from .distributed import init_from_env
    from .sfm import load_sfm

    init_from_env()
    ws.sfm = load_sfm(a.sfm, a.checkpoint, a.device, getattr(a, "precision", "fp32"))
    return ws.sfm


def _checked(data, labelled: bool):
    """``data`` after its pre-run checks (``CocoDataset.check``; scene tasks need none)."""
    if hasattr(data, "check"):
        data.check(labelled)
    return data


def _cmd_pretrain(a: argparse.Namespace) -> None:
    from .pretraining.pretrain import DEFAULT_OUT, pretrain

    info = pretrain(Path(a.out) if a.out else DEFAULT_OUT, minutes=a.minutes, steps=a.steps,
                    batch=a.batch, lr=a.lr, seed=a.seed,
                    init_from=Path(a.init_from) if a.init_from else None, warmup=a.warmup,
                    device=a.device, precision=a.precision, workers=a.workers)
    print(info)


def _cmd_eval(a: argparse.Namespace) -> None:
    from .api import evaluate
    from .distributed import rank_world
    from .io import write_json
    from .prompts.promptset import load_prompts

    ws = _workspace(a)
    test = _checked(ws.dataset(a.data or a.task, "test", n_test=a.n_test), labelled=True)
    if a.predictions:  # score saved prediction files (`ssprompt predict`), no SFM at all
        from .predict import score_predictions
        from .sfm.base import weights_hash_of

        metrics, manifest = score_predictions(a.predictions, test)
        sfm_hash, name = weights_hash_of(manifest), Path(a.predictions).name or "predictions"
        meta = {"predictions": a.predictions, "prompts": manifest.get("prompts")}
    else:
        learned = load_prompts(a.prompts) if a.prompts else None   # bad files: before the SFM
        sfm_hash = _load_sfm(ws, a).weights_hash()
        if a.prompts:
            meta, name = learned.meta, Path(a.prompts).parent.name or "prompts"
        else:
            from .sfm.base import default_n_prompts
            meta = {"n_prompts": a.n_prompts or default_n_prompts(ws.sfm)}
            name = "zero-shot"
        # under torchrun each rank scores its shard; the metrics sync their states across ranks
        metrics = evaluate(ws.sfm, learned, test, n_prompts=a.n_prompts, ws=ws,
                           where=a.prompts)
    if rank_world()[0] != 0:
        return
    print(f"task {a.data or a.task}, {len(test)} test images, SFM {sfm_hash}")
    print(_table([(name, metrics)]))
    out = {**metrics, "task": a.data or a.task, "n_test": len(test),
           "weights_hash": sfm_hash, "prompts": a.prompts, "prompt_meta": meta}
    if a.out:
        write_json(Path(a.out) / "metrics.json", out)
        print(f"wrote {Path(a.out) / 'metrics.json'}")


def _cmd_predict(a: argparse.Namespace) -> None:
    from .predict import dataset_items, folder_items, write_predictions
    from .predictor import Predictor
    from .prompts.promptset import load_prompts

    if not (a.images or a.data or a.task):
        raise UserError("predict: give --images DIR, --task NAME or --data coco:PATH")
    if a.images and a.n_test is not None:
        raise UserError("--n-test: only with --task / --data (not --images)")
    ws = _workspace(a)
    learned = load_prompts(a.prompts) if a.prompts else None  # bad files fail before any work
    items = folder_items(a.images) if a.images else None
    names = is_thing = None
    if a.images:
        cat_ids = []
        if learned is None or (learned.semantic is not None and learned.class_names is None):
            if not (a.data or a.task):
                raise UserError("--images: give --prompts (they name their classes) or "
                                "--task / --data for the classes to predict")
        if a.data or a.task:
            vocab = ws.dataset(a.data or a.task, "test", n_test=1)
            names, is_thing = vocab.class_names, vocab.is_thing
    else:
        data = _checked(ws.dataset(a.data or a.task, "test", n_test=a.n_test), labelled=False)
        items, cat_ids = dataset_items(data)
        names, is_thing = data.class_names, data.is_thing
    _load_sfm(ws, a)
    predictor = Predictor(ws.sfm, learned, class_names=names, is_thing=is_thing,
                          n_prompts=a.n_prompts, cache=ws.cache, batch=ws.eval_batch)
    if not cat_ids:
        cat_ids = list(range(1, len(predictor.class_names) + 1))
    about = {"weights_hash": ws.sfm.weights_hash(), "prompts": a.prompts,
             "data": a.images or a.data or a.task,
             "split": None if a.images else (a.test_split or "test"), "n_test": a.n_test}
    out = Path(a.out)
    write_predictions(out, predictor, items, cat_ids, about)
    print(f"predicted {len(items)} images ({', '.join(predictor.class_names[:6])}"
          f"{', ...' if len(predictor.class_names) > 6 else ''}); wrote {out}/: "
          "instances_results.json, panoptic.json + panoptic/, semantic/, overlays/")


def learn_config(a: argparse.Namespace):
    """``ssprompt train``'s flags as a ``LearnConfig`` (one field a flag)."""
    from .api import LearnConfig
    from .engine.train import check_train_values
    from .study.config import parse_sets

    for old, new in (("mode", "--kind"), ("weight", "--weight-shape")):
        if getattr(a, old, None) is not None:
            raise UserError(f"--{old} is now {new}"
                            + (" ('default' is now 'zero_shot')" if old == "mode" else ""))
    from .methods import method_keywords

    return LearnConfig(kind=a.kind, **{k: getattr(a, k) for k in method_keywords()},
                       shots=a.shots, seed=a.seed, steps=a.steps, lr=a.lr, batch=a.batch,
                       spatial_lr_mult=a.spatial_lr_mult,
                       train=check_train_values("--set", parse_sets(a.set)),
                       select=not a.no_select, holdout=a.holdout, select_every=a.select_every,
                       n_test=a.n_test, train_split=a.train_split,
                       test_split=a.test_split, eval_batch=a.eval_batch, cache_dir=a.cache_dir)


def _cmd_train(a: argparse.Namespace) -> None:
    from .api import learn_prompts

    from .api import check_data

    cfg = learn_config(a)
    ws = _workspace(a)
    check_data(ws, a.data or a.task, cfg)      # every split it reads, before the SFM loads
    _load_sfm(ws, a)
    out = Path(a.out)
    run = learn_prompts(ws.sfm, a.data or a.task, cfg, out=out, progress=True, ws=ws)
    if run is None:      # torchrun: not rank 0
        return
    result = run.metrics
    print(_table([(a.kind, result)]))
    sel = result["selection"]
    if sel is not None:
        selected = sel["selected"]
        print("held-out selection: " + ("no step beat the default prompts on the held-out "
                                        "shots; selected the default prompts (zero-shot)"
                                        if selected == "default" else f"selected step {selected}")
              + f" (see {out}/curves.png)")
    print(f"trained {result['trained_params']} prompt parameters in {result['wall_s']} s; "
          f"wrote {out}/prompts.safetensors, metrics.json")


def _cmd_study(a: argparse.Namespace) -> None:
    from .study import parse_sets, run_study

    run_study(a.config, a.out, quick=a.quick, force=a.force, sfm=a.sfm,
              checkpoint=a.checkpoint, device=a.device, cache_dir=a.cache_dir,
              sets=parse_sets(a.set), workers=a.workers, threads=a.threads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssprompt", description="Spatial-semantic prompt learning "
                                "for frozen segmentation foundation models.",
                                epilog=f"SFM backends (--sfm): {backends_help()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("pretrain", help="pretrain the embedded SFM on the source corpus")
    s.add_argument("--out", default=None,
                   help="folder for the weights, log and plot (default: runs/pretrain; the "
                        "packaged ssprompt/weights/ only when named here)")
    s.add_argument("--minutes", type=float, default=58.0, help="wall-clock budget")
    s.add_argument("--steps", type=int, default=100_000, help="step cap")
    s.add_argument("--batch", type=int, default=16, help="scenes per step")
    s.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--init-from", default=None,
                   help="continue from these weights (default: none, a fresh start)")
    s.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="bf16 autocast (default; ~1.5x faster on a CPU with native bf16) or fp32")
    s.add_argument("--workers", type=int, default=None,
                   help="background processes composing scenes (default 0 on CPU, 2 on CUDA)")
    s.set_defaults(fn=_cmd_pretrain)

    s = sub.add_parser("eval", help="evaluate the frozen SFM (zero-shot or with a prompts file)")
    s.add_argument("--task", default="shift", help="source | shift | novel | stuff")
    s.add_argument("--data", default=None,
                   help="coco:PATH: a COCO folder instead of a named task (default: --task)")
    s.add_argument("--prompts", default=None, help="a prompts.safetensors from `ssprompt "
                   "train` (default: none, zero-shot)")
    s.add_argument("--n-prompts", type=int, default=None,
                   help="zero-shot grid points (default: the backend's own)")
    s.add_argument("--n-test", type=int, default=None, help="first N test images (default all)")
    _add_split_args(s, train=False)
    s.add_argument("--predictions", default=None,
                   help="score the files `ssprompt predict` wrote in this folder (same "
                        "--task/--data and --n-test) instead of running the SFM (default: "
                        "none)")
    s.add_argument("--out", default=None,
                   help="folder for metrics.json (default: none, print the table only)")
    _add_sfm_args(s)
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("predict", help="segment images; write COCO results, panoptic and "
                       "semantic PNGs and overlays")
    s.add_argument("--images", default=None,
                   help="a folder of images (png, jpg, tif, ...; default: none)")
    s.add_argument("--task", default=None, help="a named task's test split: source | shift | "
                   "novel | stuff (with --images: only its class list; default: none)")
    s.add_argument("--data", default=None,
                   help="coco:PATH: its test split (--test-split; default: none)")
    s.add_argument("--prompts", default=None,
                   help="a prompts.safetensors from `ssprompt train` (default: zero-shot)")
    s.add_argument("--n-prompts", type=int, default=None,
                   help="zero-shot: grid points (default: the backend's own)")
    s.add_argument("--n-test", type=int, default=None,
                   help="first N images of the split (default all)")
    _add_split_args(s, train=False)
    s.add_argument("--out", required=True, help="folder for the prediction files")
    _add_sfm_args(s)
    s.set_defaults(fn=_cmd_predict)

    s = sub.add_parser("train", help="learn prompts few-shot on a task, then evaluate")
    s.add_argument("--task", default="shift", help="the named task to learn and score: "
                   "shift | novel | stuff | source")
    s.add_argument("--data", default=None,
                   help="coco:PATH: a COCO folder instead of a named task (default: --task)")
    from .methods import add_method_flags

    add_method_flags(s)   # --kind and one flag per method option (ssprompt.methods)
    for old in ("--mode", "--weight"):      # renamed in round 3: refused with the new name
        s.add_argument(old, default=None, help=argparse.SUPPRESS)
    s.add_argument("--shots", type=int, default=16,
                   help="k: labelled training images drawn from the train split")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the shots' draw, the prompts' start and the batch order")
    s.add_argument("--steps", type=int, default=None, help="(default: TrainConfig's, 100)")
    s.add_argument("--lr", type=float, default=None, help="(default: TrainConfig's)")
    s.add_argument("--spatial-lr-mult", type=float, default=None,
                   help="learning-rate factor for spatial embeddings (default: TrainConfig's)")
    s.add_argument("--batch", type=int, default=None, help="(default: TrainConfig's, 8)")
    s.add_argument("--n-test", type=int, default=None,
                   help="score the first N test images (default all)")
    s.add_argument("--no-select", action="store_true",
                   help="no held-out-shot selection: train on all shots, keep the last step "
                        "(can end worse than zero-shot, unnoticed)")
    s.add_argument("--holdout", type=float, default=0.25,
                   help="share of the shots each cross-fitted fold holds out (every shot is "
                        "held out once; leave-one-out for k <= 4; default: %(default)s)")
    s.add_argument("--select-every", type=int, default=10,
                   help="score candidate prompts on the held-out shots every N steps")
    _add_split_args(s)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field, YAML value (e.g. --set lr=0.01 --set "
                        "log_every=1); repeatable; wins over --steps/--lr/--batch")
    s.add_argument("--out", required=True, help="run folder: prompts.safetensors, "
                   "metrics.json, config.json, loss.csv, loss.jsonl, curves.png")
    _add_sfm_args(s)
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("study", help="the whole ablation study (variants x tasks x seeds)")
    s.add_argument("--config", default=None, help="YAML (default: configs/default.yaml)")
    s.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    s.add_argument("--quick", action="store_true", help="configs/quick.yaml: a fast smoke run")
    s.add_argument("--force", action="store_true",
                   help="reuse a run folder whose config differs (finished cells are dropped)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the config, YAML value: --set train.steps=50 --set "
                        "seeds=[0] --set variants.ssprompt.n_prompts=25; repeatable")
    s.add_argument("--workers", type=int, default=1,
                   help="processes sharing the (variant, task) groups (default 1); each uses "
                        "--threads torch threads")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: torch's own count / --workers). "
                        "Cells are identical for any --workers at the same --threads; another "
                        "thread count moves them within the seed spread")
    _add_sfm_args(s, precision=False)
    s.set_defaults(fn=_cmd_study)

    return p


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser: every flag's help names its default (``_Help``)."""

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", _Help)
        super().__init__(*a, **k)


# library argument -> the flag that sets it, where it is not simply --the-name
_FLAGS = {"train": "--set", "select": "--no-select"}


def flag_message(e: UserError) -> str:
    """A library error in the CLI's words: the argument at fault (``e.field``) named as its
    flag (``shots 100: ...`` -> ``--shots 100: ...``; ``nowhere: not a folder`` with field
    ``images`` -> ``--images nowhere: not a folder``)."""
    msg, name = " ".join(str(e).split()), getattr(e, "field", None)
    if not name:
        return msg
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    if msg.startswith((name + " ", name + ":")):
        return flag + msg[len(name):]
    return f"{flag} {msg}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None)
    new_out = Path(out) if out and not Path(out).exists() else None
    done = False
    try:
        args.fn(args)
        done = True
    except UserError as e:
        print(f"ssprompt: error: {flag_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssprompt: interrupted", file=sys.stderr)
        return 130
    finally:
        if new_out is not None and not done:   # failed or interrupted: no empty --out left
            from .io import remove_if_empty

            remove_if_empty(new_out)
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun: meet the other ranks, then tear the group down before exit."""
    import torch.distributed as dist

    from .distributed import barrier

    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
