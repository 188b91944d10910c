"""CoOp (``ssprompt.methods.coop``: learned context vectors at the frozen text encoder's token
input): zero-shot with no context and the phrase prompt at learning rate 0, bit for bit; it
trains on the embedded SFM; its recipe's optimiser and schedule; its saved form through
``Predictor``, ``ssprompt train`` and ``ssprompt predict``. (Every backend:
``tests/sfm/test_conformance.py::test_every_method_on_every_backend``; SAM and SAM 2 have no
text encoder and are refused.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssprompt.errors import UserError
from ssprompt.methods import make_options
from ssprompt.methods.base import build_state, identity_at_init, load_state
from ssprompt.methods.coop import WARMUP_CONS_LR
from ssprompt.prompts.semantic import engineered_semantic
from ssprompt.sfm.base import encode_images

NAMES = ["cat", "traffic light", "sky"]
PHRASE = "a photo of a"


@pytest.fixture(scope="module")
def feats(tiny_sfm):
    g = np.random.RandomState(0)
    return encode_images(tiny_sfm, [g.randint(0, 255, (64, 80, 3)).astype(np.uint8),
                                    g.randint(0, 255, (90, 60, 3)).astype(np.uint8)])


def _coop(sfm, names=NAMES, seed=0, **values):
    return build_state(sfm, names, make_options("coop", {"n_prompts": 16, **values}),
                       generator=torch.Generator().manual_seed(seed))


def test_no_context_is_zero_shot_bit_for_bit(tiny_sfm, feats):
    assert identity_at_init(tiny_sfm, "coop", NAMES, feats, n_prompts=16) is True
    with torch.no_grad():
        assert torch.equal(_coop(tiny_sfm, n_ctx=0, suffix="")()[1],
                           tiny_sfm.encode_texts(NAMES))


def test_phrase_init_is_the_template_prompt_bit_for_bit(tiny_sfm, feats):
    """ctx_init "a photo of a": the class prompts are the SFM's own encodings of
    "a photo of a {name}." (the first template of prompt engineering's ensemble)."""
    state = _coop(tiny_sfm, ctx_init=PHRASE)
    assert state.ctx.shape == (4, 384)   # M = the phrase's tokens, MiniLM's width
    with torch.no_grad():
        got = state()[1]
        want = tiny_sfm.encode_texts([f"{PHRASE} {n}." for n in NAMES])
        assert torch.equal(got, want)
        out = state.decode(tiny_sfm, feats, *state())
        ref = tiny_sfm.decode(feats, state.spatial, want)
    assert torch.equal(out.mask_logits, ref.mask_logits)
    assert torch.equal(out.class_logits, ref.class_logits)
    # prompt engineering with that single template: the same direction, rescaled to the
    # bare names' norm
    single = engineered_semantic(tiny_sfm, NAMES, (f"{PHRASE} {{}}.",))
    torch.testing.assert_close(torch.nn.functional.normalize(single, dim=-1),
                               torch.nn.functional.normalize(got, dim=-1))


def test_random_context_and_gradients_through_the_frozen_text_encoder(tiny_sfm, feats):
    state = _coop(tiny_sfm)
    assert state.ctx.shape == (16, 384) and state.num_trainable() == 16 * 384
    assert abs(float(state.ctx.detach().std()) - 0.02) < 0.002
    assert torch.equal(_coop(tiny_sfm).ctx, state.ctx)        # seeded by the generator
    assert not torch.equal(_coop(tiny_sfm, seed=1).ctx, state.ctx)
    out = state.decode(tiny_sfm, feats, *state())
    (out.class_logits.float().mean()).backward()
    assert state.ctx.grad is not None and float(state.ctx.grad.abs().sum()) > 0
    assert all(p.grad is None for p in tiny_sfm.parameters())
    from ssprompt.sfm.modeling.text_encoder import _minilm
    model = _minilm()[1]
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not model.get_input_embeddings()._forward_hooks     # the hook is gone
    # restore_defaults: exactly the zero-shot class prompts
    state.restore_defaults(tiny_sfm)
    with torch.no_grad():
        assert torch.equal(state()[1], tiny_sfm.encode_texts(NAMES))


def test_no_text_encoder_is_refused(tiny_sfm):
    class Spatial:
        has_text_encoder = False

    with pytest.raises(UserError, match="no text encoder"):
        build_state(Spatial(), NAMES, make_options("coop"))
    with pytest.raises(UserError, match="n_ctx"):
        make_options("coop", {"n_ctx": -1})


def test_recipe_sgd_cosine_and_one_warmup_epoch(tiny_sfm):
    from ssprompt.engine.train import TrainConfig

    state = _coop(tiny_sfm)
    cfg = TrainConfig(steps=100, batch=8)
    state.prepare(tiny_sfm, None, [None] * 16)        # k = 16 shots: an epoch is 2 steps
    opt = state.optimizer(state.param_groups(cfg), cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["weight_decay"] == 5e-4
    lrs = [state.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == lrs[1] == pytest.approx(WARMUP_CONS_LR)
    assert lrs[2] == pytest.approx(0.002)
    assert lrs[52] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    state.prepare(tiny_sfm, None, [None] * 3)         # k = 3, batch 8: an epoch is 1 step
    assert state.lr_at(0, 100, cfg) == pytest.approx(WARMUP_CONS_LR)
    assert state.lr_at(1, 100, cfg) == pytest.approx(0.002)
    assert _coop(tiny_sfm, coop_lr=0.0).lr_at(0, 100, cfg) == 0.0


def test_lr0_equals_the_template_prompt_and_training_moves_it(tmp_path):
    """On the embedded SFM, task novel: at coop_lr 0 the trained prompts are exactly the
    template's; at CoOp's lr, 10 steps lower the loss and change the class prompts; the saved
    file rebuilds the state and predicts."""
    from ssprompt import Predictor, load_sfm
    from ssprompt.api import learn_prompts, workspace
    from ssprompt.data import open_dataset
    from ssprompt.prompts.promptset import load_prompts

    sfm = load_sfm()
    ws = workspace(sfm)
    kw = dict(shots=4, steps=10, select=False, n_test=8, ws=ws, train={"log_every": 1})
    frozen = learn_prompts(sfm, "novel", kind="coop", ctx_init=PHRASE, coop_lr=0.0, **kw)
    names = frozen.class_names
    with torch.no_grad():
        template = sfm.encode_texts([f"{PHRASE} {n}." for n in names])
    assert len(frozen.log) == 10 and torch.equal(frozen.semantic, template)

    run = learn_prompts(sfm, "novel", kind="coop", **kw)
    losses = [r["loss"] for r in run.log]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert run.metrics["trained_params"] == 16 * 384
    assert run.metrics["z_moved"]["ctx"] > 0
    start = build_state(sfm, names, run.prompt_set.options,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(run.semantic, start()[1], atol=1e-4)
    path = run.save(tmp_path / "run") / "prompts.safetensors"
    loaded = load_prompts(path)
    assert loaded.meta["kind"] == "coop"
    again = load_state(sfm, loaded)
    with torch.no_grad():
        assert torch.equal(again()[1], run.semantic)
        assert torch.equal(again()[1], loaded.semantic)
    image = open_dataset("novel", "test", n_test=1)[0].image
    pred = Predictor(sfm, str(path)).predict(image)
    assert pred.semantic.shape == image.shape[:2]


def test_cli_train_kind_coop_then_predict(tmp_path):
    from cli_helpers import ssprompt
    from PIL import Image

    from ssprompt.data import open_dataset

    out = tmp_path / "run"
    r = ssprompt("train", "--task", "novel", "--kind", "coop", "--ctx-init", PHRASE,
                 "--shots", "2", "--steps", "2", "--no-select", "--n-test", "2", "--out", out,
                 "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "imgs").mkdir()
    Image.fromarray(open_dataset("novel", "test", n_test=1)[0].image).save(
        tmp_path / "imgs" / "a.png")
    r = ssprompt("predict", "--images", tmp_path / "imgs", "--prompts",
                 out / "prompts.safetensors", "--out", tmp_path / "pred", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "pred" / "predictions.json").exists()


def test_study_variants_name_the_peers(tmp_path):
    from ssprompt.study.config import load_config

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\ntasks: [novel]\nseeds: [0]\nvariants:\n"
                   "  - {name: zs, kind: zero_shot, role: baseline}\n"
                   "  - {name: coop, kind: coop}\n"
                   "  - {name: coop-photo, method: coop, ctx_init: a photo of a}\n"
                   "  - {name: lora, kind: lora, rank: 2}\n")
    c = load_config(cfg)
    assert c.variant("coop").prompt.n_ctx == 16 and c.variant("coop").prompt.ctx_init == ""
    assert c.variant("coop-photo").prompt.ctx_init == PHRASE
    assert c.variant("lora").prompt.rank == 2 and not c.variant("lora").fixed


def test_sam3_phrase_init_is_the_template_prompt_bit_for_bit(tmp_path):
    """SAM 3's CLIP text path (a tiny random checkpoint): the context replaces the phrase's
    token embeddings after the start token; at init the per-token class prompts are exactly
    ``encode_texts`` of "a photo of a {name}."."""
    pytest.importorskip("transformers")
    from sfm.tiny import SAVE

    from ssprompt.sfm import load_sfm

    sfm = load_sfm("sam3", str(SAVE["sam3"](tmp_path, 0)), device="cpu")
    state = _coop(sfm, ctx_init=PHRASE)
    with torch.no_grad():
        assert torch.equal(state()[1], sfm.encode_texts([f"{PHRASE} {n}." for n in NAMES]))
    random = _coop(sfm)
    assert random.ctx.shape == (16, sfm.model.text_encoder.get_input_embeddings().weight
                                .shape[1])
    (random()[1].sum()).backward()
    assert float(random.ctx.grad.abs().sum()) > 0
    assert all(p.grad is None for p in sfm.parameters())
