"""COCO-format data end to end through the real command line: a COCO *instances* fixture and a
COCO *panoptic* fixture each go through k-shot training and evaluation (mIoU, AP50, PQ) on a tiny
random embedded SFM, and the instances one on a tiny random SAM (class-agnostic). Plus: the
feature cache never serves one model's features to another."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import (assert_ok, assert_one_line_error, save_tiny_embedded, save_tiny_sam,
                         ssprompt, tiny_embedded)
from ssprompt.data.coco import CocoDataset, export_coco
from ssprompt.data.scenes import SceneSplit

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("mIoU", "AP50", "PQ")


ok = assert_ok


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random embedded SFM saved as safetensors (independent of the committed weights)."""
    return save_tiny_embedded(tmp_path_factory.mktemp("sfm") / "tiny.safetensors", 0)


@pytest.fixture(scope="module")
def panoptic_root(tmp_path_factory) -> Path:
    scenes = SceneSplit("novel", "test", n=6)
    root = tmp_path_factory.mktemp("coco_panoptic")
    export_coco(scenes, root, "train")
    export_coco(scenes, root, "test")
    return root


@pytest.fixture(scope="module")
def instances_root(panoptic_root, tmp_path_factory) -> Path:
    """The same images with the panoptic annotations removed: instances (things) only."""
    root = tmp_path_factory.mktemp("coco_instances") / "data"
    shutil.copytree(panoptic_root, root)
    for split in ("train", "test"):
        (root / "annotations" / f"panoptic_{split}.json").unlink()
        shutil.rmtree(root / "annotations" / f"panoptic_{split}")
    return root


@pytest.fixture(scope="module")
def sam_ckpt(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return save_tiny_sam(tmp_path_factory.mktemp("sam"), seed=0)


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def _assert_finite(m: dict, keys=METRICS) -> None:
    for k in keys:
        assert isinstance(m.get(k), (int, float)) and math.isfinite(m[k]), (k, m.get(k))


def _train_then_eval(root: Path, out: Path, *sfm_args: str, extra=()) -> tuple[dict, dict]:
    ok(ssprompt("train", "--data", f"coco:{root}", "--kind", "weighted", "--shots", 3,
                "--steps", 3, "--batch", 2, "--n-test", 4, "--n-prompts", 25, *extra,
                *sfm_args, "--out", out))
    assert (out / "prompts.safetensors").is_file() and (out / "loss.csv").is_file()
    trained = _metrics(out / "metrics.json")
    ok(ssprompt("eval", "--data", f"coco:{root}", "--prompts", out / "prompts.safetensors",
                "--n-test", 4, *sfm_args, "--out", out / "eval"))
    evaluated = _metrics(out / "eval" / "metrics.json")
    return trained, evaluated


def _assert_same(a: dict, b: dict, keys=METRICS) -> None:
    for k in keys:
        if a[k] is None or b[k] is None:
            assert a[k] is b[k] is None, k
        else:
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert a["per_class"] == b["per_class"]


# ------------------------------------------------------------------------------ the fixtures
def test_fixture_kinds(panoptic_root, instances_root):
    pan, ins = CocoDataset(panoptic_root, "test"), CocoDataset(instances_root, "test")
    assert pan.kind == "panoptic" and ins.kind == "instances"
    assert len(pan) == len(ins) == 6
    assert any(not t for t in pan.is_thing)        # panoptic labels stuff too
    assert all(ins.is_thing)                        # instances: things only, the rest void
    assert pan.class_names != ins.class_names


# ------------------------------------------------------------------------- embedded SFM
@pytest.mark.parametrize("kind", ["panoptic", "instances"])
def test_embedded_kshot_train_and_eval(kind, panoptic_root, instances_root, tiny_ckpt,
                                       tmp_path):
    root = panoptic_root if kind == "panoptic" else instances_root
    trained, evaluated = _train_then_eval(root, tmp_path / "run", "--checkpoint", tiny_ckpt)
    _assert_finite(trained)
    assert trained["trained_params"] > 0
    n_classes = len(CocoDataset(root, "test").class_names)
    assert len(trained["per_class"]) == n_classes
    # eval of the saved prompts reproduces train's own evaluation
    _assert_same(trained, evaluated)
    assert evaluated["n_test"] == 4 and evaluated["task"] == f"coco:{root}"
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["config"]["shots"] == 3 and cfg["config"]["task"] == f"coco:{root}"


# ------------------------------------------------------------------------------ tiny SAM
def test_sam_spatial_train_and_eval_class_agnostic(instances_root, sam_ckpt, tmp_path):
    sam = ("--sfm", "sam", "--checkpoint", sam_ckpt)
    trained, evaluated = _train_then_eval(instances_root, tmp_path / "run", *sam,
                                          extra=("--learners", "spatial"))
    _assert_finite(trained)
    # SAM has no classes: evaluation is class-agnostic, {object, background}
    assert list(trained["per_class"]) == ["object", "background"]
    _assert_same(trained, evaluated)
    # zero-shot SAM (default point layout) also evaluates on the COCO fixture
    ok(ssprompt("eval", "--data", f"coco:{instances_root}", "--n-test", 2, "--n-prompts", 16,
                *sam, "--out", tmp_path / "zs"))
    _assert_finite(_metrics(tmp_path / "zs" / "metrics.json"))


@pytest.mark.parametrize("learners", ["semantic", "spatial,semantic"])
def test_sam_semantic_learners_are_a_user_error(instances_root, sam_ckpt, tmp_path, learners):
    # a fresh process: what importing the SAM backend prints (transformers warns once per
    # process, at import) must not add a line to the one-line error
    r = ssprompt("train", "--data", f"coco:{instances_root}", "--sfm", "sam", "--checkpoint",
                 sam_ckpt, "--learners", learners, "--kind", "weighted", "--shots", 2,
                 "--steps", 1, "--n-test", 2, "--out", tmp_path / "o", subprocess=True)
    assert_one_line_error(r, "--learners", "text encoder")
    assert not (tmp_path / "o" / "prompts.safetensors").exists()


def test_sam_vanilla_2d_trains(instances_root, sam_ckpt, tmp_path):
    ok(ssprompt("train", "--data", f"coco:{instances_root}", "--sfm", "sam", "--checkpoint",
                sam_ckpt, "--kind", "vanilla_2d", "--learners", "spatial", "--shots", 2,
                "--steps", 2, "--batch", 2, "--n-test", 2, "--n-prompts", 16,
                "--out", tmp_path / "v2d"))
    m = _metrics(tmp_path / "v2d" / "metrics.json")
    _assert_finite(m)
    assert m["trained_params"] == 16 * 2     # the points' 2-D coordinates


# -------------------------------------------------------------------------- feature cache
def test_feature_cache_never_shares_features_across_models(tmp_path):
    from ssprompt.sfm.features import FeatureCache
    from ssprompt.sfm.embedded import load_embedded

    a_path, b_path = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny_embedded(0).save(a_path)
    tiny_embedded(1).save(b_path)
    a, b = load_embedded(a_path), load_embedded(b_path)
    assert a.weights_hash() != b.weights_hash()
    image = SceneSplit("novel", "test", n=1)[0].image
    for directory in (None, tmp_path / "cache"):
        cache = FeatureCache(directory)
        fa = cache.get(a, [image]).tensors
        fb = cache.get(b, [image]).tensors
        assert cache.encoder_calls == 2               # b's features were computed, not reused
        assert {k[0] for k in cache.mem} == {a.weights_hash(), b.weights_hash()}
        assert any(not torch.equal(fa[k], fb[k]) for k in fa)
        with torch.no_grad():
            from ssprompt.geometry import to_batch
            direct_b = b.encode_image(to_batch([image], b.image_size)).tensors
        for k in fb:
            torch.testing.assert_close(fb[k], direct_b[k])
        # asking again hits the cache, for each model its own features
        again = cache.get(a, [image]).tensors
        assert cache.encoder_calls == 2 and all(torch.equal(again[k], fa[k]) for k in fa)
    # a fresh cache on the same folder loads each model's own features from disk
    disk = FeatureCache(tmp_path / "cache")
    fb2 = disk.get(b, [image]).tensors
    assert disk.encoder_calls == 0
    for k in fb:
        assert torch.equal(fb2[k], direct_b[k]) or torch.allclose(fb2[k], direct_b[k])
    assert np.array_equal(sorted(p.name for p in (tmp_path / "cache").iterdir()),
                          sorted([a.weights_hash(), b.weights_hash()]))
