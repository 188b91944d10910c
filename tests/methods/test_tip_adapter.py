"""Tip-Adapter and Tip-Adapter-F on mask embeddings (``ssprompt.methods.tip_adapter``): alpha 0
is zero-shot bit for bit, the cache fitted on a few shots of task ``novel`` changes the
predictions, alpha and beta are chosen on the shots (never on test), -F trains its keys, and the
saved form predicts the same through ``Predictor`` and ``ssprompt predict``."""

from __future__ import annotations

import pytest
import torch

from methods.peer_helpers import no_test_scenes, prepared, round_trip, same_outputs, zero_shot
from ssprompt.errors import UserError
from ssprompt.geometry import geometry_of
from ssprompt.methods import make_options
from ssprompt.methods.base import adapted_sfm, build_state, identity_at_init
from ssprompt.methods.tip_adapter import loo_choice


def test_alpha_zero_is_zero_shot_bit_for_bit(sfm, shots, feats):
    names = shots.class_names
    assert identity_at_init(sfm, "tip_adapter", names, feats) is True
    assert identity_at_init(sfm, "tip_adapter_f", names, feats) is True
    state = prepared(sfm, shots, "tip_adapter", tip_alpha=0.0)
    assert state.keys.shape[0] > 0 and float(state.alpha) == 0.0   # a cache, weighed 0
    with torch.no_grad():
        out = adapted_sfm(sfm, state).decode(feats, *state())
    assert same_outputs(out, zero_shot(sfm, names, feats))


def test_the_cache_changes_predictions_and_is_chosen_on_the_shots(sfm, shots, feats,
                                                                   monkeypatch):
    no_test_scenes(monkeypatch)             # prepare (the alpha / beta search) never reads test
    state = prepared(sfm, shots, "tip_adapter")
    o = state.options
    assert float(state.alpha) in o.tip_alphas and float(state.beta) in o.tip_betas
    assert len(state.search) == len(o.tip_alphas) * len(o.tip_betas)
    # keys: one per matched query, L2-normalised; values one-hot over the classes
    n_segments = sum(len(shots[i].targets(geometry_of(sfm))[0]) for i in range(len(shots)))
    assert state.keys.shape[0] == n_segments
    torch.testing.assert_close(state.keys.norm(dim=-1), torch.ones(n_segments))
    assert torch.equal(state.values.sum(-1), torch.ones(n_segments))
    assert not state.trainable() and state.needs_shots
    monkeypatch.undo()
    zs = zero_shot(sfm, shots.class_names, feats)
    with torch.no_grad():
        out = adapted_sfm(sfm, state).decode(feats, *state())
    assert torch.equal(out.mask_logits, zs.mask_logits)        # masks are the SFM's
    assert torch.equal(out.class_logits[..., -1], zs.class_logits[..., -1])   # no object too
    if float(state.alpha) > 0:
        assert not torch.equal(out.class_logits, zs.class_logits)
    # a pure function of the shots
    again = prepared(sfm, shots, "tip_adapter")
    assert torch.equal(again.keys, state.keys) and float(again.alpha) == float(state.alpha)


def test_fixed_alpha_beta_change_predictions(sfm, shots, feats):
    state = prepared(sfm, shots, "tip_adapter", tip_alpha=1.17, tip_beta=1.0)
    assert state.search is None and float(state.alpha) == pytest.approx(1.17)
    with torch.no_grad():
        out = adapted_sfm(sfm, state).decode(feats, *state())
    assert not torch.equal(out.class_logits, zero_shot(sfm, shots.class_names, feats)
                           .class_logits)


def test_leave_one_image_out_keeps_zero_when_the_cache_misleads():
    """One query per image, the SFM saying class 0 for every one. Two images of classes 0 and
    1 with identical features: each one's cache (the other's key) votes for the wrong class,
    so alpha 0 wins. Three images (classes 1, 0, 1) with class-specific features: the cache
    of the other two votes right, and a positive alpha wins."""
    z = torch.tensor([[1.0, 0.0, -5.0]])
    values = torch.eye(2)
    same = [torch.tensor([[1.0, 0.0]])] * 2
    a, _, _ = loo_choice(same, [z, z], [torch.tensor([0]), torch.tensor([1])], torch.cat(same),
                         values, torch.tensor([0, 1]), (0, 2, 4), (1,))
    assert a == 0
    f = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    labels = [torch.tensor([1]), torch.tensor([0]), torch.tensor([1])]
    a, b, table = loo_choice(f, [z] * 3, labels, torch.cat(f), values[[1, 0, 1]],
                             torch.tensor([0, 1, 2]), (0, 2, 4), (1, 3))
    assert (a, b) == (2, 3) and table[(a, b)] == 3 > table[(0, 1)] == 1


def test_f_trains_its_keys(sfm, shots):
    free = prepared(sfm, shots, "tip_adapter_f", steps=1, tip_lr=0.0)
    tuned = prepared(sfm, shots, "tip_adapter_f", steps=3)
    assert float(tuned.alpha) > 0                    # a cache at alpha 0 could not learn
    assert tuned.num_trainable() == tuned.keys.numel() > 0
    assert [g["eps"] for g in tuned.param_groups(type("C", (), {"lr": 3e-3})())] == [1e-4]
    assert not torch.equal(tuned.keys, free.keys)
    torch.testing.assert_close(free.keys.norm(dim=-1), torch.ones(free.keys.shape[0]))


def test_class_agnostic_backends_are_refused(tiny_sfm):
    class Agnostic:
        has_text_encoder = False

        def __getattr__(self, name):
            return getattr(tiny_sfm, name)

    with pytest.raises(UserError, match="predicts no classes"):
        build_state(Agnostic(), ["a", "b"], make_options("tip_adapter"))
    with pytest.raises(UserError, match="tip_alphas"):
        make_options("tip_adapter", {"tip_alphas": "1,x"})


def test_saved_state_predicts_the_same_and_the_cli_reads_it(sfm, tmp_path, test_images):
    r = round_trip(sfm, "tip_adapter_f", tmp_path, test_images, steps=2, batch=2)
    assert r.prompt_set.keys.shape[0] > 0


def test_a_study_variant_and_train_flags_name_it(tmp_path):
    import argparse

    from ssprompt.methods import add_method_flags
    from ssprompt.study.config import load_config

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\ntasks: [novel]\nseeds: [0]\nvariants:\n"
                   "  - {name: zs, kind: zero_shot, role: baseline}\n"
                   "  - {name: tip, kind: tip_adapter, tip_alphas: '0,1'}\n"
                   "  - {name: tipf, kind: tip_adapter_f, tip_lr: 0.002}\n")
    c = load_config(cfg)
    assert c.variant("tip").prompt.tip_alphas == (0.0, 1.0) and not c.variant("tip").fixed
    assert c.variant("tipf").prompt.tip_lr == 0.002
    p = argparse.ArgumentParser()
    add_method_flags(p)
    a = p.parse_args(["--kind", "tip_adapter", "--tip-alpha", "2", "--tip-betas", "1,3"])
    assert (a.kind, a.tip_alpha, a.tip_betas) == ("tip_adapter", 2.0, "1,3")


def test_prepared_on_sam3(tmp_path):
    """Fitted to blob shots, Tip-Adapter decodes SAM 3's (concept, query) pairs: only the class
    columns move (the conformance suite covers the unprepared state on every backend)."""
    pytest.importorskip("transformers")
    from sfm.tiny import SAVE

    from methods.test_persam import blob_shots
    from ssprompt.sfm import load_sfm

    sam3 = load_sfm("sam3", str(SAVE["sam3"](tmp_path / "sam3", 0)), device="cpu")
    feats, targets = blob_shots(sam3)
    targets = [(torch.tensor([i % 2]), m) for i, (_, m) in enumerate(targets)]
    state = build_state(sam3, ["cat", "dog"], make_options("tip_adapter", {"n_prompts": 16,
                                                                          "tip_alpha": 1.0}))
    state.prepare(sam3, feats, targets)
    assert state.keys.shape[0] == 3 and state.search is not None
    with torch.no_grad():
        zs = sam3.decode(feats, *state())
        out = adapted_sfm(sam3, state).decode(feats, *state())
    assert torch.equal(out.mask_logits, zs.mask_logits)
    assert torch.equal(out.class_logits[..., -1], zs.class_logits[..., -1])
    assert not torch.equal(out.class_logits, zs.class_logits)
