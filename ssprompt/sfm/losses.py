"""Hungarian matching and the Mask2Former-style set loss (class CE + mask BCE + dice), shared by
SFM pretraining and prompt learning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..sfm.base import Outputs


@dataclass
class LossWeights:
    cls: float = 2.0
    bce: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1


def _fit(masks: Tensor, hw: tuple[int, int]) -> Tensor:
    """Ground-truth masks (S, H, W) -> soft targets at the prediction resolution."""
    if masks.shape[-2:] == hw:
        return masks.float()
    return F.adaptive_avg_pool2d(masks.float().unsqueeze(0), hw)[0]


# The matching cost is computed on every MATCH_STRIDE-th pixel in each direction (Mask2Former
# likewise matches on a sample of points): 4x less work than the full 48 x 48 grid, and which
# query covers which segment is already clear at 24 x 24. The loss itself uses every pixel.
MATCH_STRIDE = 2


@torch.no_grad()
def match_cost(mask_logits: Tensor, class_logits: Tensor, labels: Tensor, targets: Tensor,
               w: LossWeights) -> Tensor:
    """The matching cost of one image's queries: (N, h, w), (N, C+1), (S,), (S, h, w) soft ->
    (N, S). Each row depends on its own query only, so a backend may compute it for a few
    queries at a time (``Sam3SFM.decode_losses``)."""
    prob = class_logits.float().softmax(-1)[:, labels]               # (N, S)
    st = MATCH_STRIDE if min(mask_logits.shape[-2:]) >= 16 * MATCH_STRIDE else 1
    logits = mask_logits[:, ::st, ::st].flatten(1).float()           # (N, P)
    tgt = targets[:, ::st, ::st].flatten(1).float()                  # (S, P)
    p = logits.shape[1]
    # mean BCE of every query against every target; softplus(-x) = softplus(x) - x, so
    # sum(t * softplus(-x) + (1 - t) * softplus(x)) = sum(softplus(x)) - x @ t
    bce = (F.softplus(logits).sum(-1, keepdim=True) - logits @ tgt.T) / p
    sig = logits.sigmoid()
    dice = 1 - (2 * sig @ tgt.T + 1) / (sig.sum(-1, keepdim=True) + tgt.sum(-1)[None] + 1)
    return w.cls * -prob + w.bce * bce + w.dice * dice


def assign(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The Hungarian assignment of a (N, S) cost: matched (query idx, target idx)."""
    q, t = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)


@torch.no_grad()
def hungarian_match(mask_logits: Tensor, class_logits: Tensor, labels: Tensor, targets: Tensor,
                    w: LossWeights) -> tuple[Tensor, Tensor]:
    """One image: (N, h, w), (N, C+1), (S,), (S, h, w) soft -> matched (query idx, target idx)."""
    if labels.numel() == 0:
        e = torch.empty(0, dtype=torch.long)
        return e, e
    return assign(match_cost(mask_logits, class_logits, labels, targets, w))


def _layer_losses(mask_logits: Tensor | None, class_logits: Tensor,
                  groups: list[list[tuple[Tensor, Tensor]]], w: LossWeights,
                  matches: list | None = None, gather=None) -> list[dict]:
    """The loss parts of each group of consecutive images of the batch (e.g. the prompt sets
    trained together): every group is scored on its own, as if it were the whole batch.
    ``groups`` hold (labels, soft target masks already at the prediction size: ``_fit``).
    A backend that did not keep every query's mask (``matched_set_losses``) passes instead each
    image's ``matches`` (query idx, target idx) and ``gather(index)``: the rows ``index`` of
    the flattened (B * N) mask logits, each flattened, float; its ``class_logits`` may then be
    a stand-in with ``shape``, ``device`` and ``cross_entropy(start, end, target, weight)``
    (= ``F.cross_entropy`` of images ``start:end``'s rows; ``sam3.PairLogits``)."""
    b, n, c1 = class_logits.shape
    target_cls = torch.full((b, n), c1 - 1, dtype=torch.long, device=class_logits.device)
    flat, tm, spans = [], [], []
    i = 0
    for targets in groups:
        start, first_mask = i, len(flat)
        for labels, soft in targets:
            qi, ti = matches[i] if matches is not None else \
                hungarian_match(mask_logits[i], class_logits[i], labels, soft, w)
            target_cls[i, qi] = labels[ti]
            flat.append(qi + i * n)
            tm.append(soft[ti])
            i += 1
        spans.append((start, i, first_mask, len(flat)))
    weight = torch.ones(c1, device=class_logits.device)
    weight[-1] = w.no_object
    # one gather of the matched masks for the whole batch: a gather (or slice) per image or per
    # group would zero-fill a full-size gradient buffer once each in the backward pass
    dev = class_logits.device  # the masks' too
    index = torch.cat(flat).to(dev) if flat else torch.empty(0, dtype=torch.long, device=dev)
    matched = gather(index) if gather is not None else \
        mask_logits.flatten(0, 1)[index].flatten(1).float()
    out, row = [], 0
    for start, end, m0, m1 in spans:
        loss_cls = F.cross_entropy(class_logits[start:end].flatten(0, 1).float(),
                                   target_cls[start:end].flatten(), weight=weight) \
            if isinstance(class_logits, Tensor) else \
            class_logits.cross_entropy(start, end, target_cls[start:end], weight)
        tm_t = torch.cat(tm[m0:m1]).flatten(1) if m1 > m0 else None
        rows = 0 if tm_t is None else tm_t.shape[0]
        pm_t = matched[row:row + rows]
        row += rows
        if rows == 0:
            zero = mask_logits[start:end].sum() * 0 if gather is None else loss_cls * 0
            out.append({"cls": loss_cls, "bce": zero, "dice": zero})
            continue
        loss_bce = F.binary_cross_entropy_with_logits(pm_t, tm_t)
        sig = pm_t.sigmoid()
        loss_dice = (1 - (2 * (sig * tm_t).sum(-1) + 1) / (sig.sum(-1) + tm_t.sum(-1) + 1)).mean()
        out.append({"cls": loss_cls, "bce": loss_bce, "dice": loss_dice})
    return out


def set_losses(out: Outputs, groups: list[list[tuple[Tensor, Tensor]]],
               w: LossWeights | None = None) -> list[tuple[Tensor, dict[str, float]]]:
    """``set_loss`` of each group of consecutive images of the batch ``out`` (``groups[g]`` =
    the targets of group g's images, in batch order), computed in one pass: each equals
    ``set_loss`` of that group's slice of the batch alone."""
    w = w or LossWeights()
    totals: list = [0.0] * len(groups)
    parts: list[dict[str, float]] = [{} for _ in groups]
    fitted: dict[tuple[int, int], list] = {}  # soft targets per prediction size, pooled once
    for masks, cls in [*out.aux, (out.mask_logits, out.class_logits)]:
        hw = tuple(masks.shape[-2:])
        if hw not in fitted:
            fitted[hw] = fit_targets(groups, hw)
        _add_layer(totals, parts, _layer_losses(masks, cls, fitted[hw], w), w)
    return list(zip(totals, parts))


def fit_targets(groups: list[list[tuple[Tensor, Tensor]]], hw: tuple[int, int]) -> list:
    """Every image's (labels, soft target masks at the prediction size ``hw``)."""
    return [[(labels, _fit(m, hw)) for labels, m in targets] for targets in groups]


def _add_layer(totals: list, parts: list[dict[str, float]], layer: list[dict],
               w: LossWeights) -> None:
    for g, d in enumerate(layer):
        totals[g] = totals[g] + w.cls * d["cls"] + w.bce * d["bce"] + w.dice * d["dice"]
        for k, v in d.items():
            parts[g][k] = float(v.detach())  # the last layer's parts are what is reported


def matched_set_losses(class_logits, fitted: list, matches: list, gather,
                       w: LossWeights | None = None) -> list[tuple[Tensor, dict[str, float]]]:
    """``set_losses`` of a one-layer output whose masks the backend did not keep: its class
    logits (B, N, C + 1) (or a stand-in: ``_layer_losses``), the targets already
    ``fit_targets``-ed to the mask size, each image's Hungarian ``matches`` (query idx, target
    idx; ``match_cost`` + ``assign``) and ``gather(index)``, the matched rows of the flattened
    (B * N) mask logits (flattened, float). Equals ``set_losses`` of the full output when the
    matches and rows are its own."""
    w = w or LossWeights()
    totals: list = [0.0] * len(fitted)
    parts: list[dict[str, float]] = [{} for _ in fitted]
    _add_layer(totals, parts, _layer_losses(None, class_logits, fitted, w, matches, gather), w)
    return list(zip(totals, parts))


def set_loss(out: Outputs, targets: list[tuple[Tensor, Tensor]],
             w: LossWeights | None = None) -> tuple[Tensor, dict[str, float]]:
    """Total loss over the final and every auxiliary decoder layer; targets = per image
    (labels (S,), masks bool (S, H, W))."""
    return set_losses(out, [targets], w)[0]
