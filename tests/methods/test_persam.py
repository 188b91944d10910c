"""PerSAM and PerSAM-F (``ssprompt.methods.persam``): with no prototype point it decodes exactly
as zero-shot, prototypes fitted on a few shots of task ``novel`` place one prompt per class on
each image (changing the predictions, never reading test), PerSAM-F fits its 2 weights over a
tiny SAM's multimask outputs and is refused where there are none, and the saved form predicts
the same through ``Predictor`` and ``ssprompt predict``."""

from __future__ import annotations

import pytest
import torch

from methods.peer_helpers import no_test_scenes, prepared, round_trip, same_outputs, zero_shot
from ssprompt.errors import UserError
from ssprompt.geometry import geometry_of
from ssprompt.methods import make_options
from ssprompt.methods.base import adapted_sfm, build_state, identity_at_init
from ssprompt.methods.persam import PERSAM_F_INIT, encoder_map
from ssprompt.prompts.promptset import default_prompts
from ssprompt.sfm.base import encode_images


def decoded(sfm, state, feats):
    with torch.no_grad():
        return adapted_sfm(sfm, state).decode(feats, *state())


def test_no_prototype_point_is_zero_shot_bit_for_bit(sfm, shots, feats):
    names = shots.class_names
    assert identity_at_init(sfm, "persam", names, feats) is True
    state = prepared(sfm, shots, "persam", points_per_class=0, keep_grid=True)
    assert state.seen.sum() > 0                    # prototypes, but no point placed
    assert same_outputs(decoded(sfm, state, feats), zero_shot(sfm, names, feats))
    # before prepare (no prototype) and after restore_defaults: the grid, zero-shot
    fresh = build_state(sfm, names, make_options("persam"))
    assert same_outputs(decoded(sfm, fresh, feats), zero_shot(sfm, names, feats))
    state = prepared(sfm, shots, "persam")
    state.restore_defaults(sfm)
    assert same_outputs(decoded(sfm, state, feats), zero_shot(sfm, names, feats))
    with pytest.raises(UserError, match="no prompt left"):
        make_options("persam", {"points_per_class": 0})


def test_prototypes_place_one_prompt_per_class(sfm, shots, feats, monkeypatch):
    no_test_scenes(monkeypatch)              # prepare never reads test
    state = prepared(sfm, shots, "persam")
    monkeypatch.undo()
    present = sorted({int(c) for i in range(len(shots))
                      for c in shots[i].targets(geometry_of(sfm))[0]})
    assert torch.nonzero(state.seen).flatten().tolist() == present
    assert state.num_trainable() == 0 and not state.trainable() and state.needs_shots
    # a prototype is the mean encoder feature under its class's masks
    fmap = encoder_map(encode_images(sfm, [shots[0].image]))
    assert state.prototypes.shape == (len(shots.class_names), fmap.shape[1])
    out = decoded(sfm, state, feats)
    zs = zero_shot(sfm, shots.class_names, feats)
    assert out.mask_logits.shape[1] == len(present)          # the class prompts replace the grid
    assert out.class_logits.shape[-1] == zs.class_logits.shape[-1]
    # the points come from each image's own features: the queries differ between images
    assert not torch.equal(out.mask_logits[0], out.mask_logits[1])
    two = prepared(sfm, shots, "persam", points_per_class=2, keep_grid=True)
    both = decoded(sfm, two, feats)
    assert both.mask_logits.shape[1] == zs.mask_logits.shape[1] + 2 * len(present)
    assert torch.equal(both.mask_logits[:, :zs.mask_logits.shape[1]], zs.mask_logits)


def test_persam_f_is_refused_without_multimask_outputs(sfm):
    with pytest.raises(UserError, match="no multimask outputs"):
        build_state(sfm, ["a", "b"], make_options("persam_f"))


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    pytest.importorskip("transformers")
    from cli_helpers import save_tiny_sam

    from ssprompt.sfm import load_sfm

    return load_sfm("sam", str(save_tiny_sam(tmp_path_factory.mktemp("sam"))), device="cpu")


def blob_shots(sam, k: int = 3):
    """k smooth random images and one square 'object' each, in SAM's input frame."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    s = sam.image_size
    for i in range(k):
        low = torch.rand(1, 3, 4, 4, generator=g)
        x = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear")
        images.append((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        m = torch.zeros(1, s, s, dtype=torch.bool)
        m[0, 8 + 4 * i:40 + 4 * i, 12:44] = True
        targets.append((torch.tensor([0]), m))
    return encode_images(sam, images), targets


def test_persam_f_fits_its_two_weights_on_a_tiny_sam(tiny_sam):
    feats, targets = blob_shots(tiny_sam)
    state = build_state(tiny_sam, None, make_options("persam_f", {"persam_steps": 50,
                                                                  "persam_lr": 1e-2}))
    assert state.num_trainable() == 2 and not state.trainable() and state.agnostic
    assert torch.equal(state.mask_weights, torch.full((2,), PERSAM_F_INIT))
    # identity: with no prototype point and the grid kept, zero-shot bit for bit
    ident = build_state(tiny_sam, None, make_options("persam_f", {
        "points_per_class": 0, "keep_grid": True, "n_prompts": 16, "persam_steps": 5}))
    ident.prepare(tiny_sam, feats, targets)
    with torch.no_grad():
        zs = tiny_sam.decode(feats, *default_prompts(tiny_sam, None, 16))
    assert same_outputs(decoded(tiny_sam, ident, feats), zs)
    state.prepare(tiny_sam, feats, targets)
    assert state.seen.tolist() == [1.0]
    assert not torch.equal(state.mask_weights, torch.full((2,), PERSAM_F_INIT))
    out = decoded(tiny_sam, state, feats)
    assert out.mask_logits.shape[:2] == (3, 1) and out.class_logits.shape == (3, 1, 2)
    # the mask is the weighted sum of the 3 multimask outputs
    from ssprompt.methods.persam import state_class

    sim = state._similarity(feats, [0])
    pos, neg, owner = state._points(sim, 1)
    multi, _ = state._sam_masks(tiny_sam, feats, sim, pos, neg, owner, [0], True)
    w = state._weights()
    torch.testing.assert_close(out.mask_logits, (multi * w[:, None, None]).sum(2))
    assert isinstance(state, state_class())
    # PerSAM on SAM: one prompt (positive + negative point) per class, single-mask output
    plain = build_state(tiny_sam, None, make_options("persam"))
    plain.prepare(tiny_sam, feats, targets)
    assert decoded(tiny_sam, plain, feats).mask_logits.shape[:2] == (3, 1)


def test_saved_state_predicts_the_same_and_the_cli_reads_it(sfm, tmp_path, test_images):
    r = round_trip(sfm, "persam", tmp_path, test_images)
    assert r.prompt_set.seen.sum() > 0


def test_a_study_variant_and_train_flags_name_it(tmp_path):
    import argparse

    from ssprompt.methods import add_method_flags
    from ssprompt.study.config import load_config

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\ntasks: [novel]\nseeds: [0]\nvariants:\n"
                   "  - {name: zs, kind: zero_shot, role: baseline}\n"
                   "  - {name: per, kind: persam, points_per_class: 2}\n")
    v = load_config(cfg).variant("per")
    assert v.prompt.points_per_class == 2 and not v.fixed
    p = argparse.ArgumentParser()
    add_method_flags(p)
    a = p.parse_args(["--kind", "persam", "--keep-grid", "--no-negative-point"])
    assert (a.kind, a.keep_grid, a.negative_point) == ("persam", True, False)


@pytest.mark.parametrize("name", ["sam2", "sam3"])
def test_prepared_on_the_other_backends(name, tmp_path):
    """Fitted to blob shots, PerSAM (and PerSAM-F where it applies) decodes on SAM 2 and SAM 3
    (SAM: above; the conformance suite covers the unprepared states on every backend)."""
    pytest.importorskip("transformers")
    from sfm.tiny import SAVE

    from ssprompt.sfm import load_sfm

    sfm = load_sfm(name, str(SAVE[name](tmp_path / name, 0)), device="cpu")
    feats, targets = blob_shots(sfm)
    names = ["cat", "dog"] if sfm.has_text_encoder else None
    targets = [(torch.tensor([i % 2]), m) for i, (_, m) in enumerate(targets)]
    for kind in ("persam", "persam_f") if not sfm.has_text_encoder else ("persam",):
        state = build_state(sfm, names, make_options(kind, {"n_prompts": 16,
                                                            "persam_steps": 5}
                                                     if kind == "persam_f" else
                                                     {"n_prompts": 16}))
        if not sfm.has_text_encoder:
            targets = [(torch.zeros_like(lab), m) for lab, m in targets]
        state.prepare(sfm, feats, targets)
        assert state.seen.sum() > 0
        out = decoded(sfm, state, feats)
        assert out.mask_logits.shape[0] == 3 and torch.isfinite(out.mask_logits.float()).all()
