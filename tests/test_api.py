"""The Python API from the package root: the Predictor on a non-square image, the
predictor's shapes and classes, self-describing prompts files, and an import that leaves the
process's global state alone."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The Predictor's documented use with a prompts file and an image prepared beforehand (the
# README's own python block runs as written: tests/test_readme_snippets.py).
SNIPPET = '''\
import numpy as np
from PIL import Image
from ssprompt import Predictor, load_prompts, load_sfm

sfm = load_sfm()
prompts = load_prompts("runs/novel/prompts.safetensors")
predictor = Predictor(sfm, prompts)

image = np.asarray(Image.open("photo.jpg").convert("RGB"))
pred = predictor.predict(image)
batch = predictor.predict([image, image[:40]])
'''


def novel_prompts(sfm, path: Path, n_prompts: int = 25, step: float = 0.01) -> dict:
    """A prompts file for `novel` whose learned embeddings moved ``step`` away from the
    defaults (no training needed); returns its class names and thing flags."""
    from ssprompt.data import open_dataset
    from ssprompt.prompts.promptset import PromptConfig, PromptSet, save_prompts

    data = open_dataset("novel", "test", n_test=1)
    ps = PromptSet(sfm, data.class_names, PromptConfig("weighted", n_prompts=n_prompts),
                   generator=torch.Generator().manual_seed(0), is_thing=data.is_thing)
    with torch.no_grad():
        for p in ps.trainable():
            p.add_(step * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_prompts(path, ps, {"weights_hash": sfm.weights_hash(), "config": {"task": "novel"}})
    return {"class_names": data.class_names, "is_thing": data.is_thing}


def test_predictor_snippet_on_a_non_square_image(tmp_path, monkeypatch):
    from PIL import Image

    from ssprompt import load_sfm

    expect = novel_prompts(load_sfm(device="cpu"), tmp_path / "runs/novel/prompts.safetensors")
    image = np.random.default_rng(0).integers(0, 256, (72, 130, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.jpg", quality=100)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(SNIPPET, "Predictor snippet", "exec"), scope)
    img, pred, predictor = scope["image"], scope["pred"], scope["predictor"]
    h, w = img.shape[:2]
    assert (h, w) == (72, 130)
    assert tuple(pred.semantic.shape) == (h, w) and tuple(pred.panoptic.shape) == (h, w)
    assert pred.instances.masks.shape[1:] == (h, w)
    assert predictor.class_names == expect["class_names"]
    assert predictor.is_thing == expect["is_thing"]
    assert int(pred.semantic.max()) < len(expect["class_names"])
    ids = set(pred.panoptic.unique().tolist()) - {0}
    assert ids == {s["id"] for s in pred.segments if s["area"] > 0}
    for s in pred.segments:  # a segment's class and thing flag agree with the class list
        assert s["isthing"] == expect["is_thing"][s["category"]]
    for k in pred.instances.categories.tolist():
        assert expect["is_thing"][k]
    assert [tuple(p.semantic.shape) for p in scope["batch"]] == [(72, 130), (40, 130)]


def test_batch_and_set_image_agree_with_one_image(tmp_path):
    from ssprompt import Predictor, load_sfm

    sfm = load_sfm(device="cpu")
    meta = novel_prompts(sfm, tmp_path / "p.safetensors")
    predictor = Predictor(sfm, str(tmp_path / "p.safetensors"))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((50, 90, 3), (96, 96, 3),
                                                                 (120, 64, 3))]
    one = [predictor.predict(im) for im in images]
    many = predictor.predict(images)
    predictor.set_image(images[2])
    again = predictor.predict()
    for a, b in zip(one, many):
        assert torch.equal(a.semantic, b.semantic) and torch.equal(a.panoptic, b.panoptic)
        assert a.semantic.shape == (a.panoptic.shape)
    assert torch.equal(again.semantic, one[2].semantic)
    # zero-shot from class names differs from the learned prompts somewhere
    zs = Predictor(sfm, class_names=meta["class_names"], is_thing=meta["is_thing"],
                   n_prompts=25).predict(images)
    assert any(not torch.equal(z.semantic, m.semantic) for z, m in zip(zs, many))


def test_bad_images_are_refused_in_one_line(tmp_path):
    from ssprompt import Predictor, load_sfm
    from ssprompt.errors import UserError

    p = Predictor(load_sfm(device="cpu"), class_names=["cat", "grass"], is_thing=[True, False])
    for bad, needle in ((np.zeros((10, 10, 5), np.uint8), r"must be \(H, W, 3\) or \(H, W\)"),
                        (np.zeros((2, 3, 10, 10, 3), np.uint8), r"must be \(H, W, 3\)"),
                        (np.zeros((0, 10, 3), np.uint8), "empty"),
                        (np.array([["a"]]), "numeric")):
        with pytest.raises(UserError, match=needle):
            p.predict(bad)
    with pytest.raises(UserError, match="nope.png: missing image file"):
        p.predict(tmp_path / "nope.png")
    with pytest.raises(UserError, match="set_image"):
        p.predict()


def test_grayscale_16bit_and_paths_are_one_image_each(tmp_path, tiny_sfm):
    """A 2-D array is one grayscale image (not a list of rows); 16-bit arrays and files
    follow the reader's rule; outputs are torch tensors (``.numpy()``)."""
    from PIL import Image

    from ssprompt import Predictor

    p = Predictor(tiny_sfm, class_names=["cat", "grass"], is_thing=[True, False], n_prompts=10)
    gray = np.random.default_rng(0).integers(0, 256, (30, 44), dtype=np.uint8)
    one = p.predict(gray)
    assert not isinstance(one, list) and tuple(one.semantic.shape) == (30, 44)
    assert isinstance(one.semantic, torch.Tensor) and one.semantic.numpy().shape == (30, 44)
    rgb = p.predict(np.repeat(gray[..., None], 3, 2))
    assert torch.equal(one.semantic, rgb.semantic)
    g16 = gray.astype(np.uint16) * 257                       # the rule maps it back to gray
    assert torch.equal(p.predict(g16).semantic, one.semantic)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert torch.equal(p.predict(tmp_path / "g16.png").semantic, one.semantic)
    assert torch.equal(p.predict(str(tmp_path / "g16.png")).semantic, one.semantic)
    batch = p.predict(np.stack([np.repeat(gray[..., None], 3, 2)] * 2))
    assert isinstance(batch, list) and len(batch) == 2


def test_predict_dataset_hands_back_coco_ids(tmp_path, tiny_sfm):
    from ssprompt import Predictor
    from ssprompt.data import open_dataset
    from ssprompt.data.coco import export_coco
    from ssprompt.data.scenes import SceneSplit

    root = export_coco(SceneSplit("shift", "test", n=3), tmp_path / "c", "test")
    ann = root / "annotations" / "panoptic_test.json"
    doc = json.loads(ann.read_text())
    for k, im in enumerate(doc["images"]):      # image ids the user's file has: 101, 103, 105
        new = 101 + 2 * k
        for a in doc["annotations"]:
            if a["image_id"] == im["id"]:
                a["image_id"] = new
        im["id"] = new
    ann.write_text(json.dumps(doc))
    (root / "annotations" / "instances_test.json").unlink()
    test = open_dataset(f"coco:{root}", "test")
    p = Predictor(tiny_sfm, class_names=test.class_names, is_thing=test.is_thing, n_prompts=10)
    got = p.predict_dataset(test)
    assert [i for i, _ in got] == [101, 103, 105]
    assert [test.image_id(i) for i in range(3)] == [101, 103, 105]
    assert test.category_ids == [c["id"] for c in doc["categories"]]
    assert tuple(got[0][1].semantic.shape) == test[0].semantic.shape


# ------------------------------------------------------------------ self-describing prompts
def test_prompts_file_describes_itself_and_is_refused_elsewhere(tmp_path):
    from cli_helpers import tiny_embedded

    from ssprompt import Predictor, check_prompts, load_prompts, load_sfm
    from ssprompt.errors import UserError

    sfm = load_sfm(device="cpu")
    path = tmp_path / "p.safetensors"
    expect = novel_prompts(sfm, path)
    lp = load_prompts(path)
    assert lp.class_names == expect["class_names"] and lp.is_thing == expect["is_thing"]
    assert lp.meta["weights_hash"] == sfm.weights_hash() and lp.meta["n_prompts"] == 25
    assert lp.meta["kind"] == "weighted" and lp.meta["learners"] == ["spatial", "semantic"]
    assert lp.meta["config"] == {"task": "novel"}
    spatial, semantic, meta = lp                       # still unpacks as before
    assert spatial.shape[0] == 25 and semantic.shape[0] == len(expect["class_names"])
    check_prompts(lp, sfm, expect["class_names"], path)  # the right SFM and classes: fine

    swapped = list(expect["class_names"])
    swapped[0], swapped[1] = swapped[1], swapped[0]      # same count, another class list
    for names in (swapped, expect["class_names"][:-1]):
        with pytest.raises(UserError) as e:
            check_prompts(lp, sfm, names, path)
        assert str(path) in str(e.value) and "class" in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="SFM weights"):
        check_prompts(lp, tiny_embedded(), expect["class_names"], path)
    with pytest.raises(UserError, match="SFM weights"):
        Predictor(tiny_embedded(), path)


def test_old_prompts_files_still_load(tmp_path):
    """A file from before the vocabulary was recorded: loads, class count still checked."""
    from safetensors.torch import save_file

    from ssprompt import Predictor, check_prompts, load_prompts, load_sfm
    from ssprompt.errors import UserError

    sfm = load_sfm(device="cpu")
    novel_prompts(sfm, tmp_path / "new.safetensors")
    new = load_prompts(tmp_path / "new.safetensors")
    old = tmp_path / "old.safetensors"
    save_file({"spatial": new.spatial, "semantic": new.semantic}, str(old),
              metadata={"ssprompt": json.dumps({"sfm": sfm.weights_hash(), "seed": 0})})
    lp = load_prompts(old)
    assert lp.class_names is None and torch.equal(lp.semantic, new.semantic)
    names = new.class_names
    check_prompts(lp, sfm, names, old)
    with pytest.raises(UserError, match="27 class prompts"):
        check_prompts(lp, sfm, names[:5], old)
    with pytest.raises(UserError, match="class_names"):
        Predictor(sfm, lp)
    pred = Predictor(sfm, lp, class_names=names).predict(np.zeros((30, 40, 3), np.uint8))
    assert pred.semantic.shape == (30, 40)
    # such a file named the weights hash "sfm": another SFM's prompts are still refused
    other = tmp_path / "other.safetensors"
    save_file({"spatial": new.spatial, "semantic": new.semantic}, str(other),
              metadata={"ssprompt": json.dumps({"sfm": "0" * 16, "seed": 0})})
    with pytest.raises(UserError, match="learned for SFM weights 0000"):
        check_prompts(load_prompts(other), sfm, names, other)


def test_eval_refuses_prompts_of_another_class_list(tmp_path):
    from cli_helpers import assert_one_line_error, ssprompt

    from ssprompt import load_sfm

    novel_prompts(load_sfm(device="cpu"), tmp_path / "p.safetensors")
    r = ssprompt("eval", "--task", "shift", "--n-test", "2", "--prompts",
                 tmp_path / "p.safetensors", "--out", tmp_path / "o")
    assert_one_line_error(r, "p.safetensors", "class list")
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------- no global side effects
_STATE = r'''
import json, os, random, sys, warnings
import numpy as np, torch, tqdm, matplotlib
# third-party libraries ssprompt builds on are imported first: what *they* do on import (scipy
# registers a warnings filter, for one) is theirs; what is measured is ssprompt's own code
import scipy.optimize, scipy.special, torchmetrics, pycocotools.coco, safetensors.torch, yaml
import PIL.Image
def state():
    return {"env": dict(os.environ), "backend": str(matplotlib.rcParams._get_backend_or_none()),
            "interactive": matplotlib.is_interactive(),
            "tqdm": repr(tqdm.tqdm.__init__.__defaults__) + repr(tqdm.tqdm.__init__.__kwdefaults__)
                    + repr(tqdm.tqdm.monitor_interval),
            "torch_rng": torch.random.get_rng_state().tolist(),
            "np_rng": repr(np.random.get_state()), "py_rng": repr(random.getstate()),
            "threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
            "dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(),
            "warnings": repr(warnings.filters), "np_err": repr(np.geterr()),
            "np_print": repr(np.get_printoptions())}
before = state()
import importlib, pkgutil, ssprompt
from ssprompt import Predictor, load_prompts, load_sfm, Prediction, check_prompts
for m in pkgutil.walk_packages(ssprompt.__path__, "ssprompt."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
after = state()
print(json.dumps(sorted(k for k in before if before[k] != after[k])))
'''


def test_import_changes_no_global_state():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",
                                                            "TOKENIZERS_PARALLELISM")}
    r = subprocess.run([sys.executable, "-c", _STATE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


# ------------------------------------------------------- the whole path: learn, evaluate, save
DOCS_SNIPPET = ROOT / "docs" / "snippet.py"


def test_docs_snippet_trains_evaluates_and_predicts(tmp_path, monkeypatch):
    """docs/snippet.py (the README's python block), run verbatim in an empty folder: packaged
    SFM and data only, nothing the reader must make first (a fresh process runs it too:
    tests/test_readme_snippets.py)."""
    code = DOCS_SNIPPET.read_text()
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 16
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(DOCS_SNIPPET), "exec"), scope)
    run, test, learned = scope["run"], scope["test"], scope["learned"]
    for name in ("prompts.safetensors", "metrics.json", "config.json", "loss.csv", "curves.png"):
        assert (tmp_path / "runs/novel" / name).is_file()
    # the saved prompts score on the test split exactly as learn_prompts reported
    for k in ("mIoU", "AP50", "PQ"):
        assert learned[k] == run.metrics[k]
    assert len(test) == 8
    assert tuple(scope["pred"].semantic.shape) == (512, 512)        # the photo's own size
    assert isinstance(scope["pred"].semantic, torch.Tensor)
    assert run.class_names == test.class_names


def test_cli_train_is_learn_prompts(tmp_path):
    """``ssprompt train`` maps its flags onto ``LearnConfig`` and calls ``learn_prompts``: the
    same prompts, metrics and run folder as the API with those settings."""
    from cli_helpers import ssprompt
    from safetensors.torch import load_file

    flags = ("--task", "novel", "--shots", "4", "--steps", "4", "--batch", "2", "--n-test", "3",
             "--n-prompts", "16", "--weight-init", "0.3", "--anchored", "--seed", "1",
             "--set", "log_every=1", "--select-every", "2")
    # both in fresh processes at OMP_NUM_THREADS=1: the same float sums, and no class-name
    # embedding cached earlier in this process at another thread count (text_encoder's
    # lru_cache; in-process, the CLI failed whenever an earlier test had loaded the SFM)
    r = ssprompt("train", *flags, "--out", tmp_path / "cli", "--device", "cpu", subprocess=True)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import json, sys; from ssprompt import LearnConfig, learn_prompts, load_sfm\n"
            "cfg = LearnConfig(shots=4, steps=4, batch=2, n_test=3, n_prompts=16, "
            "weight_init=0.3, anchored=True, seed=1, train={'log_every': 1}, select_every=2)\n"
            "run = learn_prompts(load_sfm(device='cpu'), 'novel', cfg, out=sys.argv[1])\n"
            "print(json.dumps({k: run.metrics[k] for k in ('mIoU', 'AP50', 'PQ')}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "api")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    cli = json.loads((tmp_path / "cli/config.json").read_text())
    api = json.loads((tmp_path / "api/config.json").read_text())
    assert cli == api and api["config"]["prompt"]["weight_init"] == 0.3
    assert api["config"]["prompt"]["anchored"] is True
    a, b = (load_file(str(tmp_path / d / "prompts.safetensors")) for d in ("cli", "api"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((tmp_path / "cli/metrics.json").read_text())
    assert {k: m[k] for k in ("mIoU", "AP50", "PQ")} == got
    assert m == {**json.loads((tmp_path / "api/metrics.json").read_text()), "wall_s": m["wall_s"]}
    for d in ("cli", "api"):
        assert (tmp_path / d / "loss.jsonl").read_text() == (tmp_path / "cli/loss.jsonl").read_text()


def test_every_train_flag_is_one_config_field():
    from ssprompt.api import LearnConfig
    from ssprompt.cli import build_parser, learn_config

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions
             if a.dest != "help" and a.help != argparse.SUPPRESS}   # renamed flags: refused
    own = {"task", "data", "out", "sfm", "checkpoint", "device", "precision"}  # load_sfm's
    to_field = {"no_select": "select", "set": "train"}
    fields = {f for f in LearnConfig.__dataclass_fields__}
    assert {to_field.get(d, d) for d in dests - own} == fields
    a = parser.parse_args(["train", "--out", "x", "--weight-init", "0.25", "--no-anchored",
                           "--no-select", "--set", "lr=0.5", "--steps", "7"])
    cfg = learn_config(a)
    assert cfg.weight_init == 0.25 and cfg.anchored is False and cfg.select is False
    spec = cfg.cell_spec("shift")
    assert spec.prompt.weight_init == 0.25 and spec.prompt.anchored is False
    assert spec.train.lr == 0.5 and spec.train.steps == 7 and not spec.selection.enabled
    assert learn_config(parser.parse_args(["train", "--out", "x"])) == LearnConfig()


def test_learn_prompts_refuses_unknown_settings():
    from ssprompt import learn_prompts
    from ssprompt.errors import UserError

    with pytest.raises(UserError, match="unknown setting stepz"):
        learn_prompts(None, "shift", stepz=3)


# ------------------------------------------------------------------ a backend from outside
class ToySFM(torch.nn.Module):
    """A backend that lives in this test module: no text encoder, so it is prompted with
    points only and scored class-agnostically. Its ``encode_texts`` must never be probed."""

    embed_dim, image_size, object_mask_threshold = 3, 32, 0.5

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale), requires_grad=False)

    @property
    def has_text_encoder(self) -> bool:
        return False

    def encode_image(self, images):
        from ssprompt.sfm import Features

        return Features({"x": torch.nn.functional.avg_pool2d(images, 4)})

    def encode_points(self, points):
        return torch.cat([points, torch.ones(len(points), 1)], -1) * self.scale

    def encode_texts(self, names):
        raise AssertionError("a text encoder was probed by encoding text")

    def decode(self, feats, spatial, semantic):
        from ssprompt.sfm import Outputs

        assert semantic is None
        x = feats.tensors["x"]
        masks = torch.einsum("bchw,nc->bnhw", x - 0.5, spatial)
        cls = torch.stack([masks.mean((2, 3)), torch.zeros(masks.shape[:2])], -1)
        return Outputs(masks, cls)

    def weights_hash(self) -> str:
        return f"toy-{float(self.scale)}"


def load_toy(checkpoint, device):
    from ssprompt.sfm import freeze

    return freeze(ToySFM(1.0 if checkpoint is None else float(checkpoint)).to(device))


def test_a_backend_registered_from_outside_loads_and_runs(monkeypatch):
    from ssprompt import Predictor, evaluate, load_sfm, register_backend
    from ssprompt.cli import main
    from ssprompt.prompts.promptset import PromptConfig, PromptSet
    from ssprompt.sfm import REGISTRY, PromptableSFM, backends_help

    monkeypatch.setitem(REGISTRY, "toy", REGISTRY["embedded"])   # restored after the test
    register_backend("toy", load_toy, "a toy backend from tests/test_api.py")
    assert "toy: a toy backend from tests/test_api.py" in backends_help()
    sfm = load_sfm("toy", device="cpu")
    assert isinstance(sfm, PromptableSFM) and sfm.weights_hash() == "toy-1.0"
    assert load_sfm("toy", "2", device="cpu").weights_hash() == "toy-2.0"
    m = evaluate(sfm, None, "shift", n_test=2, n_prompts=4)    # class-agnostic, no text probe
    assert {"mIoU", "AP50", "PQ"} <= set(m)
    pred = Predictor(sfm, n_prompts=4).predict(np.zeros((20, 30, 3), np.uint8))
    assert pred.semantic.shape == (20, 30)
    ps = PromptSet(sfm, ["a", "b"], PromptConfig("weighted", learners="spatial", n_prompts=4))
    assert ps.semantic is None and ps.num_trainable() > 0
    assert main(["eval", "--sfm", "toy", "--task", "shift", "--n-test", "2", "--n-prompts",
                 "4", "--device", "cpu"]) == 0
    # a "module:function" loader is imported on first use
    register_backend("toy", "test_api:load_toy", "the same, by name", checkpoint="a number")
    with pytest.raises(Exception, match="needs a checkpoint, a number"):
        load_sfm("toy", device="cpu")
    assert load_sfm("toy", "3", device="cpu").weights_hash() == "toy-3.0"


def test_library_errors_name_arguments_and_the_cli_names_flags(capsys):
    from ssprompt import load_sfm, open_dataset
    from ssprompt.cli import flag_message, main
    from ssprompt.errors import UserError
    from ssprompt.prompts.promptset import PromptConfig

    for call, field in ((lambda: load_sfm("nope"), "sfm"),
                        (lambda: load_sfm("embedded", "/nowhere.safetensors"), "checkpoint"),
                        (lambda: load_sfm(device="tpu"), "device"),
                        (lambda: open_dataset("nope", "test"), "task"),
                        (lambda: open_dataset("shift", "train", shots=0), "shots"),
                        (lambda: open_dataset("shift", "test", n_test=0), "n_test"),
                        (lambda: PromptConfig(kind="nope"), "kind"),
                        (lambda: PromptConfig(n_prompts=0), "n_prompts")):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert e.value.field == field and "--" not in msg and "\n" not in msg
        assert flag_message(e.value).startswith("--" + field.replace("_", "-") + " ")
    assert main(["eval", "--sfm", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssprompt: error: --sfm nope: unknown backend") and "\n" not in err
    assert flag_message(UserError("nowhere: not a folder", "images")) == \
        "--images nowhere: not a folder"


def test_has_text_encoder_is_a_property_of_every_packaged_backend():
    from ssprompt import load_sfm
    from ssprompt.sfm.embedded import EmbeddedSFM
    from ssprompt.sfm.sam3 import Sam3SFM
    from ssprompt.sfm.sam_common import PointPromptSFM

    assert load_sfm(device="cpu").has_text_encoder is True
    assert load_sfm(device="cpu").object_mask_threshold == 0.4
    for cls, has in ((EmbeddedSFM, True), (PointPromptSFM, False), (Sam3SFM, True)):
        assert isinstance(cls.__dict__.get("has_text_encoder"), property) or \
            any(isinstance(c.__dict__.get("has_text_encoder"), property) for c in cls.__mro__)
        assert cls.has_text_encoder.fget(None) is has


def test_readme_holds_the_docs_snippet():
    text = (ROOT / "README.md").read_text()
    assert "```python\n" + DOCS_SNIPPET.read_text() + "```" in text
