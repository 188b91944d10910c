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

**Large images** (more than ``FULL_SIZE_ELEMENTS`` query-pixels) never hold every query's
full-size map: ``_large_prediction`` maps the logits back in column bands
(``geometry.Letterbox.unmap_bands``, equal bit for bit to slices of the full-size maps) and
derives the three tasks band by band; what outlives a band is (H, W) per image (class map, the
panoptic owner) and the kept instances' bool masks. Semantic maps, panoptic maps and segments,
instance masks and categories equal the full-size computation's; an instance's score (class
probability x its mask's mean probability) is summed band by band, so it may differ from the
full-size float32 sum in the last bits (tested: ``tests/evaluation/test_postprocess.py``).
Smaller images, the study's 96 x 96 scenes among them, take the full-size path unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..geometry import geometry_of
from ..sfm.base import MASK2FORMER_OBJECT_THRESHOLD  # noqa: F401 (re-exported)

OVERLAP_THRESHOLD = 0.8   # Mask2Former: a query keeps its segment if it won >= 80% of its mask
TOPK_INSTANCES = 100      # Mask2Former / COCO: at most 100 instances per image
# Above this many query-pixels (queries x H x W, 64 MB of float32) an image takes the banded
# path (``_large_prediction``); at or below it, the full-size one (e.g. 100 queries on a 96 x 96
# scene: 0.9 M)
FULL_SIZE_ELEMENTS = 1 << 24


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
        big = max(m.shape[0], 0 if maps is None else maps.shape[1]) * hw[0] * hw[1]
        if big > FULL_SIZE_ELEMENTS:
            preds.append(_large_prediction(m, c, tuple(hw), geometry, is_thing,
                                           object_mask_threshold, outputs.own_scores,
                                           None if maps is None else maps[i].detach()))
            continue
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


# ------------------------------------------------------------------------------ large images
@torch.no_grad()
def _large_prediction(mask_logits: Tensor, classes: Tensor, hw: tuple[int, int], geometry,
                      is_thing: list[bool], threshold: float, own_scores: bool,
                      maps: Tensor | None, band_elements: int | None = None) -> Prediction:
    """One image's ``Prediction`` as ``postprocess`` computes it at full size, from the mask
    logits (N, h, w) mapped back in column bands: no (N, H, W) tensor is ever held. Which
    queries each task uses is decided from the class probabilities first (the same rules as
    ``instance_inference`` / ``panoptic_inference`` or their ``own_score_*`` forms); only those
    queries are mapped back (all N where the semantic map is Mask2Former's sum over queries)."""
    from ..geometry import BAND_ELEMENTS

    band_elements = band_elements or BAND_ELEMENTS
    H, W = hw
    dev = classes.device
    thing = torch.tensor(is_thing, dtype=torch.bool, device=dev)
    n, c1 = classes.shape
    if own_scores:   # own_score_instances / own_score_panoptic
        top, labels = classes[:, :-1].max(-1)
        keep = (top > threshold) & thing[labels]
        i_scores, i_query = top.masked_fill(~keep, -1.0).topk(min(TOPK_INSTANCES, int(keep.sum())))
        i_labels = labels[i_query]
        pan = top > threshold
        p_scores, p_labels = top[pan], labels[pan]
    else:            # instance_inference / panoptic_inference
        prob = classes[:, :-1].masked_fill(~thing, -1.0)
        i_scores, idx = prob.flatten().topk(min(TOPK_INSTANCES, int(thing.sum()) * n))
        i_query, i_labels = idx // (c1 - 1), idx % (c1 - 1)
        top, labels = classes.max(-1)
        pan = labels.ne(c1 - 1) & (top > threshold)
        p_scores, p_labels = top[pan], labels[pan]
    p_query = pan.nonzero().flatten()
    einsum_semantic = maps is None
    rows = torch.arange(n, device=dev) if einsum_semantic else \
        _rows(torch.unique(torch.cat([i_query, p_query])), n)
    where = torch.full((n,), -1, dtype=torch.long, device=dev)
    where[rows] = torch.arange(len(rows), device=dev)
    used, pair_query = torch.unique(i_query, return_inverse=True)    # instance queries
    used_row, pan_row = where[used], where[p_query]
    k = len(p_query)

    semantic = torch.empty((H, W), dtype=torch.long, device=dev)
    inst = torch.empty((len(i_query), H, W), dtype=torch.bool, device=dev)
    inside = torch.zeros(len(used), dtype=torch.long, device=dev)
    mask_sum = torch.zeros(len(used), dtype=torch.float64, device=dev)
    owner = torch.zeros((H, W), dtype=torch.long, device=dev)
    owned = torch.zeros((H, W), dtype=torch.bool, device=dev)
    won = torch.zeros(k, dtype=torch.long, device=dev)
    won_in_mask = torch.zeros(k, dtype=torch.long, device=dev)
    mask_area = torch.zeros(k, dtype=torch.long, device=dev)
    bands = geometry.unmap_bands(mask_logits[rows].float(), hw, band_elements) if len(rows) \
        else []
    for c0, c1_, logits in bands:
        sig = logits.sigmoid()                                          # (R, H, w)
        if einsum_semantic:
            semantic[:, c0:c1_] = _argmax0(torch.einsum("qc,qhw->chw", classes[:, :-1], sig))
        if len(used):
            binary = logits[used_row] > 0                               # (U, H, w)
            inst[:, :, c0:c1_] = binary[pair_query]
            inside += binary.flatten(1).sum(1)
            if not own_scores:
                mask_sum += (sig[used_row] * binary).flatten(1).sum(1).double()
        if k:
            masks = sig[pan_row]
            own = _argmax0(p_scores[:, None, None] * masks)             # (H, w)
            original = masks >= 0.5
            on = original.gather(0, own[None])[0]
            owner[:, c0:c1_], owned[:, c0:c1_] = own, on
            won += torch.bincount(own.flatten(), minlength=k)
            won_in_mask += torch.bincount(own[on], minlength=k)
            mask_area += original.flatten(1).sum(1)
    if not einsum_semantic:
        semantic = _semantic_of_maps_banded(maps, hw, geometry, band_elements)

    # instances, as instance_inference / own_score_instances
    if own_scores:
        keep = inside[pair_query] > 0
        scores = i_scores
    else:
        mask_score = mask_sum.float() / (inside + 1e-6)
        keep = (inside[pair_query] > 0) & (i_scores > 0)
        scores = i_scores * mask_score[pair_query]
    instances = Instances(inst if bool(keep.all()) else inst[keep], i_labels[keep],
                          scores[keep])
    del inst

    # panoptic, as _panoptic_of_kept
    if k == 0:
        return Prediction(semantic, instances, torch.zeros((H, W), dtype=torch.long, device=dev),
                          [])
    ok = ((won > 0) & (mask_area > 0) & (won_in_mask > 0)
          & (won.double() / mask_area.double().clamp_min(1) >= OVERLAP_THRESHOLD))
    seg_of_query, segments = _segment_ids(ok, p_labels, p_scores, is_thing)
    panoptic = torch.where(owned, seg_of_query.to(dev)[owner], 0)
    del owner, owned
    area = torch.bincount(panoptic.flatten(), minlength=len(segments) + 1).tolist()
    for s in segments:
        s["area"] = area[s["id"]]
    return Prediction(semantic, instances, panoptic, segments)


def _semantic_of_maps_banded(maps: Tensor, hw: tuple[int, int], geometry,
                             band_elements: int) -> Tensor:
    """``semantic_of_maps(geometry.unmap(maps, hw))`` without the (C, H, W) maps: classes in
    chunks, column bands, a running maximum (a later chunk's class replaces the best only when
    strictly larger: the first maximum wins, as ``argmax``)."""
    H, W = hw
    c = maps.shape[0]
    step = max(4, band_elements // max(1, maps.shape[-2] * W))   # bounds the (step, h, W) pass
    best = torch.full((H, W), float("-inf"), device=maps.device)
    semantic = torch.zeros((H, W), dtype=torch.long, device=maps.device)
    for k0 in range(0, c, step):
        k1 = min(c, k0 + step)
        k0 = max(0, k1 - 4) if k1 - k0 == 3 else k0   # see _rows: 3 channels, another kernel
        for c0, c1, band in geometry.unmap_bands(maps[k0:k1].float(), hw, band_elements):
            arg = _argmax0(band)
            value = band.gather(0, arg[None])[0]
            better = value > best[:, c0:c1]
            best[:, c0:c1] = torch.where(better, value, best[:, c0:c1])
            semantic[:, c0:c1] = torch.where(better, arg + k0, semantic[:, c0:c1])
    return semantic


def _rows(needed: Tensor, n: int) -> Tensor:
    """The queries to map back: ``needed`` (sorted, unique), plus one more when that makes 3 of
    n > 3: on one thread torch resizes exactly 3 channels with another kernel (its separable
    one) than the full-size call's n, and the bits would differ."""
    if len(needed) == 3 and n > 3 and torch.get_num_threads() == 1:
        extra = torch.ones(n, dtype=torch.bool, device=needed.device)
        extra[needed] = False
        needed = torch.sort(torch.cat([needed, extra.nonzero()[:1, 0]])).values
    return needed


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
