"""The method seam (``ssprompt.methods``): the registry, options declared once (YAML keys,
``train`` flags, ``learn_prompts`` keywords), identity at init, the saved form, and a method
that adapts ``decode`` trained through the same loop."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch

from ssprompt.errors import UserError
from ssprompt.methods import (
    KINDS,
    METHODS,
    Options,
    add_method_flags,
    get_method,
    make_options,
    method_keywords,
    option_fields,
    register_method,
)
from ssprompt.methods.base import (
    MethodState,
    adapted_sfm,
    build_state,
    identity_at_init,
    load_state,
)
from ssprompt.prompts.promptset import PromptSet, load_prompts, save_prompts
from ssprompt.sfm.base import encode_images

NAMES = ["cat", "traffic light", "sky"]


@pytest.fixture(scope="module")
def train_split():
    from ssprompt.data.scenes import SceneSplit

    return SceneSplit("shift", "train", shots=4, seed=0)


@pytest.fixture(scope="module")
def feats(tiny_sfm):
    g = np.random.RandomState(0)
    return encode_images(tiny_sfm, [g.randint(0, 255, (64, 80, 3)).astype(np.uint8),
                                    g.randint(0, 255, (90, 60, 3)).astype(np.uint8)])


def test_every_kind_is_a_registered_method():
    assert set(KINDS) <= set(METHODS)
    assert [n for n, m in METHODS.items() if not m.uses_shots] == ["zero_shot",
                                                                   "prompt_engineering"]
    with pytest.raises(UserError, match="unknown method.*'default' is now 'zero_shot'"):
        get_method("default")


def test_options_declared_once_give_keys_flags_and_keywords():
    from ssprompt.api import LearnConfig

    own = option_fields("weighted")
    assert set(own) == {"learners", "n_prompts", "init", "weight_shape", "weight_init",
                        "anchored"}
    assert own["weight_init"].default == 0.5 and own["n_prompts"].default is None
    assert set(method_keywords()) <= {f.name for f in fields(LearnConfig)}
    assert all(getattr(LearnConfig(), k) is None for k in method_keywords())
    p = argparse.ArgumentParser()
    add_method_flags(p)
    a = p.parse_args(["--method", "average", "--weight-init", "0.3", "--no-anchored"])
    assert (a.kind, a.weight_init, a.anchored, a.learners) == ("average", 0.3, False, None)
    # None: the dataclass default; an option the method does not have: refused in one line
    assert make_options("weighted", {"weight_init": None}).weight_init == 0.5
    assert make_options("learned_only").init == "random"
    with pytest.raises(UserError, match="colour: not an option of method weighted"):
        make_options("weighted", {"colour": "red"})


@pytest.mark.parametrize("name", [n for n in METHODS if METHODS[n].identity is not None])
def test_identity_at_init_equals_the_reference_exactly(tiny_sfm, feats, name):
    assert identity_at_init(tiny_sfm, name, NAMES, feats, n_prompts=16) is True


def test_saved_form_round_trips(tiny_sfm, feats, tmp_path):
    state = build_state(tiny_sfm, NAMES, make_options("weighted", {"n_prompts": 16}),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in state.trainable():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_prompts(tmp_path / "p.safetensors", state, {"weights_hash": tiny_sfm.weights_hash(),
                                                     "config": {"prompt": {
                                                         "kind": "weighted", "n_prompts": 16}}})
    loaded = load_prompts(tmp_path / "p.safetensors")
    spatial, semantic, meta = loaded           # still a 3-tuple
    want = state()
    assert torch.equal(spatial, want[0]) and torch.equal(semantic, want[1])
    assert meta["kind"] == "weighted" and meta["class_names"] == NAMES
    assert any(k.startswith("learner.") for k in loaded.state)
    again = load_state(tiny_sfm, loaded)       # the state rebuilt from the file
    assert all(torch.equal(a, b) for a, b in zip(again(), want))
    assert adapted_sfm(tiny_sfm, again) is tiny_sfm   # SSPrompt kinds decode as the SFM does


@dataclass
class _ShiftOptions(Options):
    shift: float = 0.0


class _Shifted(MethodState):
    """A toy peer that adapts decoding: SSPrompt's prompts, then ``+ shift`` on every class
    logit (a stand-in for a post-decode adapter such as Tip-Adapter)."""

    def __init__(self, sfm, class_names, options, generator=None, is_thing=None):
        super().__init__()
        self.options, self.class_names, self.is_thing = options, class_names, is_thing
        self.inner = PromptSet(sfm, class_names, make_options(
            "weighted", {"n_prompts": options.n_prompts}), generator=generator)

    def forward(self):
        return self.inner()

    def decode(self, sfm, feats, spatial, semantic):
        out = sfm.decode(feats, spatial, semantic)
        out.class_logits = out.class_logits + self.options.shift
        return out

    def prepare(self, sfm, feats, targets):
        self.inner.prepare(sfm, feats, targets)

    def param_groups(self, cfg):
        return self.inner.param_groups(cfg)

    def regulariser(self):
        return self.inner.regulariser()


@pytest.fixture
def shifted():
    register_method("toy_shift", _ShiftOptions, _Shifted, "a toy post-decode adapter",
                    identity={"shift": 0.0})
    yield "toy_shift"
    METHODS.pop("toy_shift")


def test_a_new_method_is_its_module_and_a_registry_line(tiny_sfm, feats, shifted, tmp_path):
    from ssprompt.api import LearnConfig  # noqa: F401  (built before the toy: no keyword)
    from ssprompt.study.config import load_config

    assert identity_at_init(tiny_sfm, shifted, NAMES, feats, n_prompts=16) is True
    state = build_state(tiny_sfm, NAMES, make_options(shifted, {"shift": 2.0, "n_prompts": 16}))
    assert state.adapts_decode and not PromptSet.adapts_decode.fget(state.inner)
    plain = tiny_sfm.decode(feats, *state())
    out = adapted_sfm(tiny_sfm, state).decode(feats, *state())
    assert torch.equal(out.class_logits, plain.class_logits + 2.0)
    # a study variant names it with ``method:``; its options are the variant's keys
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\ntasks: [shift]\nseeds: [0]\nvariants:\n"
                   "  - {name: zs, kind: zero_shot, role: baseline}\n"
                   "  - {name: toy, method: toy_shift, shift: 1.5, n_prompts: 16}\n")
    v = load_config(cfg).variant("toy")
    assert v.kind == shifted and v.prompt.shift == 1.5 and not v.fixed
    cfg.write_text(cfg.read_text().replace("shift: 1.5", "weight_init: 0.3"))
    with pytest.raises(UserError, match="weight_init"):
        load_config(cfg)


def test_a_decode_adapting_state_trains_alone_in_the_shared_loop(tiny_sfm, shifted,
                                                                 train_split):
    """Shift 0: the toy decodes as SSPrompt does; trained beside a plain SSPrompt set (decoded
    on its own, one pass each), both end where SSPrompt alone ends."""
    from ssprompt.engine.train import TrainConfig, train_many

    cfg = TrainConfig(steps=3, batch=2, lr=1e-2)
    names = train_split.class_names

    def weighted():
        return build_state(tiny_sfm, names, make_options("weighted", {"n_prompts": 16}),
                           generator=torch.Generator().manual_seed(0))

    alone = weighted()
    train_many(tiny_sfm, [(alone, train_split, cfg)])
    toy = build_state(tiny_sfm, names, make_options(shifted, {"n_prompts": 16}),
                      generator=torch.Generator().manual_seed(0))
    plain = weighted()
    logs = train_many(tiny_sfm, [(toy, train_split, cfg), (plain, train_split, cfg)])
    assert all(len(log) > 0 for log in logs)
    for got in (toy(), plain()):
        for a, b in zip(got, alone()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
