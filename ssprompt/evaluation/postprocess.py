"""Post-processing: an SFM's per-query outputs -> semantic, instance and panoptic predictions at
each image's own size (Mask2Former's inference rules).

One stage that evaluation, prediction and the study all call. It maps the mask logits of the
SFM's square input back to every image's (H, W) (the backend's geometry: ``geometry.unletterbox``
for the embedded SFM, its processor's post-processing for the others), computes
the mask and class probabilities once (``Probabilities``), and derives the three tasks from them
with tensor ops over all queries and classes at once (no loop over queries). Metrics
(``ssprompt.evaluation.metrics``) only compare its ``Prediction`` objects with the ground truth.

The results are bit-identical to scoring each image on its own with the former per-image code
(bench/eval_speed.py --compare-old checks the study's metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..geometry import geometry_of
from ..sfm.base import MASK2FORMER_OBJECT_THRESHOLD  # noqa: F401 (re-exported)

OVERLAP_THRESHOLD = 0.8   # Mask2Former: a query keeps its segment if it won >= 80% of its mask
TOPK_INSTANCES = 100      # Mask2Former / COCO: at most 100 instances per image


@dataclass
class Instances:
    """Scored thing instances of one image, best first: ``masks`` bool (K, H, W), ``categories``
    long (K,), ``scores`` float (K,)."""

    masks: Tensor
    categories: Tensor
    scores: Tensor

    def __len__(self) -> int:
        return int(self.categories.shape[0])

    def as_dicts(self) -> list[dict]:
        """[{"mask", "category", "score"}] (the readable form, e.g. for writing files)."""
        return [{"mask": m, "category": int(c), "score": float(s)}
                for m, c, s in zip(self.masks, self.categories.tolist(), self.scores.tolist())]


@dataclass
class Prediction:
    """Everything predicted for one image, at its own (H, W): ``semantic`` long class map,
    ``instances`` scored thing masks, ``panoptic`` long segment ids (0 = void) and its
    ``segments`` [{"id", "category", "isthing", "score", "area"}]."""

    semantic: Tensor
    instances: Instances
    panoptic: Tensor
    segments: list[dict] = field(default_factory=list)


@dataclass
class Probabilities:
    """One image's per-query predictions, computed once and shared by the three tasks:
    ``mask_logits`` and their sigmoid ``masks`` (N, H, W) at the image's size, ``classes``
    (N, C + 1) softmax probabilities (last column no object)."""

    mask_logits: Tensor
    masks: Tensor
    classes: Tensor

    @staticmethod
    def of(mask_logits: Tensor, class_probs: Tensor) -> "Probabilities":
        mask_logits = mask_logits.float()
        return Probabilities(mask_logits, mask_logits.sigmoid(), class_probs)


# ---------------------------------------------------------------------------------- the stage
@torch.no_grad()
def postprocess(outputs, sizes: list[tuple[int, int]], image_size, is_thing: list[bool],
                object_mask_threshold: float = MASK2FORMER_OBJECT_THRESHOLD) -> list[Prediction]:
    """Predictions of an ``Outputs`` batch (mask logits (B, N, h, w) over the SFM's square
    input, class logits (B, N, C + 1)), one per image, at ``sizes[i]``. ``image_size``: the
    backend's geometry (``geometry.geometry_of(sfm)``: how its processor maps masks back to the
    image), or an int, the letterbox at that size (the embedded SFM's).
    ``object_mask_threshold``: panoptic inference keeps a query whose top class probability
    exceeds it.

    Outputs with ``own_scores`` (SAM 3) keep its rules instead: instances and panoptic segments
    from the queries whose own score exceeds ``object_mask_threshold`` (``own_score_instances``,
    ``own_score_panoptic``); outputs with ``semantic_logits`` take semantic segmentation from
    them (``semantic_of_maps``).

    Class probabilities are one softmax over the batch. The per-pixel work runs image by image,
    vectorised over queries and classes: one image's (N, H, W) maps stay in the CPU's cache
    through the three tasks, where a batch's would not (2x faster, measured: bench/eval_speed.py),
    and no result depends on which images share a batch."""
    masks = outputs.mask_logits.detach()
    classes = outputs.class_logits.detach().float().softmax(-1)
    if len(sizes) != masks.shape[0]:
        raise ValueError(f"{len(sizes)} sizes for a batch of {masks.shape[0]} images")
    geometry = geometry_of(image_size)
    maps = outputs.semantic_logits
    preds = []
    for i, (m, c, hw) in enumerate(zip(masks, classes, sizes)):
        p = Probabilities.of(geometry.unmap(m.float(), tuple(hw)), c)
        semantic = semantic_inference(p) if maps is None else \
            semantic_of_maps(geometry.unmap(maps[i].detach().float(), tuple(hw)))
        if outputs.own_scores:
            preds.append(Prediction(semantic,
                                    own_score_instances(p, is_thing, object_mask_threshold),
                                    *own_score_panoptic(p, is_thing, object_mask_threshold)))
        else:
            preds.append(Prediction(semantic, instance_inference(p, is_thing),
                                    *panoptic_inference(p, is_thing, object_mask_threshold)))
    return preds


# ------------------------------------------------------------------------------- the 3 tasks
def semantic_inference(p: Probabilities) -> Tensor:
    """(H, W) class map: argmax over classes of sum_q p(class | q) * sigmoid(mask_q)."""
    return _argmax0(torch.einsum("qc,qhw->chw", p.classes[:, :-1], p.masks))


def _argmax0(x: Tensor) -> Tensor:
    """``x.argmax(0)`` (the first maximum wins), taken along a contiguous axis: torch's CPU
    argmax over a leading axis is ~2x slower than a transpose plus argmax over the last."""
    return x.flatten(1).t().contiguous().argmax(1).view(x.shape[1:])


def instance_inference(p: Probabilities, is_thing: list[bool], topk: int = TOPK_INSTANCES
                       ) -> Instances:
    """The top-k (query, thing class) pairs by class probability (Mask2Former); mask =
    logit > 0; score = class probability x mean mask probability inside the mask. Pairs with an
    empty mask or zero probability are dropped."""
    n, c1 = p.classes.shape
    thing = torch.tensor(is_thing, dtype=torch.bool, device=p.classes.device)
    prob = p.classes[:, :-1].masked_fill(~thing, -1.0)
    scores, idx = prob.flatten().topk(min(topk, int(thing.sum()) * n))
    queries, labels = idx // (c1 - 1), idx % (c1 - 1)
    # masks and mask scores of the queries among the top k only (~1/3 of them, measured)
    used, pair_query = torch.unique(queries, return_inverse=True)
    binary = p.mask_logits[used] > 0                                   # (U, H, W)
    inside = binary.flatten(1).sum(1)
    mask_score = (p.masks[used] * binary).flatten(1).sum(1) / (inside + 1e-6)
    keep = (inside[pair_query] > 0) & (scores > 0)
    return Instances(binary[pair_query[keep]], labels[keep],
                     (scores * mask_score[pair_query])[keep])


def panoptic_inference(p: Probabilities, is_thing: list[bool],
                       object_mask_threshold: float = MASK2FORMER_OBJECT_THRESHOLD,
                       overlap_threshold: float = OVERLAP_THRESHOLD) -> tuple[Tensor, list[dict]]:
    """A panoptic map (H, W) of segment ids 1..S (0 = void) and its segments (Mask2Former):
    queries whose top class is an object class with probability above
    ``object_mask_threshold`` compete for each pixel by score x mask probability; a query keeps
    the pixels it wins where its own mask probability is >= 0.5, and only if it won at least
    ``overlap_threshold`` of its mask. Stuff queries of one class merge into one segment."""
    scores, labels = p.classes.max(-1)
    keep = labels.ne(p.classes.shape[-1] - 1) & (scores > object_mask_threshold)
    return _panoptic_of_kept(p.masks[keep], scores[keep], labels[keep], is_thing,
                             overlap_threshold)


# ------------------------------------------------------- a model's own scores and semantic map
def semantic_of_maps(logits: Tensor) -> Tensor:
    """(H, W) class map from a model's own per-class semantic maps (C, H, W) (``Outputs.
    semantic_logits``, at the image's size): the most probable class at every pixel (no void, as
    Mask2Former's semantic inference)."""
    return _argmax0(logits)


def own_score_instances(p: Probabilities, is_thing: list[bool], threshold: float,
                        topk: int = TOPK_INSTANCES) -> Instances:
    """Instances of ``Outputs.own_scores`` queries (one class each, its probability the model's
    own score; SAM 3's (concept, query) pairs): every query of a thing class whose score
    exceeds ``threshold``, best first (at most ``topk``), mask = logit > 0, score = that
    probability (SAM 3's ``post_process_instance_segmentation``); empty masks dropped."""
    scores, labels = p.classes[:, :-1].max(-1)
    thing = torch.tensor(is_thing, dtype=torch.bool, device=scores.device)
    keep = (scores > threshold) & thing[labels]
    scores, idx = scores.masked_fill(~keep, -1.0).topk(min(topk, int(keep.sum())))
    binary = p.mask_logits[idx] > 0
    nonempty = binary.flatten(1).any(1)
    return Instances(binary[nonempty], labels[idx][nonempty], scores[nonempty])


def own_score_panoptic(p: Probabilities, is_thing: list[bool], threshold: float,
                       overlap_threshold: float = OVERLAP_THRESHOLD) -> tuple[Tensor, list[dict]]:
    """``panoptic_inference`` of ``Outputs.own_scores`` queries: a query is kept when its own
    score exceeds ``threshold`` (not when it beats "no object": its class and no object are
    the model's p and 1 - p), then Mask2Former's pixel competition and overlap rule."""
    scores, labels = p.classes[:, :-1].max(-1)
    keep = scores > threshold
    return _panoptic_of_kept(p.masks[keep], scores[keep], labels[keep], is_thing,
                             overlap_threshold)


def _panoptic_of_kept(masks: Tensor, scores: Tensor, labels: Tensor, is_thing: list[bool],
                      overlap_threshold: float) -> tuple[Tensor, list[dict]]:
    """``panoptic_inference`` from the kept queries' mask probabilities (K, H, W), scores and
    labels (K,)."""
    k, (h, w) = masks.shape[0], masks.shape[-2:]
    if k == 0:
        return torch.zeros((h, w), dtype=torch.long, device=masks.device), []
    owner = _argmax0(scores[:, None, None] * masks)                     # (H, W)
    original = masks >= 0.5                                            # (K, H, W)
    owned = original.gather(0, owner[None])[0]                         # owner's mask is on
    won = torch.bincount(owner.flatten(), minlength=k)
    won_in_mask = torch.bincount(owner[owned], minlength=k)
    mask_area = original.flatten(1).sum(1)
    ok = ((won > 0) & (mask_area > 0) & (won_in_mask > 0)
          & (won.double() / mask_area.double().clamp_min(1) >= overlap_threshold))
    seg_of_query, segments = _segment_ids(ok, labels, scores, is_thing)
    panoptic = torch.where(owned, seg_of_query.to(owner.device)[owner], 0)
    area = torch.bincount(panoptic.flatten(), minlength=len(segments) + 1).tolist()
    for s in segments:
        s["area"] = area[s["id"]]
    return panoptic, segments


def _segment_ids(ok: Tensor, labels: Tensor, scores: Tensor, is_thing: list[bool]
                 ) -> tuple[Tensor, list[dict]]:
    """Segment id of each query (0 = none) and the segments, numbered 1.. in query order; every
    stuff query of a class joins the first segment of that class."""
    seg_of_query = [0] * ok.shape[0]
    segments: list[dict] = []
    stuff: dict[int, int] = {}
    kept = ok.nonzero().flatten().tolist()
    for q, cls, score in zip(kept, labels[kept].tolist(), scores[kept].tolist()):
        if not is_thing[cls] and cls in stuff:
            seg_of_query[q] = stuff[cls]
            continue
        sid = len(segments) + 1
        if not is_thing[cls]:
            stuff[cls] = sid
        seg_of_query[q] = sid
        segments.append({"id": sid, "category": cls, "isthing": bool(is_thing[cls]),
                         "score": score})
    return torch.tensor(seg_of_query, dtype=torch.long), segments


# --------------------------------------------------------------------------- class-agnostic
BACKGROUND = 1  # class index of "background" in a class-agnostic {object, background} problem


def with_background(pred: Prediction) -> Prediction:
    """A class-agnostic prediction (one class, "object" = 0) as the 2-class problem
    {object, background}: the predicted background is every pixel that no kept query claims,
    i.e. where the panoptic map is void. It becomes class ``BACKGROUND`` in the semantic map and
    one stuff segment (score 1.0: derived, not predicted) in the panoptic map; instances are
    unchanged. So mIoU, AP50 and PQ all read objects and background off the same pixels, and a
    query set that claims every pixel, or none, scores low."""
    free = pred.panoptic == 0
    semantic = torch.where(free, BACKGROUND, 0).to(torch.long)
    panoptic, segments = pred.panoptic.clone(), [dict(s) for s in pred.segments]
    area = int(free.sum())
    if area:
        sid = len(segments) + 1
        panoptic[free] = sid
        segments.append({"id": sid, "category": BACKGROUND, "isthing": False, "score": 1.0,
                         "area": area})
    return Prediction(semantic, pred.instances, panoptic, segments)
