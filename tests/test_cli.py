"""Bad input through the real command line: one line on stderr naming the problem, exit 2, and
no partial output file."""


import pytest
from cli_helpers import assert_one_line_error, ssprompt

def test_unknown_task(tmp_path):
    r = ssprompt("eval", "--task", "mars", "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "mars")
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file" * 10)
    r = ssprompt("eval", "--task", "shift", "--checkpoint", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(r, str(bad))
    assert not (tmp_path / "o").exists()


def test_missing_weights_file(tmp_path):
    r = ssprompt("eval", "--task", "shift", "--checkpoint", str(tmp_path / "none.safetensors"))
    assert_one_line_error(r, "--checkpoint", "none.safetensors")
    assert "--weights" not in r.stderr


def test_pretrain_never_writes_the_packaged_weights_by_default(tmp_path):
    import hashlib
    import os
    import subprocess
    import sys

    from ssprompt.sfm.embedded import DEFAULT_WEIGHTS

    before = hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()
    r = subprocess.run([sys.executable, "-m", "ssprompt.cli", "pretrain", "--steps", "1",
                        "--batch", "2", "--warmup", "1", "--device", "cpu"], cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "runs" / "pretrain" / "embedded_sfm.safetensors").exists()
    assert hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest() == before


def test_missing_and_corrupt_prompts_file(tmp_path):
    r = ssprompt("eval", "--task", "shift", "--prompts", str(tmp_path / "p.safetensors"))
    assert_one_line_error(r, "p.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_text("{}")
    r = ssprompt("eval", "--task", "shift", "--prompts", str(bad), "--n-test", "2")
    assert_one_line_error(r, "bad.safetensors")


@pytest.mark.parametrize("args,needle", [
    (["--n-prompts", "0"], "--n-prompts"),
    (["--n-prompts", "-5"], "--n-prompts"),
    (["--shots", "5000"], "--shots"),
    (["--kind", "sometimes"], "--kind"),
    (["--mode", "weighted"], "--mode is now --kind"),
    (["--weight", "dim"], "--weight is now --weight-shape"),
])
def test_bad_train_arguments(tmp_path, args, needle):
    out = tmp_path / "o"
    r = ssprompt("train", "--task", "shift", "--steps", "1", "--n-test", "2", "--out", str(out),
                 *args)
    assert_one_line_error(r, needle)
    assert not out.exists() or not any(out.iterdir())


def test_train_then_eval_reproduces_metrics(tmp_path):
    import json

    out = tmp_path / "run"
    r = ssprompt("train", "--task", "novel", "--kind", "weighted", "--steps", "4", "--shots", "4",
                 "--n-test", "6", "--n-prompts", "25", "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("prompts.safetensors", "metrics.json", "config.json", "loss.csv"):
        assert (out / name).exists(), name
    trained = json.loads((out / "metrics.json").read_text())
    r = ssprompt("eval", "--task", "novel", "--n-test", "6", "--prompts",
                 str(out / "prompts.safetensors"), "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for k in ("mIoU", "AP50", "PQ"):
        assert again[k] == trained[k]
    assert trained["trained_params"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["weights_hash"] == again["weights_hash"]


def test_eval_writes_metrics_for_every_downstream_task(tmp_path):
    import json

    for task in ("shift", "novel", "stuff"):
        r = ssprompt("eval", "--task", task, "--n-test", "4", "--out", str(tmp_path / task))
        assert r.returncode == 0, r.stderr[-2000:]
        m = json.loads((tmp_path / task / "metrics.json").read_text())
        assert {"mIoU", "AP50", "PQ", "per_class"} <= set(m)
        assert "mIoU" in r.stdout and task in r.stdout


# ------------------------------------------------------------------------ --set overrides
def test_study_set_overrides_reach_the_config():
    from ssprompt.study import CONFIG_DIR, load_config, parse_sets

    sets = parse_sets(["train.steps=50", "seeds=[0, 1]", "variants.ssprompt.n_prompts=25",
                       "variants.ssprompt.train.lr=1", "n_test=7"])
    cfg = load_config(CONFIG_DIR / "quick.yaml", sets)
    plain = load_config(CONFIG_DIR / "quick.yaml")
    assert cfg.train["steps"] == 50 and cfg.seeds == [0, 1] and cfg.n_test == 7
    v = {x.name: x for x in cfg.variants}["ssprompt"]
    assert v.prompt.n_prompts == 25 and v.train == {"lr": 1.0}
    assert cfg.raw["train"]["steps"] == 50   # what the run folder's config.yaml records
    assert plain.train["steps"] != 50 and len(cfg.cells()) == 2 * len(plain.cells())


@pytest.mark.parametrize("cmd,sets,needle", [
    ("study", ["train.stepz=5"], "stepz"),
    ("study", ["variants.nobody.n_prompts=5"], "nobody"),
    ("study", ["seeds"], "key=value"),
    ("train", ["stepz=5"], "stepz"),
    ("train", ["lr=fast"], "lr"),
    ("train", ["steps=[1, 2]"], "steps"),
])
def test_bad_set_is_one_line(tmp_path, cmd, sets, needle):
    extra = ["--quick"] if cmd == "study" else ["--task", "novel"]
    args = [cmd, *extra, "--out", str(tmp_path / "o")]
    for s in sets:
        args += ["--set", s]
    r = ssprompt(*args)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_train_set_reaches_every_trainconfig_field(tmp_path):
    import csv
    import json

    out = tmp_path / "run"
    r = ssprompt("train", "--task", "novel", "--shots", "2", "--n-test", "2", "--n-prompts",
                 "25", "--no-select", "--steps", "9", "--set", "steps=3", "--set", "lr=0.01",
                 "--set", "log_every=1", "--set", "anchor=0", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    train = json.loads((out / "config.json").read_text())["config"]["train"]
    assert (train["steps"], train["lr"], train["log_every"], train["anchor"]) == (3, 0.01, 1, 0.0)
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]   # --set log_every=1: every step


def test_study_with_set_runs_and_its_prompts_files_describe_themselves(tmp_path):
    import yaml

    from ssprompt.prompts.promptset import load_prompts

    out = tmp_path / "study"
    r = ssprompt("study", "--quick", "--device", "cpu", "--out", out, "--set", "tasks=[stuff]",
                 "--set", "n_test=2", "--set", "shots=2", "--set", "train.steps=2",
                 "--set", "variants=[{name: zero-shot, kind: zero_shot, role: baseline}, "
                          "{name: ssprompt, kind: weighted, n_prompts: 25}]",
                 "--set", "comparisons=[]", "--set", "primary=[]")   # they named other rows
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["tasks"] == ["stuff"] and cfg["train"]["steps"] == 2 and len(cfg["variants"]) == 2
    lp = load_prompts(out / "cells" / "ssprompt__stuff__s0.safetensors")
    assert lp.meta["n_prompts"] == 25 and len(lp.class_names) == lp.semantic.shape[0]
    assert False in lp.is_thing and True in lp.is_thing   # stuff and things, told apart


# ----------------------------------------------------------- help: fast, complete, honest
def _subparsers():
    import argparse

    from ssprompt.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_flag_has_help_and_a_default():
    import argparse

    for name, sp in _subparsers().items():
        fmt = sp._get_formatter()
        for a in sp._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or "-h" in a.option_strings:
                continue
            text = fmt._get_help_string(a)
            assert a.help and a.help.strip(), (name, a.option_strings)
            if a.required or isinstance(a, (argparse._StoreTrueAction,
                                            argparse.BooleanOptionalAction,
                                            argparse._AppendAction)):
                continue
            assert "default" in text, (name, a.option_strings, text)
    train = _subparsers()["train"].format_help()
    for flag in ("--task", "--learners", "--shots", "--seed", "--n-test", "--out"):
        assert flag in train


def test_flags_that_do_nothing_are_not_offered():
    subs = _subparsers()
    assert "--train-split" in subs["train"].format_help()
    for name in ("eval", "predict"):
        assert "--train-split" not in subs[name].format_help(), name
    r = ssprompt("eval", "--train-split", "x", "--task", "shift")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_help_imports_nothing_heavy():
    """`ssprompt --help` / `train --help` in a fresh process import no torch, transformers or
    matplotlib (its time: `python -m bench --only cli_speed`), and list the backends exactly
    as the registry does."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from ssprompt.cli import build_parser, backends_help\n"
            "for argv in (['--help'], ['train', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: build_parser().parse_args(argv)\n"
            "        except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n"
            "print(backends_help())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    heavy, listed = r.stdout.splitlines()[:2]
    assert heavy == "[]"
    from ssprompt.sfm import backends_help

    assert listed == backends_help()
