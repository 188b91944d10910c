"""Post-processing (Mask2Former's rules): semantic, instance and panoptic inference, batched, at
each image's own size."""

from __future__ import annotations

import torch

from ssprompt.geometry import unletterbox
from ssprompt.evaluation.postprocess import (BACKGROUND, Prediction, Probabilities, instance_inference,
                                  panoptic_inference, postprocess, semantic_inference,
                                  with_background)
from ssprompt.sfm.base import Outputs

torch.set_num_threads(1)
BIG = 10.0


def _block_masks(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Mask logits (N, h, w): +BIG inside each box (y0, y1, x0, x1), -BIG outside."""
    m = torch.full((len(boxes), h, w), -BIG)
    for q, (y0, y1, x0, x1) in enumerate(boxes):
        m[q, y0:y1, x0:x1] = BIG
    return m


def _onehot_logits(labels: list[int], c: int, scale: float = BIG) -> torch.Tensor:
    """Class logits (N, C + 1) sharply peaked at ``labels`` (C = no object)."""
    logits = torch.zeros(len(labels), c + 1)
    for q, lab in enumerate(labels):
        logits[q, lab] = scale
    return logits


def _probs(masks: torch.Tensor, classes: torch.Tensor) -> Probabilities:
    """One image's probabilities from mask logits (N, H, W) and class logits (N, C + 1)."""
    return Probabilities.of(masks, classes.softmax(-1))


def test_semantic_picks_obvious_class():
    masks = _block_masks(6, 6, [(0, 6, 0, 3), (0, 6, 3, 6), (0, 6, 0, 6)])
    classes = _onehot_logits([2, 0, 3], c=4)   # third query: "no object"
    sem = semantic_inference(_probs(masks, classes))
    assert sem.dtype == torch.long and sem.shape == (6, 6)
    assert (sem[:, :3] == 2).all() and (sem[:, 3:] == 0).all()


def test_instance_thing_only_topk_and_scores():
    torch.manual_seed(0)
    is_thing = [True, False, True]
    masks = torch.randn(4, 8, 8) * 3
    masks[3] = -BIG                          # an empty mask: dropped
    classes = torch.randn(4, 4)
    out = instance_inference(_probs(masks, classes), is_thing, topk=5)
    assert 0 < len(out) <= 5
    prob = classes.softmax(-1)[:, :-1]
    assert all(is_thing[c] for c in out.categories.tolist())
    assert out.masks.dtype == torch.bool and out.masks.flatten(1).any(1).all()
    # the top-5 thing (query, class) pairs with non-empty masks, scored as Mask2Former does
    cand = sorted(((float(prob[q, c]), q, c) for q in range(4) for c in (0, 2)), reverse=True)[:5]
    expected = []
    for p, q, c in cand:
        b = masks[q] > 0
        if b.any():
            expected.append((c, p * float(masks[q].sigmoid()[b].mean()), b))
    assert len(out) == len(expected)
    for inst, (c, score, b) in zip(out.as_dicts(), expected):
        assert inst["category"] == c
        assert abs(inst["score"] - score) < 1e-4
        assert torch.equal(inst["mask"], b)


def test_instance_no_thing_classes():
    out = instance_inference(_probs(torch.randn(3, 4, 4), torch.randn(3, 3)), [False, False])
    assert len(out) == 0 and out.masks.shape == (0, 4, 4)


def _check_panoptic(seg: torch.Tensor, segments: list[dict], is_thing: list[bool]) -> None:
    ids = [s["id"] for s in segments]
    assert ids == list(range(1, len(segments) + 1))
    present = set(torch.unique(seg).tolist()) - {0}
    assert present == set(ids)                       # map and list agree
    counts = torch.bincount(seg.flatten(), minlength=len(ids) + 1)
    for s in segments:
        assert s["area"] == int(counts[s["id"]]) > 0
        assert s["isthing"] == is_thing[s["category"]]
    stuff = [s["category"] for s in segments if not s["isthing"]]
    assert len(stuff) == len(set(stuff))             # one segment per stuff class


def test_panoptic_random_logits_are_consistent():
    torch.manual_seed(1)
    is_thing = [True, True, False, False]
    out = [panoptic_inference(_probs(torch.randn(12, 10, 10) * 4, torch.randn(12, 5) * 4),
                              is_thing, 0.3, 0.3) for _ in range(5)]
    for seg, segments in out:
        assert seg.shape == (10, 10) and seg.dtype == torch.long
        _check_panoptic(seg, segments, is_thing)
    assert sum(len(s) for _, s in out) >= 5          # not a vacuous check


def test_panoptic_rules():
    is_thing = [True, False]
    masks = _block_masks(8, 8, [
        (0, 4, 0, 4),   # q0 thing, confident
        (0, 4, 0, 4),   # q1 same place, lower score: loses every pixel -> dropped
        (4, 8, 0, 4),   # q2 stuff
        (4, 8, 4, 8),   # q3 stuff, same class: merged with q2
        (0, 4, 4, 8),   # q4 below object_mask_threshold -> dropped
        (0, 4, 4, 8),   # q5 argmax is no-object -> dropped
    ])
    classes = torch.tensor([[9.0, 0, 0], [5.0, 0, 0], [0, 9.0, 0], [0, 9.0, 0],
                            [1.0, 0, 0.5], [0, 0, 9.0]])
    seg, segments = panoptic_inference(_probs(masks, classes), is_thing)
    _check_panoptic(seg, segments, is_thing)
    assert [(s["category"], s["area"]) for s in segments] == [(0, 16), (1, 32)]
    assert (seg[:4, :4] == 1).all() and (seg[4:] == 2).all() and (seg[:4, 4:] == 0).all()
    assert abs(segments[0]["score"] - float(classes[0].softmax(-1)[0])) < 1e-6


def test_panoptic_overlap_threshold():
    # q1 is kept on only 4 of its 16 pixels (q0 takes the rest): 0.25 < 0.8 -> dropped
    masks = _block_masks(8, 8, [(0, 4, 0, 3), (0, 4, 0, 4)])   # q0 leaves column 3 to q1
    classes = _onehot_logits([0, 0], c=1)
    classes[1, 0] = 8.0
    seg, segments = panoptic_inference(_probs(masks, classes), [True])
    assert len(segments) == 1 and segments[0]["area"] == 12
    seg2, segments2 = panoptic_inference(_probs(masks, classes), [True], overlap_threshold=0.2)
    assert len(segments2) == 2 and (seg2[0:4, 3] == 2).all()


def test_panoptic_nothing_kept():
    seg, segments = panoptic_inference(_probs(torch.randn(3, 4, 4), torch.zeros(3, 3)),
                                       [True, False])
    assert segments == [] and (seg == 0).all()


def test_batched_equals_one_image_at_a_time():
    # the numbers never depend on which images share a batch
    g = torch.Generator().manual_seed(3)
    is_thing = [True, True, False, True, False]
    masks = torch.randn(4, 20, 12, 12, generator=g) * 4
    classes = torch.randn(4, 20, 6, generator=g) * 3
    together = postprocess(Outputs(masks, classes), [(24, 24)] * 4, 24, is_thing, 0.4)
    for i in range(4):
        alone = postprocess(Outputs(masks[i:i + 1], classes[i:i + 1]), [(24, 24)], 24,
                            is_thing, 0.4)[0]
        a = together[i]
        assert torch.equal(a.semantic, alone.semantic) and torch.equal(a.panoptic, alone.panoptic)
        assert a.segments == alone.segments
        assert torch.equal(a.instances.masks, alone.instances.masks)
        assert torch.equal(a.instances.scores, alone.instances.scores)


def test_postprocess_maps_back_to_each_images_size():
    # one query covers the top-left quarter of the letterboxed square; images of two shapes in
    # one batch get their predictions at their own sizes
    masks = _block_masks(16, 16, [(0, 8, 0, 8), (0, 16, 0, 16)]).expand(2, -1, -1, -1)
    classes = _onehot_logits([0, 2], c=2).expand(2, -1, -1)
    preds = postprocess(Outputs(masks, classes), [(32, 64), (64, 32)], 64, [True, False])
    assert [tuple(p.semantic.shape) for p in preds] == [(32, 64), (64, 32)]
    for p, hw in zip(preds, [(32, 64), (64, 32)]):
        assert isinstance(p, Prediction) and tuple(p.panoptic.shape) == hw
        assert p.instances.masks.shape[1:] == hw and p.instances.categories[0] == 0
    wide = preds[0].instances.masks[0]                   # 32 x 64: square [0, 32) -> all rows
    assert wide[:, :31].all() and wide[:31, :32].all() and not wide[:, 32:].any()
    ref = unletterbox(masks[1], 64, (64, 32)) > 0
    assert torch.equal(preds[1].instances.masks[0], ref[0])


def test_with_background_claims_the_unclaimed_pixels():
    masks = _block_masks(4, 4, [(0, 2, 0, 2), (2, 4, 2, 4)])
    classes = torch.tensor([[[9.0, 0.0], [0.0, 9.0]]])    # q1 is "no object"
    pred = with_background(postprocess(Outputs(masks[None], classes), [(4, 4)], 4, [True])[0])
    assert (pred.semantic[:2, :2] == 0).all() and int((pred.semantic == BACKGROUND).sum()) == 12
    assert [(s["category"], s["isthing"], s["area"]) for s in pred.segments] == \
        [(0, True, 4), (BACKGROUND, False, 12)]
    assert (pred.panoptic > 0).all()


# ------------------------------------------------------------------------------ large images
def _box_outputs(n: int, c: int, res: int, seed: int, own_scores: bool = False) -> Outputs:
    """Mask logits of n random boxes (+ noise) at res x res and sharp class logits: queries that
    win segments, overlap, and some that lose (so every rule of the three tasks is exercised)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(1, n, res, res, generator=g)
    for q in range(n):
        y0, x0 = torch.randint(0, res - 4, (2,), generator=g).tolist()
        hh, ww = torch.randint(3, res // 2, (2,), generator=g).tolist()
        m[0, q, y0:y0 + hh, x0:x0 + ww] += 8.0
        m[0, q] -= 4.0
    if not own_scores:
        return Outputs(m, torch.randn(1, n, c + 1, generator=g) * 6)
    p = torch.rand(1, n, generator=g) ** 0.5
    own = torch.randint(0, c, (1, n), generator=g)
    cls = torch.full((1, n, c + 1), -30.0)
    cls.scatter_(2, own[..., None], p.log()[..., None])
    cls[..., -1] = (1 - p).log()
    maps = torch.randn(1, c, res, res, generator=g)
    return Outputs(m, cls, semantic_logits=maps, own_scores=True)


def _full_and_banded(out, hw, geometry, is_thing, threshold, monkeypatch):
    import ssprompt.evaluation.postprocess as pp
    import ssprompt.geometry as geo

    monkeypatch.setattr(pp, "FULL_SIZE_ELEMENTS", 1 << 40)
    full = postprocess(out, [hw], geometry, is_thing, threshold)[0]
    monkeypatch.setattr(pp, "FULL_SIZE_ELEMENTS", 0)
    monkeypatch.setattr(geo, "BAND_ELEMENTS", 1 << 20)   # several bands on a moderate image
    banded = postprocess(out, [hw], geometry, is_thing, threshold)[0]
    return full, banded


def _assert_same(full: Prediction, banded: Prediction) -> None:
    assert torch.equal(full.semantic, banded.semantic)
    assert torch.equal(full.panoptic, banded.panoptic)
    assert full.segments == banded.segments
    assert torch.equal(full.instances.masks, banded.instances.masks)
    assert torch.equal(full.instances.categories, banded.instances.categories)
    # an instance's mask score is summed band by band: equal to float32 rounding
    torch.testing.assert_close(banded.instances.scores, full.instances.scores, rtol=1e-6, atol=0)


def test_column_bands_equal_the_full_resize():
    """``unmap_bands`` gives the bits of ``unmap`` (torch's bilinear kernel is a 1-D pass along
    the width, then a pass per column), on 1 and 2 threads, whatever the band width; 3 maps on
    one thread (another torch kernel) come as one band."""
    from ssprompt.geometry import Letterbox, PadLongest, Stretch

    g = torch.Generator().manual_seed(0)
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for geometry in (Letterbox(96), PadLongest(64), Stretch(56, probabilities=True)):
                for hw in [(96, 96), (40, 96), (123, 77), (300, 451)]:
                    for n, res in [(100, 48), (3, 16), (7, 96)]:
                        x = torch.randn(n, res, res, generator=g) * 4
                        ref = geometry.unmap(x, hw)
                        for budget in (5_000, 300_000):
                            bands = list(geometry.unmap_bands(x, hw, budget))
                            assert [c0 for c0, _, _ in bands][0] == 0 and bands[-1][1] == hw[1]
                            got = torch.cat([b for _, _, b in bands], -1)
                            assert torch.equal(got, ref), (threads, geometry, hw, n, budget)
    finally:
        torch.set_num_threads(1)


def test_large_image_equals_full_size(monkeypatch):
    """An image above ``FULL_SIZE_ELEMENTS`` (mapped back in column bands, never every query at
    full size) gets the prediction of the full-size path: every map, segment, mask and category
    equal; instance scores equal to float32 rounding. Mask2Former's rules and SAM 3's (own
    scores, semantic maps), three geometries, 1 and 2 threads."""
    from ssprompt.geometry import Letterbox, PadLongest, Stretch

    segments = 0
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for seed, (geometry, hw, res) in enumerate([(Letterbox(96), (333, 257), 48),
                                                        (PadLongest(64), (150, 226), 16),
                                                        (Stretch(56, True), (181, 233), 28)]):
                for n, c in [(100, 5), (30, 20), (3, 3)]:
                    is_thing = [k % 2 == 0 for k in range(c)]
                    out = _box_outputs(n, c, res, seed)
                    full, banded = _full_and_banded(out, hw, geometry, is_thing, 0.5,
                                                    monkeypatch)
                    _assert_same(full, banded)
                    segments += len(full.segments)
                    if isinstance(geometry, Stretch):
                        out = _box_outputs(n, c, res, seed, own_scores=True)
                        full, banded = _full_and_banded(out, hw, geometry, is_thing, 0.3,
                                                        monkeypatch)
                        _assert_same(full, banded)
                        assert len(full.instances) > 0
                        segments += len(full.segments)
    finally:
        torch.set_num_threads(1)
    assert segments > 10   # the panoptic rules ran on real segments


def test_small_images_keep_the_full_size_path(monkeypatch):
    """The study's 96 x 96 scenes (N <= 200 queries) stay on the full-size path, unchanged."""
    import ssprompt.evaluation.postprocess as pp

    assert 200 * 96 * 96 <= pp.FULL_SIZE_ELEMENTS

    def refuse(*a, **k):
        raise AssertionError("banded path taken")

    monkeypatch.setattr(pp, "_large_prediction", refuse)
    out = _box_outputs(200, 5, 48, 0)
    postprocess(out, [(96, 96)], 96, [True] * 5, 0.5)
