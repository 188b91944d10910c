"""What the peer tests (test_tip_adapter, test_persam) share besides conftest.py's fixtures:
zero-shot outputs, fitted states, a guard against reading test scenes, and the save / load /
predict round trip through ``learn_prompts``, ``Predictor`` and ``ssprompt predict``."""

from __future__ import annotations

import json

import numpy as np
import torch

from ssprompt.methods import make_options
from ssprompt.methods.base import build_state
from ssprompt.prompts.promptset import default_prompts


def zero_shot(sfm, names, feats):
    with torch.no_grad():
        return sfm.decode(feats, *default_prompts(sfm, names))


def prepared(sfm, shots, kind: str, steps: int = 1, **values):
    """A ``kind`` state prepared on ``shots`` (and trained ``steps`` steps where it trains)."""
    from ssprompt.engine.train import TrainConfig, train_many

    state = build_state(sfm, shots.class_names, make_options(kind, values),
                        generator=torch.Generator().manual_seed(0))
    train_many(sfm, [(state, shots, TrainConfig(steps=steps, batch=2))])
    return state


def no_test_scenes(monkeypatch):
    """Make any read of a test-split scene fail (what is fitted on the shots never sees test)."""
    import ssprompt.data.scenes as scenes

    real = scenes.make_scene

    def guarded(spec, split, *args, **kw):
        assert split != "test", "a test scene was read while fitting to the shots"
        return real(spec, split, *args, **kw)
    monkeypatch.setattr(scenes, "make_scene", guarded)


def same_outputs(a, b) -> bool:
    return torch.equal(a.mask_logits, b.mask_logits) and \
        torch.equal(a.class_logits, b.class_logits)


def round_trip(sfm, kind: str, tmp_path, test_images, **settings):
    """learn_prompts(kind) -> prompts file -> (the state rebuilt from the file decodes exactly
    as the trained one; ``Predictor`` on the file predicts as on the in-memory state; ``ssprompt
    predict`` writes the same semantic map). Returns the TrainedPrompts."""
    from cli_helpers import ssprompt
    from PIL import Image

    from ssprompt import Predictor
    from ssprompt.api import learn_prompts
    from ssprompt.methods.base import adapted_sfm, load_state
    from ssprompt.predict import semantic_png
    from ssprompt.prompts.promptset import LearnedPrompts, load_prompts
    from ssprompt.sfm.base import encode_images

    r = learn_prompts(sfm, "novel", kind=kind, shots=4, n_test=2, select=False,
                      out=tmp_path / "run", **settings)
    path = tmp_path / "run" / "prompts.safetensors"
    loaded = load_prompts(path)
    assert loaded.meta["kind"] == kind
    again = load_state(sfm, loaded)
    feats = encode_images(sfm, test_images)
    with torch.no_grad():
        want = adapted_sfm(sfm, r.prompt_set).decode(feats, *r.prompt_set())
        got = adapted_sfm(sfm, again).decode(feats, *again())
    assert same_outputs(got, want)
    state = {f"learner.{k}": v for k, v in r.prompt_set.state_dict().items()}
    with torch.no_grad():
        memory = LearnedPrompts(*r.prompt_set(), dict(loaded.meta), state)
    p_file = Predictor(sfm, path).predict(test_images[0])
    p_mem = Predictor(sfm, memory).predict(test_images[0])
    assert torch.equal(p_file.semantic, p_mem.semantic)
    # the command line reads the same file
    out = tmp_path / "pred"
    cli = ssprompt("predict", "--task", "novel", "--n-test", 1, "--prompts", path, "--out", out,
                   "--device", "cpu")
    assert cli.returncode == 0, cli.stderr[-2000:]
    name = json.loads((out / "predictions.json").read_text())["images"][0]["file_name"]
    png = np.asarray(Image.open(out / "semantic" / name))
    assert np.array_equal(png, semantic_png(p_file.semantic.cpu().numpy(),
                                            len(loaded.class_names)))
    return r
