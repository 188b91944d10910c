"""One conformance suite, run over every registered backend (``ssprompt.sfm.BACKENDS``): what the
rest of ssprompt assumes of a ``PromptableSFM``, checked on a tiny random checkpoint loaded the
way a user's is, ``load_sfm(name, checkpoint)``. A backend added to the registry without a tiny
checkpoint in ``tests/sfm/tiny.py`` fails ``test_every_backend_has_a_tiny_checkpoint``.

The backend tests (test_sam, test_sam2, test_sam3) check each backend against its own
reference implementation; this suite checks the contract they all share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from ssprompt.geometry import geometry_of  # noqa: E402
from ssprompt.methods import METHODS  # noqa: E402
from ssprompt.prompts.promptset import PromptConfig, PromptSet, default_prompts  # noqa: E402
from ssprompt.sfm import BACKENDS, load_sfm  # noqa: E402
from ssprompt.sfm.base import PromptableSFM, default_n_prompts, encode_images  # noqa: E402

from sfm.tiny import SAVE  # noqa: E402

NAMES = ["cat", "traffic light", "sky"]


def test_every_backend_has_a_tiny_checkpoint():
    assert set(BACKENDS) == set(SAVE)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tmp_path_factory):
    """(name, checkpoint path, the loaded SFM)."""
    name = request.param
    ckpt = SAVE[name](tmp_path_factory.mktemp(name), 0)
    return name, ckpt, load_sfm(name, str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def pictures():
    """Two uint8 images of different, non-square sizes (smooth blobs, so masks are not noise)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for h, w in ((72, 120), (130, 90)):
        low = torch.rand(1, 3, 6, 6, generator=g)
        x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear").clamp(0, 1)
        out.append((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return out


def test_protocol_frozen_and_described(backend, tmp_path):
    name, ckpt, sfm = backend
    assert isinstance(sfm, PromptableSFM)
    assert sfm.embed_dim > 0 and sfm.image_size > 0
    assert 0.0 < sfm.object_mask_threshold < 1.0
    assert isinstance(sfm.has_text_encoder, bool)
    assert all(not p.requires_grad for p in sfm.parameters()) and not sfm.training
    # the weights hash names the weights: the same file gives the same hash, others another
    again = load_sfm(name, str(ckpt), device="cpu")
    assert isinstance(sfm.weights_hash(), str) and sfm.weights_hash() == again.weights_hash()
    other = load_sfm(name, str(SAVE[name](tmp_path / "seed1", 1)), device="cpu")
    assert other.weights_hash() != sfm.weights_hash()


def test_default_prompts_come_from_the_frozen_encoders(backend):
    _, _, sfm = backend
    spatial, semantic = default_prompts(sfm, NAMES, 25)
    assert spatial.ndim == 2 and spatial.shape[0] == 25 and torch.isfinite(spatial).all()
    assert torch.equal(spatial, default_prompts(sfm, NAMES, 25)[0])   # deterministic
    assert default_prompts(sfm, NAMES)[0].shape[0] == default_n_prompts(sfm)
    if sfm.has_text_encoder:
        assert semantic.shape[0] == len(NAMES) and torch.isfinite(semantic).all()
        assert not torch.equal(semantic[0], semantic[1])
    else:
        assert semantic is None and sfm.encode_texts(NAMES) is None


@pytest.mark.parametrize("n", [25, 200])
def test_decode_shapes_and_batch_independence(backend, pictures, n):
    """Outputs per query, any N; an image's output does not depend on the others in its batch
    (features encoded together or one at a time decode alike)."""
    _, _, sfm = backend
    spatial, semantic = default_prompts(sfm, NAMES, n)
    with torch.no_grad():
        both = sfm.decode(encode_images(sfm, pictures), spatial, semantic)
        one = sfm.decode(encode_images(sfm, pictures[1:]), spatial, semantic)
    b, q = both.mask_logits.shape[:2]
    assert b == 2 and q >= n and both.class_logits.shape[:2] == (2, q)
    classes = len(NAMES) if sfm.has_text_encoder else 1
    assert both.class_logits.shape[-1] == classes + 1          # + "no object"
    assert torch.isfinite(both.mask_logits).all() and torch.isfinite(both.class_logits).all()
    assert torch.allclose(both.mask_logits[1:], one.mask_logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(both.class_logits[1:], one.class_logits, atol=1e-4, rtol=1e-4)
    # the backend's geometry maps masks back to each image's own size
    h, w = pictures[0].shape[:2]
    assert geometry_of(sfm).unmap(both.mask_logits[0].float(), (h, w)).shape == (q, h, w)


def test_gradients_reach_the_prompts_and_never_the_model(backend, pictures):
    _, _, sfm = backend
    learners = "spatial,semantic" if sfm.has_text_encoder else "spatial"
    ps = PromptSet(sfm, NAMES, PromptConfig("weighted", learners=learners, n_prompts=25),
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = encode_images(sfm, pictures[:1])
    out = sfm.decode(feats, *ps())
    (out.mask_logits.float().mean() + out.class_logits.float().mean()).backward()
    grads = {n: p.grad for n, p in ps.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the embeddings move (w's gradient is 0 at the start: z_learned starts as z_default)
    learned = [g for n, g in grads.items() if n.endswith("learned")]
    assert len(learned) == len(learners.split(",")) and all(g.abs().sum() > 0 for g in learned)
    assert all(p.grad is None for p in sfm.parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_every_backend(backend, pictures, method, tmp_path):
    """Each registered method (``ssprompt.methods``) where it applies: it builds from the
    backend's defaults, decodes through its own ``decode``, starts exactly as its reference
    method (its identity-at-init setting), gets gradients only in its own parameters, and its
    saved form loads back to the same decoder inputs."""
    from ssprompt.errors import UserError
    from ssprompt.methods import get_method, make_options, option_fields
    from ssprompt.methods.base import build_state, identity_at_init
    from ssprompt.prompts.promptset import load_prompts, save_prompts

    _, _, sfm = backend
    values = {"n_prompts": 25}
    if "learners" in option_fields(method) and not sfm.has_text_encoder:
        values["learners"] = "spatial"
    try:
        state = build_state(sfm, NAMES, make_options(method, values),
                            generator=torch.Generator().manual_seed(0))
    except UserError as e:
        pytest.skip(f"{method} does not apply to this backend: {e}")
    with torch.no_grad():
        feats = encode_images(sfm, pictures[:1])
    spatial, semantic = state()
    assert spatial.shape[-1] == sfm.embed_dim and (semantic is None) == state.agnostic
    out = state.decode(sfm, feats, spatial, semantic)
    assert out.mask_logits.shape[0] == 1 and torch.isfinite(out.mask_logits.float()).all()
    if get_method(method).identity is not None:
        assert identity_at_init(sfm, method, NAMES, feats, **values) is True
    if state.trainable():
        (out.mask_logits.float().mean() + out.class_logits.float().mean()).backward()
        assert any(p.grad is not None for p in state.trainable())
        assert all(p.grad is None for p in sfm.parameters())
    save_prompts(tmp_path / "p.safetensors", state, {"weights_hash": sfm.weights_hash()})
    loaded = load_prompts(tmp_path / "p.safetensors")
    with torch.no_grad():
        want = state()
    assert torch.equal(loaded.spatial, want[0])
    assert (loaded.semantic is None) == (want[1] is None)
    if want[1] is not None:
        assert torch.equal(loaded.semantic, want[1])
