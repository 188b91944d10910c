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
