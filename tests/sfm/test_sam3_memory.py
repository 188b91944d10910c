"""SAM 3 training without the C x N pairs' masks (``Sam3SFM.decode_losses``, issue 30): the loss
and the learned prompts' gradients equal ``set_losses`` of the full ``decode`` (to 1e-5
relative), no tensor of C x N masks is ever made, and training goes through it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ssprompt.sfm.losses import LossWeights, set_losses  # noqa: E402
from ssprompt.prompts.layout import grid_layout  # noqa: E402
from ssprompt.prompts.promptset import PromptConfig, PromptSet  # noqa: E402
from ssprompt.sfm import load_sfm  # noqa: E402
from ssprompt.sfm.sam3 import PairLogits, Sam3SFM  # noqa: E402

from sfm.tiny import SAM3_SIZE as SIZE, save_tiny_sam3  # noqa: E402

torch.set_num_threads(1)
NAMES = ["cat", "traffic light", "sky"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def sam3(tmp_path_factory):
    return load_sfm("sam3", str(save_tiny_sam3(tmp_path_factory.mktemp("sam3"))), device="cpu")


@pytest.fixture(scope="module")
def feats(sam3):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return sam3.encode_image(images)


def _targets(labels: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(len(labels), SIZE, SIZE, dtype=torch.bool)
    for k in range(len(labels)):
        x0, y0 = torch.randint(0, SIZE // 2, (2,), generator=g).tolist()
        masks[k, y0:y0 + SIZE // 3, x0:x0 + SIZE // 3] = True
    return torch.tensor(labels, dtype=torch.long), masks


def _close(new: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to RTOL relative to the tensor's scale."""
    torch.testing.assert_close(new, ref, rtol=RTOL, atol=RTOL * float(ref.detach().abs().max()))


def _both(sam3, feats, make, groups, chunk=8, w=None):
    """(loss, parts, grads) of set_losses(decode) and of decode_losses, on equal fresh prompts
    from ``make()`` -> (module, spatial_fn)."""
    res = []
    for own in (False, True):
        sam3.concept_chunk = chunk
        try:
            module, prompts = make()
            spatial, semantic = prompts()
            if own:
                losses = sam3.decode_losses(feats, spatial, semantic, groups, w)
            else:
                losses = set_losses(sam3.decode(feats, spatial, semantic), groups, w)
            sum(loss for loss, _ in losses).backward()
        finally:
            sam3.concept_chunk = 8
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        res.append(([loss.detach() for loss, _ in losses], [p for _, p in losses], grads))
    return res


def _moved(ps: PromptSet, seed: int = 0) -> PromptSet:
    """``ps`` with its learned embeddings moved off the defaults (padding tokens kept zero), so
    that the fusion weights get a gradient too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ps.named_parameters():
            if name.endswith("learned"):
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g) * (p != 0))
    return ps


def _prompt_set(sam3, names, n=25, kind="weighted", learners="spatial,semantic"):
    def make():
        ps = _moved(PromptSet(sam3, names, PromptConfig(kind=kind, learners=learners,
                                                        n_prompts=n),
                              generator=torch.Generator().manual_seed(0)))
        return ps, ps
    return make


@pytest.mark.parametrize("chunk", [8, 2, 1])
def test_loss_and_learned_prompt_gradients_equal_the_full_decode(sam3, feats, chunk):
    groups = [[_targets([0, 2, 2], 0), _targets([1], 1)]]
    (ref_l, ref_p, ref_g), (new_l, new_p, new_g) = _both(
        sam3, feats, _prompt_set(sam3, NAMES), groups, chunk)
    _close(new_l[0], ref_l[0])
    for k in ("cls", "bce", "dice"):
        assert new_p[0][k] == pytest.approx(ref_p[0][k], rel=RTOL)
    assert ref_g.keys() == new_g.keys() and len(ref_g) >= 4   # weights and embeddings, both
    for name in ref_g:
        assert ref_g[name].abs().sum() > 0, name
        _close(new_g[name], ref_g[name])


def test_prompt_sets_trained_together_images_without_segments_and_weights(sam3, feats):
    """Two prompt sets in one pass (train_many's layout), an image with no segment, other
    loss weights: every set's loss and gradients as with the full decode."""
    def make():
        a, b = (_moved(PromptSet(sam3, NAMES, PromptConfig(kind="weighted", n_prompts=25),
                                 generator=torch.Generator().manual_seed(0)), s)
                for s in (0, 1))                            # set B's queries differ from A's
        module = torch.nn.ModuleList([a, b])

        def prompts():
            (sa, ea), (sb, eb) = a(), b()
            return torch.stack([sa, sb]), torch.stack([ea, eb])
        return module, prompts

    groups = [[_targets([], 2)], [_targets([2, 0], 3)]]
    w = LossWeights(cls=1.0, bce=3.0, dice=2.0, no_object=0.2)
    (ref_l, _, ref_g), (new_l, _, new_g) = _both(sam3, feats, make, groups, 1, w)
    for a, b in zip(new_l, ref_l):
        _close(a, b)
    for name in ref_g:
        _close(new_g[name], ref_g[name])


def test_class_agnostic_and_spatial_only(sam3, feats):
    groups = [[_targets([0, 0], 4), _targets([0], 5)]]

    def make():
        ps = _moved(PromptSet(sam3, ["object"], PromptConfig(kind="weighted",
                                                             learners="spatial", n_prompts=25),
                              generator=torch.Generator().manual_seed(0)))
        return ps, lambda: (ps()[0], None)

    (ref_l, _, ref_g), (new_l, _, new_g) = _both(sam3, feats, make, groups)
    _close(new_l[0], ref_l[0])
    for name in ref_g:
        _close(new_g[name], ref_g[name])


def test_pair_logits_cross_entropy_is_that_of_the_rows():
    g = torch.Generator().manual_seed(0)
    for c in (1, 4):
        log_p = -torch.rand(2, c * 5, generator=g) * 3
        log_q = -torch.rand(2, c * 5, generator=g) * 3
        concept = torch.arange(c).repeat_interleave(5).expand(2, -1)
        pairs = PairLogits(log_p.requires_grad_(), log_q.requires_grad_(), concept, c)
        target = torch.randint(0, c + 1, (2, c * 5), generator=g)
        weight = torch.ones(c + 1)
        weight[-1] = 0.1
        ref = torch.nn.functional.cross_entropy(pairs.materialise().flatten(0, 1), target.flatten(),
                                                weight=weight)
        new = pairs.cross_entropy(0, 2, target, weight)
        assert pairs.shape == (2, c * 5, c + 1)
        _close(new, ref)
        gr = torch.autograd.grad(ref, [log_p, log_q])
        gn = torch.autograd.grad(new, [log_p, log_q])
        for a, b in zip(gn, gr):
            _close(a, b)


def test_no_tensor_holds_every_pairs_mask(sam3, feats):
    """With C = 24 concepts and 2 per forward, the largest tensor any op makes in the step
    (forward, matching, backward with recomputation) is a chunk's, never the C x N masks (as
    set_losses of the full decode makes: the concatenated masks and their gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return t if not isinstance(out, (tuple, list)) else out

    names = [f"thing {i}" for i in range(24)]
    semantic0 = sam3.encode_texts(names)
    spatial0 = sam3.encode_points(grid_layout(25))
    groups = [[_targets([0, 5, 23], 6)]]
    h = w = feats.tensors["fpn0"].shape[-1]
    every = 24 * 25 * h * w
    seen = {}
    sam3.concept_chunk = 2
    try:
        for own in (False, True):
            spatial = spatial0.clone().requires_grad_()
            semantic = semantic0.clone().requires_grad_()
            f = feats.index([0])
            with Largest() as mode:
                if own:
                    (loss, _), = sam3.decode_losses(f, spatial, semantic, groups)
                else:
                    (loss, _), = set_losses(sam3.decode(f, spatial, semantic), groups)
                loss.backward()
            seen[own] = mode.numel
    finally:
        sam3.concept_chunk = 8
    assert seen[False] >= every
    assert seen[True] <= every // 4, (seen, every)


def test_training_goes_through_decode_losses_and_follows_the_full_decode(sam3, monkeypatch):
    """train_prompts on SAM 3 calls decode_losses; its loss log and prompts follow the full
    decode's (decode_losses removed) to float rounding."""
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.engine.train import TrainConfig, train_prompts
    from ssprompt.sfm.features import FeatureCache

    data = SceneSplit("novel", "train", n=2, shots=2)
    cfg = TrainConfig(steps=3, batch=2, log_every=1, warmup=1)
    cache = FeatureCache()
    calls = []
    own = Sam3SFM.decode_losses

    def spy(self, *a, **k):
        calls.append(1)
        return own(self, *a, **k)

    runs = {}
    for mode in ("own", "full"):
        if mode == "own":
            monkeypatch.setattr(Sam3SFM, "decode_losses", spy)
        else:
            monkeypatch.delattr(Sam3SFM, "decode_losses")
        ps = PromptSet(sam3, data.class_names, PromptConfig(kind="weighted", n_prompts=25),
                       generator=torch.Generator().manual_seed(0))
        log = train_prompts(sam3, ps, data, cfg, cache)
        runs[mode] = (log, {k: v.detach().clone() for k, v in ps.state_dict().items()})
    assert len(calls) == 3
    (log_o, st_o), (log_f, st_f) = runs["own"], runs["full"]
    assert [r["step"] for r in log_o] == [r["step"] for r in log_f] == [0, 1, 2]
    for a, b in zip(log_o, log_f):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    for k in st_f:
        torch.testing.assert_close(st_o[k], st_f[k], rtol=1e-4, atol=1e-5)
