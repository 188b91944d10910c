"""Mask2Former-style post-processing: semantic, instance and panoptic inference."""

from __future__ import annotations

import torch

from ssprompt.inference import (instance_inference, panoptic_inference, semantic_inference,
                                upsample)

torch.set_num_threads(1)
BIG = 10.0


def _block_masks(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Mask logits +BIG inside each box (y0, y1, x0, x1), -BIG outside."""
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


def test_semantic_picks_obvious_class():
    masks = _block_masks(6, 6, [(0, 6, 0, 3), (0, 6, 3, 6), (0, 6, 0, 6)])
    classes = _onehot_logits([2, 0, 3], c=4)   # third query: "no object"
    sem = semantic_inference(masks, classes)
    assert sem.dtype == torch.long and sem.shape == (6, 6)
    assert (sem[:, :3] == 2).all() and (sem[:, 3:] == 0).all()


def test_semantic_class_agnostic_is_all_zero():
    masks = torch.randn(3, 5, 5)
    sem = semantic_inference(masks, torch.randn(3, 2))
    assert (sem == 0).all()


def test_instance_thing_only_topk_and_scores():
    torch.manual_seed(0)
    is_thing = [True, False, True]
    masks = torch.randn(4, 8, 8) * 3
    masks[3] = -BIG                          # an empty mask: dropped
    classes = torch.randn(4, 4)
    out = instance_inference(masks, classes, is_thing, topk=5)
    assert 0 < len(out) <= 5
    prob = classes.softmax(-1)[:, :-1]
    for inst in out:
        assert is_thing[inst["category"]]
        assert inst["mask"].dtype == torch.bool and inst["mask"].any()
    # the top-5 thing (query, class) pairs with non-empty masks, scored as Mask2Former does
    cand = sorted(((float(prob[q, c]), q, c) for q in range(4) for c in (0, 2)), reverse=True)[:5]
    expected = []
    for p, q, c in cand:
        b = masks[q] > 0
        if b.any():
            expected.append((c, p * float(masks[q].sigmoid()[b].mean()), b))
    assert len(out) == len(expected)
    for inst, (c, score, b) in zip(out, expected):
        assert inst["category"] == c
        assert abs(inst["score"] - score) < 1e-4
        assert torch.equal(inst["mask"], b)


def test_instance_no_thing_classes():
    assert instance_inference(torch.randn(3, 4, 4), torch.randn(3, 3), [False, False]) == []


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
    for _ in range(5):
        masks = torch.randn(12, 10, 10) * 4
        classes = torch.randn(12, 5) * 4
        seg, segments = panoptic_inference(masks, classes, is_thing, 0.5, 0.5)
        assert seg.shape == (10, 10) and seg.dtype == torch.long
        _check_panoptic(seg, segments, is_thing)


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
    seg, segments = panoptic_inference(masks, classes, is_thing)
    _check_panoptic(seg, segments, is_thing)
    assert [(s["category"], s["area"]) for s in segments] == [(0, 16), (1, 32)]
    assert (seg[:4, :4] == 1).all() and (seg[4:] == 2).all() and (seg[:4, 4:] == 0).all()
    assert abs(segments[0]["score"] - float(classes[0].softmax(-1)[0])) < 1e-6


def test_panoptic_overlap_threshold():
    # q1 is kept on only 4 of its 16 pixels (q0 takes the rest): 0.25 < 0.8 -> dropped
    masks = _block_masks(8, 8, [(0, 4, 0, 3), (0, 4, 0, 4)])   # q0 leaves column 3 to q1
    classes = _onehot_logits([0, 0], c=1)
    classes[1, 0] = 8.0
    seg, segments = panoptic_inference(masks, classes, [True])
    assert len(segments) == 1 and segments[0]["area"] == 12
    seg2, segments2 = panoptic_inference(masks, classes, [True], overlap_threshold=0.2)
    assert len(segments2) == 2 and (seg2[0:4, 3] == 2).all()


def test_panoptic_nothing_kept():
    seg, segments = panoptic_inference(torch.randn(3, 4, 4), torch.zeros(3, 3), [True, False])
    assert segments == [] and (seg == 0).all()


def test_upsample():
    x = torch.randn(2, 3, 4, 4)
    assert upsample(x, (4, 4)) is x
    y = upsample(x, (8, 8))
    assert y.shape == (2, 3, 8, 8)
    assert torch.allclose(y.mean((-2, -1)), x.mean((-2, -1)), atol=1e-5)
