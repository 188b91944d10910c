"""Property tests (hypothesis) for the pieces with invariants."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssprompt.prompts.fusion import FusedPrompt
from ssprompt.prompts.layout import grid_layout, jittered_layout


@given(st.integers(min_value=1, max_value=400))
@settings(max_examples=60, deadline=None)
def test_layout_inside_image_with_n_distinct_points(n):
    pts = grid_layout(n)
    assert pts.shape == (n, 2)
    assert torch.all((pts > 0) & (pts < 1))
    assert len({tuple(p) for p in pts.tolist()}) == n
    jit = jittered_layout(n, torch.Generator().manual_seed(n))
    assert torch.all((jit >= 0) & (jit <= 1))


@given(st.integers(1, 12), st.integers(1, 16), st.sampled_from(["prompt", "dim"]),
       st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_weighted_fusion_stays_between_its_inputs(p, d, weight, seed):
    g = torch.Generator().manual_seed(seed)
    default = torch.randn(p, d, generator=g)
    f = FusedPrompt(default, "weighted", weight_shape=weight, generator=g)
    with torch.no_grad():
        f.weight_logit.copy_(torch.randn(f.weight_logit.shape, generator=g) * 4)
    z, w = f(), f.weight()
    assert torch.all((w >= 0) & (w <= 1))
    lo, hi = torch.minimum(default, f.learned), torch.maximum(default, f.learned)
    assert torch.all(z >= lo - 1e-5) and torch.all(z <= hi + 1e-5)


@given(st.integers(1, 30), st.integers(1, 6), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_panoptic_post_processing_never_gives_a_pixel_two_segments(n, c, seed):
    from ssprompt.evaluation.postprocess import Probabilities, panoptic_inference, semantic_inference

    g = torch.Generator().manual_seed(seed)
    masks = torch.randn(n, 12, 12, generator=g) * 4
    classes = torch.randn(n, c + 1, generator=g) * 4
    is_thing = [bool(i % 2) for i in range(c)]
    probs = Probabilities.of(masks, classes.softmax(-1))
    seg, segments = panoptic_inference(probs, is_thing, object_mask_threshold=0.3)
    ids = [s["id"] for s in segments]
    assert len(ids) == len(set(ids))                       # one entry per segment
    assert set(seg.unique().tolist()) - {0} == set(ids)    # the map holds exactly those ids
    for s in segments:                                     # areas partition the map
        assert int((seg == s["id"]).sum()) == s["area"]
    assert sum(s["area"] for s in segments) + int((seg == 0).sum()) == seg.numel()
    stuff = [s["category"] for s in segments if not s["isthing"]]
    assert len(stuff) == len(set(stuff))                   # one segment per stuff class
    sem = semantic_inference(probs)
    assert sem.shape == (12, 12) and int(sem.min()) >= 0 and int(sem.max()) < c
