"""Hardening: bad input through the command line (``ssprompt.cli.main``, in process) ends with
exit code 2, exactly one stderr line ``ssprompt: error: ...`` naming the file or flag and the
problem, and no partial result; plus determinism (fault injection: tests/engine/test_train.py,
tests/test_io.py). Every case runs on a tiny random SFM saved to a temp file (no committed weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error as _assert_one_line_error
from cli_helpers import save_tiny_embedded, ssprompt

RESULT_FILES = ("metrics.json", "prompts.safetensors", "config.json", "loss.csv")


def assert_one_line_error(r, *needles: str) -> str:
    """One shown error line: a progress bar that erased itself does not count."""
    return _assert_one_line_error(r, *needles, erased_ok=True)


def assert_no_results(out: Path) -> None:
    for name in RESULT_FILES:
        assert not (out / name).exists(), f"partial output {out / name}"
    if out.exists():
        assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_embedded(tmp_path_factory.mktemp("sfm") / "tiny.safetensors", 0)


@pytest.fixture(scope="module")
def tiny_other(tmp_path_factory) -> Path:
    return save_tiny_embedded(tmp_path_factory.mktemp("sfm2") / "tiny.safetensors", 1)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Three `shift` test scenes exported as a COCO folder with a train and a test split."""
    from ssprompt.data.coco import export_coco
    from ssprompt.data.scenes import SceneSplit

    scenes = SceneSplit("shift", "test", n=3)
    root = tmp_path_factory.mktemp("coco")
    export_coco(scenes, root, "test")
    export_coco(scenes, root, "train")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _eval(ckpt: Path, out: Path, *args) -> list:
    return ["eval", "--checkpoint", ckpt, "--out", out, "--n-prompts", "10", *args]


def _train(ckpt: Path, out: Path, *args) -> list:
    return ["train", "--checkpoint", ckpt, "--out", out, "--n-prompts", "10", "--steps", "2",
            "--batch", "2", *args]


@pytest.fixture(scope="module")
def coco_unannotated(coco, tmp_path_factory) -> Path:
    """Image 2 of both splits has no annotation at all (panoptic and instances)."""
    root = _copy(coco, tmp_path_factory.mktemp("unann") / "c")
    for split in ("train", "test"):
        for kind in ("panoptic", "instances"):
            _edit_json(root / "annotations" / f"{kind}_{split}.json",
                       lambda d: d.update(annotations=[a for a in d["annotations"]
                                                       if a["image_id"] != 2]))
    return root


# ----------------------------------------------------------------- the command-line runs
# Each job prepares its (damaged) input in its own folder d and returns the command line; the
# module fixture `cli` runs them all (in process, one after another), and the tests below check
# one result each.
JOBS = {}


def job(fn):
    JOBS[fn.__name__] = fn
    return fn


@job
def train_a(fx, d):  # the determinism pair; `a` also provides prompts for another SFM
    return ["train", "--checkpoint", fx["tiny"], "--out", d, "--n-prompts", "10", "--batch", "2",
            "--task", "shift", "--steps", "3", "--shots", "2", "--n-test", "3", "--seed", "0"]


@job
def train_b(fx, d):
    return train_a(fx, d)


@job
def unannotated_train(fx, d):
    return _train(fx["tiny"], d, "--data", f"coco:{fx['unann']}", "--shots", "3")


@job
def unannotated_eval(fx, d):
    return _eval(fx["tiny"], d, "--data", f"coco:{fx['unann']}")


@job
def corrupt_image(fx, d):
    root = _copy(fx["coco"], d / "c")
    img = root / "test" / "000001.png"
    img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])  # truncated PNG
    return _eval(fx["tiny"], d, "--data", f"coco:{root}")


@job
def mask_size(fx, d):
    root = _copy(fx["coco"], d / "c")
    ann = root / "annotations"
    (ann / "panoptic_test.json").unlink()  # instances only: the RLE's size is checked

    def grow(doc):
        seg = doc["annotations"][0]["segmentation"]
        seg["size"] = [seg["size"][0] + 8, seg["size"][1]]

    _edit_json(ann / "instances_test.json", grow)
    return _eval(fx["tiny"], d, "--data", f"coco:{root}")


@job
def undeclared_category(fx, d):
    root = _copy(fx["coco"], d / "c")
    _edit_json(root / "annotations" / "panoptic_test.json",
               lambda doc: doc["annotations"][0]["segments_info"][0].update(category_id=999))
    return _eval(fx["tiny"], d, "--data", f"coco:{root}")


@job
def not_json(fx, d):
    root = _copy(fx["coco"], d / "c")
    (root / "annotations" / "panoptic_test.json").write_text('{"images": [ oops')
    return _eval(fx["tiny"], d, "--data", f"coco:{root}")


@job
def truncated_weights(fx, d):
    tiny = fx["tiny"]
    bad = d / "cut.safetensors"
    bad.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    return _train(bad, d, "--task", "shift", "--shots", "2", "--n-test", "2")


@job
def weights_as_prompts(fx, d):
    return _eval(fx["tiny"], d, "--task", "shift", "--n-test", "2", "--prompts", fx["tiny"])


@job
def zero_prompts_eval(fx, d):  # `train --n-prompts 0`: tests/test_cli.py
    return _eval(fx["tiny"], d, "--task", "shift", "--n-test", "2", "--n-prompts", "0")


@job
def shots_embedded(fx, d):
    return _train(fx["tiny"], d, "--task", "novel", "--n-test", "2", "--shots", "100000")


@job
def shots_coco(fx, d):
    return _train(fx["tiny"], d, "--data", f"coco:{fx['coco']}", "--shots", "4")


@job
def study_unknown_key(fx, d):
    cfg = d / "bad.yaml"
    cfg.write_text("name: bad\ntasks: [shift]\nseeds: [0]\nshots: 2\nn_test: 2\n"
                   "train: {steps: 1, lerning_rate: 0.1}\n"
                   "variants:\n  - {name: zs, kind: zero_shot, role: baseline}\n")
    return ["study", "--config", cfg, "--out", d / "run", "--checkpoint", fx["tiny"]]


@pytest.fixture(scope="module")
def cli(coco, coco_unannotated, tiny, tiny_other, tmp_path_factory) -> dict:
    """name -> (CompletedProcess, output folder) for every job, plus `other_sfm`."""
    fx = {"coco": coco, "unann": coco_unannotated, "tiny": tiny}
    base = tmp_path_factory.mktemp("cli")
    argv = {}
    for name, prep in JOBS.items():
        (base / name).mkdir()
        argv[name] = prep(fx, base / name)
    runs = {name: (ssprompt(*args), base / name) for name, args in argv.items()}
    # the same bad input in a fresh `python -m ssprompt.cli`: nothing printed at import time
    # adds a line to the one error line
    (base / "corrupt_image_subprocess").mkdir()
    runs["corrupt_image_subprocess"] = (
        ssprompt(*corrupt_image(fx, base / "corrupt_image_subprocess"), subprocess=True),
        base / "corrupt_image_subprocess")
    assert runs["train_a"][0].returncode == 0, runs["train_a"][0].stderr[-2000:]
    out = base / "other_sfm"  # prompts learned with one tiny SFM, evaluated with another
    runs["other_sfm"] = (ssprompt(*_eval(tiny_other, out, "--task", "shift", "--n-test", "3",
                                         "--prompts", base / "train_a" / "prompts.safetensors")),
                         out)
    return runs


def _error(cli, name: str, *needles: str) -> str:
    r, out = cli[name]
    line = assert_one_line_error(r, *needles)
    assert_no_results(out)
    return line


# ------------------------------------------------------------------------ COCO bad input
def test_coco_corrupt_image(cli):
    _error(cli, "corrupt_image", "000001.png", "cannot decode image")


def test_coco_corrupt_image_in_a_fresh_process(cli):
    _error(cli, "corrupt_image_subprocess", "000001.png", "cannot decode image")


def test_coco_annotation_mask_size_differs_from_image(cli):
    _error(cli, "mask_size", "instances_test.json", "mask size")


def test_coco_undeclared_category(cli):
    _error(cli, "undeclared_category", "panoptic_test.json", "category_id 999", "not declared")


def test_coco_json_not_json(cli):
    _error(cli, "not_json", "panoptic_test.json", "not valid JSON")


def test_coco_image_without_annotations_eval(cli):
    r, out = cli["unannotated_eval"]
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_test"] == 3 and {"mIoU", "AP50", "PQ"} <= set(m)


def test_coco_image_without_annotations_train(cli):
    r, out = cli["unannotated_train"]
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert {"mIoU", "AP50", "PQ"} <= set(m) and m["trained_params"] > 0
    assert (out / "prompts.safetensors").is_file()


# --------------------------------------------------------------------- weights / prompts
def test_truncated_weights_file(cli):
    _error(cli, "truncated_weights", "cut.safetensors", "corrupt")


def test_weights_file_given_as_prompts(cli, tiny):
    _error(cli, "weights_as_prompts", str(tiny), "prompts file")


def test_prompts_learned_for_another_sfm(cli):
    _error(cli, "other_sfm", "train_a/prompts.safetensors", "learned for SFM")


# ----------------------------------------------------------------------------- bad flags
def test_zero_prompts_eval(cli):
    _error(cli, "zero_prompts_eval", "--n-prompts 0")


def test_shots_larger_than_embedded_split(cli):
    _error(cli, "shots_embedded", "--shots 100000")


def test_shots_larger_than_coco_split(cli):
    assert "1..3" in _error(cli, "shots_coco", "--shots 4")  # says how many images there are


def test_study_unknown_config_key(cli):
    _error(cli, "study_unknown_key", "bad.yaml", "lerning_rate")
    run = cli["study_unknown_key"][1] / "run"
    assert not run.exists() or not any(run.rglob("*.json"))


# ----------------------------------------------------------------------------- determinism
def test_train_is_deterministic(cli):
    (ra, a), (rb, b) = cli["train_a"], cli["train_b"]
    assert ra.returncode == 0 and rb.returncode == 0, rb.stderr[-2000:]
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    for k in ("mIoU", "AP50", "PQ", "per_class", "final_loss", "trained_params"):
        assert ma[k] == mb[k], k
    assert (a / "loss.csv").read_text() == (b / "loss.csv").read_text()


# ----------------------------------------------- every check before the first step (issue 30)
# These jobs name a fresh `d / "o"` as --out: a failed run must not leave it behind, empty.
def _fresh(cmd: list) -> list:
    cmd = list(cmd)
    cmd[cmd.index("--out") + 1] = Path(cmd[cmd.index("--out") + 1]) / "o"
    return cmd


@job
def corrupt_test_image_train(fx, d):  # found before training, not after its last step
    root = _copy(fx["coco"], d / "c")
    img = root / "test" / "000002.png"
    img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])
    return _fresh(_train(fx["tiny"], d, "--data", f"coco:{root}", "--shots", "2",
                         "--steps", "50"))


@job
def empty_test_annotations_eval(fx, d):
    root = _copy(fx["coco"], d / "c")
    for kind in ("panoptic", "instances"):
        _edit_json(root / "annotations" / f"{kind}_test.json",
                   lambda doc: doc.update(annotations=[]))
    return _fresh(_eval(fx["tiny"], d, "--data", f"coco:{root}"))


@job
def empty_train_annotations(fx, d):
    root = _copy(fx["coco"], d / "c")
    (root / "annotations" / "panoptic_train.json").unlink()
    _edit_json(root / "annotations" / "instances_train.json",
               lambda doc: doc.update(annotations=[]))
    return _fresh(_train(fx["tiny"], d, "--data", f"coco:{root}", "--shots", "2"))


@job
def duplicate_category_name(fx, d):
    root = _copy(fx["coco"], d / "c")

    def dup(doc):
        doc["categories"][1]["name"] = doc["categories"][0]["name"]
    _edit_json(root / "annotations" / "panoptic_test.json", dup)
    return _fresh(_eval(fx["tiny"], d, "--data", f"coco:{root}"))


@job
def json_size_disagrees(fx, d):
    root = _copy(fx["coco"], d / "c")
    _edit_json(root / "annotations" / "panoptic_test.json",
               lambda doc: doc["images"][1].update(width=doc["images"][1]["width"] + 5))
    return _fresh(_eval(fx["tiny"], d, "--data", f"coco:{root}"))


@job
def checkpoint_is_a_folder(fx, d):
    (d / "empty").mkdir()
    return _fresh(_eval(d / "empty", d, "--task", "shift", "--n-test", "2"))


@job
def prompts_is_a_folder(fx, d):
    (d / "k4").mkdir()
    return _fresh(_eval(fx["tiny"], d, "--task", "shift", "--n-test", "2", "--prompts",
                        d / "k4"))


@job
def data_without_coco_prefix(fx, d):
    return _fresh(_eval(fx["tiny"], d, "--data", fx["coco"]))


@job
def data_is_a_file(fx, d):
    return _fresh(_eval(fx["tiny"], d, "--data", f"coco:{fx['tiny']}"))


@job
def predictions_is_a_file(fx, d):
    return _fresh(_eval(fx["tiny"], d, "--task", "shift", "--n-test", "2", "--predictions",
                        fx["tiny"]))


@job
def images_is_a_file(fx, d):
    return ["predict", "--images", fx["tiny"], "--task", "shift", "--checkpoint", fx["tiny"],
            "--out", d / "o"]


@job
def data_checked_before_the_sfm(fx, d):  # a bad SFM and bad data: the data is named
    bad = d / "cut.safetensors"
    bad.write_bytes(b"not weights")
    return _fresh(_train(bad, d, "--data", f"coco:{d / 'nowhere'}"))


def _error_no_out(cli, name: str, *needles: str) -> str:
    line = _error(cli, name, *needles)
    out = cli[name][1] / "o"
    assert not out.exists(), f"{out} left behind: {list(out.rglob('*'))}"
    return line


def test_corrupt_test_image_found_before_training(cli):
    _error_no_out(cli, "corrupt_test_image_train", "test/000002.png", "cannot decode image")


def test_no_training_step_runs_before_the_data_checks(tmp_path, coco, tiny, monkeypatch):
    import ssprompt.engine.cell as cell

    def never(*a, **k):
        raise AssertionError("training started before the data was checked")

    monkeypatch.setattr(cell, "run_cell", never)
    root = _copy(coco, tmp_path / "c")
    img = root / "test" / "000002.png"
    img.write_bytes(img.read_bytes()[:100])
    r = ssprompt(*_train(tiny, tmp_path / "o", "--data", f"coco:{root}", "--shots", "2"))
    assert_one_line_error(r, "000002.png")
    assert not (tmp_path / "o").exists()


def test_empty_annotations_are_refused(cli):
    _error_no_out(cli, "empty_test_annotations_eval", "panoptic_test.json", "no annotations")
    _error_no_out(cli, "empty_train_annotations", "instances_train.json", "no annotations")


def test_duplicate_category_names(cli):
    _error_no_out(cli, "duplicate_category_name", "panoptic_test.json", "unique")


def test_json_height_width_must_agree_with_the_image(cli):
    _error_no_out(cli, "json_size_disagrees", "000001.png", "panoptic_test.json say")


def test_folder_where_a_file_is_expected_and_the_reverse(cli):
    _error_no_out(cli, "checkpoint_is_a_folder", "--checkpoint", "is a folder, expected a "
                  "weights file")
    _error_no_out(cli, "prompts_is_a_folder", "--prompts", "k4", "is a folder")
    _error_no_out(cli, "data_is_a_file", "--data", "is a file, expected a COCO dataset folder")
    _error_no_out(cli, "predictions_is_a_file", "--predictions", "is a file")
    _error_no_out(cli, "images_is_a_file", "--images", "is a file, expected a folder")


def test_data_path_without_coco_is_named_as_data(cli, coco):
    line = _error_no_out(cli, "data_without_coco_prefix", "--data", f"did you mean coco:{coco}")
    assert "--task" not in line


def test_data_is_checked_before_the_sfm_loads(cli):
    _error_no_out(cli, "data_checked_before_the_sfm", "--data", "nowhere")


def test_interrupted_train_leaves_no_empty_out_folder(tmp_path, tiny, monkeypatch):
    """Ctrl-C after the first loss row: exit 130, and the --out the run created is gone."""
    import ssprompt.engine.cell as cell

    def interrupted(ws, spec, progress=False, on_log=None):
        on_log({"step": 0, "loss": 1.0})            # loss.jsonl now exists in --out
        raise KeyboardInterrupt

    monkeypatch.setattr(cell, "run_cell", interrupted)
    out = tmp_path / "o"
    r = ssprompt(*_train(tiny, out, "--task", "shift", "--shots", "2", "--n-test", "2"))
    assert r.returncode == 130, r.stderr[-2000:]
    assert not out.exists()
