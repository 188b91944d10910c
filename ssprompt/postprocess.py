"""Post-processing: an SFM's per-query outputs -> semantic, instance and panoptic predictions at
each image's own size (Mask2Former's inference rules).

One stage that evaluation, prediction and the study all call. It maps the mask logits of the
SFM's letterboxed square input back to every image's (H, W) (``geometry.unletterbox``), computes
the mask and class probabilities once per batch, and derives the three tasks from them with
batched tensor ops. Metrics (``ssprompt.metrics``) only compare its ``Prediction`` objects with
the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .geometry import unletterbox

MASK2FORMER_OBJECT_THRESHOLD = 0.8  # Mask2Former's panoptic class-confidence cut (COCO)
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
    """Per-query probabilities of a batch of images of one size, shared by the three tasks:
    ``mask_logits`` / ``masks`` (B, N, H, W) (logits and sigmoid), ``classes`` (B, N, C + 1)
    (softmax, last column no object)."""

    mask_logits: Tensor
    masks: Tensor
    classes: Tensor

    @staticmethod
    def of(mask_logits: Tensor, class_logits: Tensor) -> "Probabilities":
        mask_logits = mask_logits.float()
        return Probabilities(mask_logits, mask_logits.sigmoid(), class_logits.float().softmax(-1))


# ---------------------------------------------------------------------------------- the stage
@torch.no_grad()
def postprocess(outputs, sizes: list[tuple[int, int]], image_size: int, is_thing: list[bool],
                object_mask_threshold: float = MASK2FORMER_OBJECT_THRESHOLD) -> list[Prediction]:
    """Predictions of an ``Outputs`` batch (mask logits (B, N, h, w) over the SFM's
    ``image_size`` square input, class logits (B, N, C + 1)), one per image, at ``sizes[i]``.
    ``object_mask_threshold``: panoptic inference keeps a query whose top class probability
    exceeds it."""
    masks, classes = outputs.mask_logits.detach(), outputs.class_logits.detach()
    if len(sizes) != masks.shape[0]:
        raise ValueError(f"{len(sizes)} sizes for a batch of {masks.shape[0]} images")
    out: list[Prediction | None] = [None] * len(sizes)
    for hw in dict.fromkeys(sizes):               # images of one size are processed together
        idx = [i for i, s in enumerate(sizes) if s == hw]
        # resized image by image: bilinear interpolation over more channels at once can round
        # differently in the last bit, and the numbers must not depend on the batch
        logits = torch.stack([unletterbox(masks[i], image_size, hw) for i in idx])
        p = Probabilities.of(logits, classes[idx])
        semantic = semantic_inference(p)
        instances = instance_inference(p, is_thing)
        panoptic = panoptic_inference(p, is_thing, object_mask_threshold)
        for j, i in enumerate(idx):
            out[i] = Prediction(semantic[j], instances[j], *panoptic[j])
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------- the 3 tasks
def semantic_inference(p: Probabilities) -> Tensor:
    """(B, H, W) class map: argmax over classes of sum_q p(class | q) * sigmoid(mask_q)."""
    cls = p.classes[..., :-1]
    # one matmul per image: the same summation order as scoring an image on its own
    return torch.stack([torch.einsum("qc,qhw->chw", c, m).argmax(0)
                        for c, m in zip(cls, p.masks)])


def instance_inference(p: Probabilities, is_thing: list[bool], topk: int = TOPK_INSTANCES
                       ) -> list[Instances]:
    """Per image, the top-k (query, thing class) pairs by class probability (Mask2Former); mask
    = logit > 0; score = class probability x mean mask probability inside the mask. Pairs with
    an empty mask or zero probability are dropped."""
    b, n, c1 = p.classes.shape
    h, w = p.masks.shape[-2:]
    thing = torch.tensor(is_thing, dtype=torch.bool, device=p.classes.device)
    if not thing.any():
        empty = Instances(torch.zeros(0, h, w, dtype=torch.bool, device=p.masks.device),
                          torch.zeros(0, dtype=torch.long), torch.zeros(0))
        return [empty] * b
    prob = p.classes[..., :-1].masked_fill(~thing, -1.0)
    k = min(topk, int(thing.sum()) * n)
    scores, idx = prob.flatten(1).topk(k, dim=1)                      # (B, K)
    queries, labels = idx // (c1 - 1), idx % (c1 - 1)
    rows = torch.arange(b, device=idx.device)[:, None]
    logits, probs = p.mask_logits[rows, queries], p.masks[rows, queries]   # (B, K, H, W)
    binary = logits > 0
    inside = binary.flatten(2).sum(2)
    # summed image by image: a batched sum may add in another order (last-bit differences)
    mask_sum = torch.stack([(pr * bi).flatten(1).sum(1) for pr, bi in zip(probs, binary)])
    final = scores * (mask_sum / (inside + 1e-6))
    keep = (inside > 0) & (scores > 0)
    return [Instances(binary[i][keep[i]], labels[i][keep[i]], final[i][keep[i]])
            for i in range(b)]


def panoptic_inference(p: Probabilities, is_thing: list[bool],
                       object_mask_threshold: float = MASK2FORMER_OBJECT_THRESHOLD,
                       overlap_threshold: float = OVERLAP_THRESHOLD
                       ) -> list[tuple[Tensor, list[dict]]]:
    """Per image, a panoptic map (H, W) of segment ids 1..S (0 = void) and its segments
    (Mask2Former): queries whose top class is an object class with probability above
    ``object_mask_threshold`` compete for each pixel by score x mask probability; a query keeps
    the pixels it wins where its own mask probability is >= 0.5, and only if it won at least
    ``overlap_threshold`` of its mask. Stuff queries of one class merge into one segment."""
    b, n, c1 = p.classes.shape
    scores, labels = p.classes.max(-1)                                 # (B, N)
    keep = labels.ne(c1 - 1) & (scores > object_mask_threshold)
    weighted = (scores[..., None, None] * p.masks).masked_fill(~keep[..., None, None], -1.0)
    owner = weighted.argmax(1)                                         # (B, H, W)
    original = p.masks >= 0.5                                          # (B, N, H, W)
    owned = original.gather(1, owner[:, None])[:, 0]                   # owner's mask is on
    offset = (torch.arange(b, device=owner.device) * n)[:, None, None]
    flat = (owner + offset).flatten()
    won = torch.bincount(flat, minlength=b * n).view(b, n)             # pixels won
    won_in_mask = torch.bincount(flat[owned.flatten()], minlength=b * n).view(b, n)
    mask_area = original.flatten(2).sum(2)
    ok = (keep & (won > 0) & (mask_area > 0) & (won_in_mask > 0)
          & (won.double() / mask_area.double().clamp_min(1) >= overlap_threshold))
    out = []
    for i in range(b):
        seg_of_query, segments = _segment_ids(ok[i], labels[i], scores[i], is_thing)
        panoptic = torch.where(owned[i], seg_of_query.to(owner.device)[owner[i]], 0)
        area = torch.bincount(panoptic.flatten(), minlength=len(segments) + 1).tolist()
        for s in segments:
            s["area"] = area[s["id"]]
        out.append((panoptic, segments))
    return out


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
