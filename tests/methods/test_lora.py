"""Decoder LoRA (``ssprompt.methods.lora``, SAMed's recipe on the frozen SFM's mask decoder):
step 0 is zero-shot bit for bit, the shared SFM is unchanged by decoding and training, it
trains on the embedded SFM, and its saved form predicts through ``Predictor`` and the CLI.
(Every backend: ``tests/sfm/test_conformance.py::test_every_method_on_every_backend``.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssprompt.methods import make_options
from ssprompt.methods.base import adapted_sfm, build_state, identity_at_init, load_state
from ssprompt.methods.lora import lora_targets, lr_factor, warmup_steps
from ssprompt.sfm.base import encode_images

NAMES = ["cat", "traffic light", "sky"]


@pytest.fixture(scope="module")
def feats(tiny_sfm):
    g = np.random.RandomState(0)
    return encode_images(tiny_sfm, [g.randint(0, 255, (64, 80, 3)).astype(np.uint8),
                                    g.randint(0, 255, (90, 60, 3)).astype(np.uint8)])


def _snapshot(sfm):
    return {k: v.clone() for k, v in sfm.state_dict().items()}, \
        {n: p for n, p in sfm.named_parameters()}


def _unchanged(sfm, snap) -> bool:
    values, params = snap
    now = sfm.state_dict()
    return values.keys() == now.keys() and all(torch.equal(values[k], now[k]) for k in values) \
        and all(p is params[n] and isinstance(p, torch.nn.Parameter) and not p.requires_grad
                for n, p in sfm.named_parameters())


def test_step0_is_zero_shot_bit_for_bit(tiny_sfm, feats):
    assert identity_at_init(tiny_sfm, "lora", NAMES, feats, n_prompts=16) is True
    state = build_state(tiny_sfm, NAMES, make_options("lora", {"n_prompts": 16}),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = state.decode(tiny_sfm, feats, *state())
        ref = tiny_sfm.decode(feats, *state())
    assert torch.equal(got.mask_logits, ref.mask_logits)
    assert torch.equal(got.class_logits, ref.class_logits)
    assert all(float(b.detach().abs().sum()) == 0 for b in state.lora_B)      # B = 0
    assert all(float(a.detach().abs().sum()) > 0 for a in state.lora_A)       # A Kaiming


def test_targets_are_the_q_and_v_of_every_decoder_attention(tiny_sfm):
    targets = lora_targets(tiny_sfm)
    layers = len(tiny_sfm.decoder.layers)
    assert len(targets) == 2 * layers        # cross + self attention per layer (packed q, k, v)
    e = tiny_sfm.embed_dim
    assert all(name == "in_proj_weight" and rows == [(0, e), (2 * e, 3 * e)]
               for _, name, rows in targets)
    state = build_state(tiny_sfm, NAMES, make_options("lora", {"n_prompts": 16}))
    # per target: q and v, each A (4, D) and B (D, 4)
    assert state.num_trainable() == len(targets) * 2 * 2 * 4 * e
    assert make_options("lora").rank == 4 and make_options("lora").lora_lr == 5e-3


def test_decoding_leaves_the_shared_sfm_unchanged(tiny_sfm, feats):
    state = build_state(tiny_sfm, NAMES, make_options("lora", {"n_prompts": 16}),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in state.lora_B:
            b.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    snap = _snapshot(tiny_sfm)
    with torch.no_grad():
        zero_shot = tiny_sfm.decode(feats, *state())
    out = state.decode(tiny_sfm, feats, *state())
    (out.mask_logits.mean() + out.class_logits.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in state.trainable())
    assert any(float(p.grad.abs().sum()) > 0 for p in state.lora_A)
    assert all(p.grad is None for p in tiny_sfm.parameters())
    assert _unchanged(tiny_sfm, snap)
    assert not torch.equal(out.mask_logits.detach(), zero_shot.mask_logits)   # it adapts
    with torch.no_grad():   # and the SFM still decodes as before, outside ``decode``
        again = tiny_sfm.decode(feats, *state())
    assert torch.equal(again.mask_logits, zero_shot.mask_logits)

    class Boom(RuntimeError):
        pass

    def fail(*a, **kw):
        raise Boom
    tiny_sfm.decode, real = fail, tiny_sfm.decode
    try:
        with pytest.raises(Boom):
            state.decode(tiny_sfm, feats, *state())
    finally:
        del tiny_sfm.decode
    assert tiny_sfm.decode == real and _unchanged(tiny_sfm, snap)   # restored on error too
    state.restore_defaults(tiny_sfm)
    with torch.no_grad():
        back = state.decode(tiny_sfm, feats, *state())
    assert torch.equal(back.mask_logits, zero_shot.mask_logits)


def test_schedule_is_samed_mapped_onto_the_step_budget():
    assert warmup_steps(100) == 2                    # ceil(100 * 250 / 18,600)
    assert lr_factor(0, 100) == 0.5 and lr_factor(1, 100) == 1.0
    assert lr_factor(2, 100) == 1.0                  # poly decay starts at the peak
    assert lr_factor(51, 100) == pytest.approx((1 - 49 / 100) ** 0.9)
    assert all(lr_factor(s, 100) >= lr_factor(s + 1, 100) > 0 for s in range(1, 99))


def test_trains_saves_loads_and_predicts(tmp_path):
    """On the embedded SFM, task novel: 10 steps lower the loss and change the outputs; the
    run's frozen SFM is unchanged; the saved file rebuilds the state (``load_state``) and
    ``Predictor`` decodes through it; ``ssprompt predict`` reads it."""
    from ssprompt import Predictor, load_sfm
    from ssprompt.api import learn_prompts
    from ssprompt.data import open_dataset
    from ssprompt.prompts.promptset import load_prompts

    sfm = load_sfm()
    snap = _snapshot(sfm)
    run = learn_prompts(sfm, "novel", kind="lora", shots=4, steps=10, select=False, n_test=8,
                        train={"log_every": 1})
    losses = [r["loss"] for r in run.log]
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert run.metrics["trained_params"] == 12288   # 3 layers x 2 attentions x (q, v) x 4 x 256
    assert run.metrics["z_moved"]["decoder"] > 0
    assert _unchanged(sfm, snap)
    path = run.save(tmp_path / "run") / "prompts.safetensors"
    loaded = load_prompts(path)
    state = load_state(sfm, loaded)
    assert loaded.meta["kind"] == "lora"
    assert all(torch.equal(a, b) for a, b in zip(state.lora_B, run.prompt_set.lora_B))
    image = open_dataset("novel", "test", n_test=1)[0].image
    pred = Predictor(sfm, str(path))
    assert pred.sfm is not sfm                      # decodes through the LoRA state
    got = pred.predict(image)
    zero = Predictor(sfm, class_names=run.class_names).predict(image)
    feats = encode_images(sfm, [image])
    with torch.no_grad():
        lora_out = adapted_sfm(sfm, state).decode(feats, *state())
        zs_out = sfm.decode(feats, *state())
    assert not torch.equal(lora_out.mask_logits, zs_out.mask_logits)
    assert got.semantic.shape == zero.semantic.shape
    assert _unchanged(sfm, snap)
    # the CLI, once
    from cli_helpers import ssprompt
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.fromarray(image).save(tmp_path / "imgs" / "img.png")
    r = ssprompt("predict", "--images", tmp_path / "imgs", "--prompts", path,
                 "--out", tmp_path / "pred", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "pred" / "predictions.json").exists()
