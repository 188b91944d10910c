"""Mask2Former-style post-processing of per-query predictions, one image at a time.

Inputs: mask logits (N, H, W) already at the ground truth's size and class logits (N, C + 1),
the last column being "no object".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, N, h, w) -> (B, N, H, W), bilinear."""
    if tuple(mask_logits.shape[-2:]) == tuple(size):
        return mask_logits
    return F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)


def semantic_inference(mask_logits: Tensor, class_logits: Tensor) -> Tensor:
    """Per-pixel class: argmax over classes of sum_q p(class | q) * sigmoid(mask_q)."""
    prob = class_logits.float().softmax(-1)[:, :-1]
    seg = torch.einsum("qc,qhw->chw", prob, mask_logits.float().sigmoid())
    return seg.argmax(0)


def instance_inference(mask_logits: Tensor, class_logits: Tensor, is_thing: list[bool],
                       topk: int = 100) -> list[dict]:
    """Scored instances of thing classes: the top-k (query, class) pairs among thing classes
    (Mask2Former); mask = sigmoid > 0.5; score = class probability x mean mask probability
    inside the mask. Empty masks are dropped."""
    n, c1 = class_logits.shape
    prob = class_logits.float().softmax(-1)[:, :-1]
    thing = torch.tensor(is_thing, dtype=torch.bool, device=prob.device)
    if not thing.any():
        return []
    prob = prob.masked_fill(~thing[None], -1.0)
    k = min(topk, int(thing.sum()) * n)
    scores, idx = prob.flatten().topk(k)
    queries, labels = idx // (c1 - 1), idx % (c1 - 1)
    masks = mask_logits[queries].float()
    binary = masks > 0
    mask_score = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    final = scores * mask_score
    return [{"mask": binary[i], "category": int(labels[i]), "score": float(final[i])}
            for i in range(k) if binary[i].any() and scores[i] > 0]


MASK2FORMER_OBJECT_THRESHOLD = 0.8  # Mask2Former's panoptic class-confidence cut (COCO)


def panoptic_inference(mask_logits: Tensor, class_logits: Tensor, is_thing: list[bool],
                       object_mask_threshold: float = MASK2FORMER_OBJECT_THRESHOLD,
                       overlap_threshold: float = 0.8
                       ) -> tuple[Tensor, list[dict]]:
    """Panoptic map (H, W) with segment ids 1..S (0 = void) and its segments; stuff queries of
    one class merge into one segment. Every pixel belongs to at most one segment."""
    c = class_logits.shape[-1] - 1
    scores, labels = class_logits.float().softmax(-1).max(-1)
    masks = mask_logits.float().sigmoid()
    keep = labels.ne(c) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    h, w = masks.shape[-2:]
    seg = torch.zeros((h, w), dtype=torch.long, device=masks.device)
    segments: list[dict] = []
    if cur_masks.shape[0] == 0:
        return seg, segments
    ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_ids: dict[int, int] = {}
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        mine = ids == k
        original = cur_masks[k] >= 0.5
        mask = mine & original
        area, orig_area = int(mine.sum()), int(original.sum())
        if area == 0 or orig_area == 0 or int(mask.sum()) == 0:
            continue
        if area / orig_area < overlap_threshold:
            continue
        if not is_thing[cls] and cls in stuff_ids:
            seg[mask] = stuff_ids[cls]
            continue
        sid = len(segments) + 1
        if not is_thing[cls]:
            stuff_ids[cls] = sid
        seg[mask] = sid
        segments.append({"id": sid, "category": cls, "isthing": bool(is_thing[cls]),
                         "score": float(cur_scores[k])})
    counts = torch.bincount(seg.flatten(), minlength=len(segments) + 1)
    for s in segments:
        s["area"] = int(counts[s["id"]])
    return seg, segments
