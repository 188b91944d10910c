"""SpaPrompt / SemPrompt / fusion modes / baselines: behaviours the method rests on."""

import pytest
import torch

from ssprompt.data.scenes import SceneSplit
from ssprompt.errors import UserError
from ssprompt.sfm.features import FeatureCache
from ssprompt.prompts.fusion import FusedPrompt
from ssprompt.prompts.layout import grid_layout
from ssprompt.prompts.promptset import PromptConfig, PromptSet
from ssprompt.prompts.spatial import Vanilla2DPrompt, default_spatial
from ssprompt.prompts.semantic import default_semantic, engineered_semantic
from ssprompt.engine.train import TrainConfig, train_prompts

NAMES = ["t-shirt", "trouser", "grass", "brick wall"]


@pytest.fixture(scope="module")
def train_split():
    return SceneSplit("shift", "train", shots=4, seed=0)


def test_default_mode_reproduces_frozen_sfm_bit_for_bit(tiny_sfm, train_split):
    scenes = [train_split[i] for i in range(2)]
    feats = FeatureCache().get(tiny_sfm, [s.image for s in scenes])
    ps = PromptSet(tiny_sfm, train_split.class_names, PromptConfig("zero_shot", n_prompts=36))
    spatial, semantic = ps()
    got = tiny_sfm.decode(feats, spatial, semantic)
    with torch.no_grad():
        ref = tiny_sfm.decode(feats, tiny_sfm.encode_points(grid_layout(36)),
                              tiny_sfm.encode_texts(train_split.class_names))
    assert torch.equal(got.mask_logits, ref.mask_logits)
    assert torch.equal(got.class_logits, ref.class_logits)
    assert ps.num_trainable() == 0


def test_learned_only_ignores_default():
    d1, d2 = torch.randn(5, 8), torch.randn(5, 8)
    a = FusedPrompt(d1, "learned_only", generator=torch.Generator().manual_seed(0))
    b = FusedPrompt(d1, "learned_only", generator=torch.Generator().manual_seed(0))
    b.default.copy_(d2)  # change z_def after construction: the output must not move
    assert torch.equal(a(), b())
    assert not torch.equal(a(), d1)


def test_average_weight_is_half_and_fixed():
    d = torch.randn(6, 8)
    f = FusedPrompt(d, "average", generator=torch.Generator().manual_seed(0))
    assert torch.all(f.weight() == 0.5)
    assert torch.allclose(f(), 0.5 * f.learned + 0.5 * d)
    assert [n for n, p in f.named_parameters()] == ["learned"]


def test_fusion_stays_between_inputs_and_weight_in_unit_interval():
    d = torch.randn(4, 3)
    f = FusedPrompt(d, "weighted", weight_shape="dim", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f.weight_logit.copy_(torch.randn(4, 3) * 5)
    w = f.weight()
    assert torch.all((w >= 0) & (w <= 1))
    lo, hi = torch.minimum(d, f.learned), torch.maximum(d, f.learned)
    z = f()
    assert torch.all(z >= lo - 1e-6) and torch.all(z <= hi + 1e-6)


def test_random_init_matches_default_scale():
    d = torch.randn(200, 16) * 3 + 1
    f = FusedPrompt(d, "weighted", generator=torch.Generator().manual_seed(0))
    assert abs(f.learned.std().item() - d.std().item()) < 0.5
    assert not torch.allclose(f.learned, d)
    g = FusedPrompt(d, "weighted", init="default")
    assert torch.equal(g.learned, d)


def test_bad_mode_is_user_error():
    with pytest.raises(UserError):
        FusedPrompt(torch.zeros(2, 2), "sometimes")
    with pytest.raises(UserError):
        PromptConfig("weighted", n_prompts=0)


def test_gradients_reach_only_prompt_parameters(tiny_sfm, train_split):
    ps = PromptSet(tiny_sfm, train_split.class_names, PromptConfig("weighted", n_prompts=25),
                   generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in tiny_sfm.state_dict().items()}
    log = train_prompts(tiny_sfm, ps, train_split, TrainConfig(steps=3, batch=2, log_every=1))
    assert len(log) == 3
    assert all(p.grad is None and not p.requires_grad for p in tiny_sfm.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny_sfm.state_dict().items())
    grads = [p.grad for p in ps.trainable()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_weighted_mode_moves_w_and_average_does_not(tiny_sfm, train_split):
    ps = PromptSet(tiny_sfm, train_split.class_names, PromptConfig("weighted", n_prompts=25),
                   generator=torch.Generator().manual_seed(0))
    w0 = {k: v.clone() for k, v in ps.fusion_weights().items()}
    train_prompts(tiny_sfm, ps, train_split, TrainConfig(steps=5, batch=2, lr=0.05))
    w1 = ps.fusion_weights()
    assert not torch.allclose(w0["spatial"], w1["spatial"])
    assert not torch.allclose(w0["semantic"], w1["semantic"])
    avg = PromptSet(tiny_sfm, train_split.class_names, PromptConfig("average", n_prompts=25),
                    generator=torch.Generator().manual_seed(0))
    train_prompts(tiny_sfm, avg, train_split, TrainConfig(steps=3, batch=2, lr=0.05))
    w = avg.fusion_weights()
    shown = avg.semantic.learned_rows[:, 0]
    assert torch.all(w["spatial"] == 0.5) and torch.all(w["semantic"][shown] == 0.5)
    assert torch.all(w["semantic"][~shown] == 0)     # classes no shot shows: not learned


@pytest.mark.parametrize("mode", ["learned_only", "weighted"])
def test_classes_no_shot_shows_keep_their_default_embedding(tiny_sfm, train_split, mode):
    shown = sorted({s["category"] for i in range(len(train_split))
                    for s in train_split[i].segments})
    names = train_split.class_names
    assert 0 < len(shown) < len(names)
    ps = PromptSet(tiny_sfm, names, PromptConfig(mode, n_prompts=25, init="random"),
                   generator=torch.Generator().manual_seed(0))
    assert not torch.equal(ps.semantic(), ps.semantic.default)   # random start: all rows moved
    train_prompts(tiny_sfm, ps, train_split, TrainConfig(steps=3, batch=2, lr=0.05))
    z, d = ps.semantic().detach(), ps.semantic.default
    unseen = [c for c in range(len(names)) if c not in shown]
    assert torch.equal(z[unseen], d[unseen])
    assert all(not torch.equal(z[c], d[c]) for c in shown)
    assert ps.semantic.learned_rows[:, 0].nonzero().flatten().tolist() == shown


def test_vanilla_2d_points_stay_inside_image(tiny_sfm, train_split):
    ps = PromptSet(tiny_sfm, train_split.class_names,
                   PromptConfig("vanilla_2d", learners=("spatial",), n_prompts=25))
    assert isinstance(ps.spatial, Vanilla2DPrompt)
    start = ps.spatial.points().detach().clone()
    with torch.no_grad():  # push the points far outside, as a huge step would
        ps.spatial.point_logit.add_(torch.randn_like(ps.spatial.point_logit) * 50)
    train_prompts(tiny_sfm, ps, train_split, TrainConfig(steps=3, batch=2, lr=1.0))
    pts = ps.spatial.points()
    assert torch.all((pts >= 0) & (pts <= 1))
    assert not torch.allclose(pts, start)
    assert ps.num_trainable() == 50  # only the coordinates train


def test_encoder_runs_once_per_training_image(tiny_sfm, train_split):
    calls = {"n": 0}
    orig = tiny_sfm.encode_image

    def counting(images):
        calls["n"] += images.shape[0]
        return orig(images)

    tiny_sfm.encode_image = counting
    try:
        ps = PromptSet(tiny_sfm, train_split.class_names, PromptConfig("weighted", n_prompts=25),
                       generator=torch.Generator().manual_seed(0))
        train_prompts(tiny_sfm, ps, train_split, TrainConfig(steps=8, batch=2))
    finally:
        del tiny_sfm.encode_image
    assert calls["n"] == len(train_split)


def test_prompt_engineering_differs_from_bare_names(tiny_sfm):
    bare = default_semantic(tiny_sfm, NAMES)
    eng = engineered_semantic(tiny_sfm, NAMES)
    assert eng.shape == bare.shape
    assert not torch.allclose(eng, bare)
    assert torch.allclose(eng.norm(dim=-1), bare.norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize("n", [25, 50, 100, 200])
def test_any_n_decodes(tiny_sfm, train_split, n):
    feats = FeatureCache().get(tiny_sfm, [train_split[0].image])
    z = default_spatial(tiny_sfm, n)
    out = tiny_sfm.decode(feats, z, default_semantic(tiny_sfm, NAMES))
    assert out.mask_logits.shape[:2] == (1, n)
    assert out.class_logits.shape == (1, n, len(NAMES) + 1)
    # and arbitrary (not encoder-made) embeddings of any N are accepted
    out = tiny_sfm.decode(feats, torch.randn(n, z.shape[1]), torch.randn(3, z.shape[1]))
    assert out.class_logits.shape == (1, n, 4)


def test_spatial_lr_mult_scales_only_the_spatial_embeddings(tiny_sfm, train_split):
    def moved(mult):
        ps = PromptSet(tiny_sfm, train_split.class_names, PromptConfig("average", n_prompts=25),
                       generator=torch.Generator().manual_seed(0))
        train_prompts(tiny_sfm, ps, train_split,
                      TrainConfig(steps=4, batch=2, lr=1e-2, spatial_lr_mult=mult))
        return ((ps.spatial.learned - ps.spatial.default).abs().mean().item(),
                (ps.semantic.learned - ps.semantic.default).abs().mean().item())

    frozen_spa, sem_a = moved(0.0)
    fast_spa, sem_b = moved(10.0)
    assert frozen_spa == 0.0 and fast_spa > 0
    assert sem_a > 0 and sem_a == pytest.approx(sem_b, rel=0.5)


def test_anchor_keeps_learned_embeddings_near_default(tiny_sfm, train_split):
    def drift(anchor):
        ps = PromptSet(tiny_sfm, train_split.class_names, PromptConfig("weighted", n_prompts=25),
                       generator=torch.Generator().manual_seed(0))
        std = float(ps.semantic.default.std())
        with torch.no_grad():  # start away from the default so the anchor has work to do
            ps.semantic.learned.add_(0.5 * std)
        # Adam steps ~lr per coordinate: 10 steps of 0.1 std can undo the 0.5 std offset
        train_prompts(tiny_sfm, ps, train_split,
                      TrainConfig(steps=10, batch=2, lr=0.1 * std, warmup=1, anchor=anchor))
        return float(ps.drift())

    assert drift(1000.0) < 0.5 * drift(0.0)


def test_drift_ignores_learned_only_and_is_scale_free():
    from ssprompt.prompts.promptset import PromptSet as PS

    class Stub(PS):  # drift() only reads the learners and the config's ``anchored``
        def __init__(self, spatial, semantic, anchored=None):
            torch.nn.Module.__init__(self)
            self.spatial, self.semantic = spatial, semantic
            self.cfg = PromptConfig("learned_only", anchored=anchored)

    d = torch.randn(6, 8)
    fused = FusedPrompt(d, "average", init="default")
    scaled = FusedPrompt(d * 100, "average", init="default")
    with torch.no_grad():
        fused.learned.mul_(1.5)
        scaled.learned.mul_(1.5)
    assert float(Stub(fused, None).drift()) == pytest.approx(0.25, rel=1e-4)
    assert float(Stub(scaled, None).drift()) == pytest.approx(0.25, rel=1e-4)
    lonly = FusedPrompt(d, "learned_only", init="random",
                        generator=torch.Generator().manual_seed(0))
    assert float(Stub(lonly, None).drift()) == 0.0
    # the ablation's control keeps the anchor on learned_only: the pull is back
    assert float(Stub(lonly, None, anchored=True).drift()) > 0.5
    assert float(Stub(fused, None, anchored=False).drift()) == 0.0


def test_frozen_weight_stays_at_its_start_while_embeddings_move(tiny_sfm, train_split):
    """The step-size control: ``weighted`` with ``weight_init`` and weight_lr_mult = 0 keeps w
    where it started; its embeddings still learn."""
    ps = PromptSet(tiny_sfm, train_split.class_names,
                   PromptConfig("weighted", learners=("semantic",), n_prompts=25,
                                weight_init=0.74),
                   generator=torch.Generator().manual_seed(0))
    start = ps.semantic.learned.detach().clone()
    train_prompts(tiny_sfm, ps, train_split,
                  TrainConfig(steps=4, batch=2, lr=0.05, weight_lr_mult=0.0))
    w = torch.sigmoid(ps.semantic.weight_logit)
    assert torch.allclose(w, torch.full_like(w, 0.74))
    assert not torch.allclose(ps.semantic.learned, start)


@pytest.mark.parametrize("init", ["random", "default"])
def test_fused_prompt_lives_on_its_default_embeddings_device(init):
    # every tensor of a fused prompt follows the frozen encoder's output onto its device (a
    # CUDA run once failed: the fusion weight stayed on the CPU); 'meta' stands in for CUDA here
    default = torch.randn(6, 8).to("meta")
    p = FusedPrompt(default, "weighted", init=init, generator=torch.Generator().manual_seed(0))
    assert {t.device.type for t in [*p.parameters(), *p.buffers()]} == {"meta"}
    assert p().device.type == "meta" and p().shape == (6, 8)
