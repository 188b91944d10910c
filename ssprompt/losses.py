"""Hungarian matching and the Mask2Former-style set loss (class CE + mask BCE + dice), shared by
SFM pretraining and prompt learning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .sfm.base import Outputs


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
def hungarian_match(mask_logits: Tensor, class_logits: Tensor, labels: Tensor, targets: Tensor,
                    w: LossWeights) -> tuple[Tensor, Tensor]:
    """One image: (N, h, w), (N, C+1), (S,), (S, h, w) soft -> matched (query idx, target idx)."""
    if labels.numel() == 0:
        e = torch.empty(0, dtype=torch.long)
        return e, e
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
    cost = w.cls * -prob + w.bce * bce + w.dice * dice
    q, t = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)


def _layer_loss(mask_logits: Tensor, class_logits: Tensor, targets: list[tuple[Tensor, Tensor]],
                w: LossWeights) -> dict[str, Tensor]:
    b, n, c1 = class_logits.shape
    hw = tuple(mask_logits.shape[-2:])
    target_cls = torch.full((b, n), c1 - 1, dtype=torch.long, device=class_logits.device)
    flat, tm = [], []
    for i, (labels, masks) in enumerate(targets):
        soft = _fit(masks, hw)
        qi, ti = hungarian_match(mask_logits[i], class_logits[i], labels, soft, w)
        target_cls[i, qi] = labels[ti]
        flat.append(qi + i * n)
        tm.append(soft[ti])
    weight = torch.ones(c1, device=class_logits.device)
    weight[-1] = w.no_object
    loss_cls = F.cross_entropy(class_logits.flatten(0, 1).float(), target_cls.flatten(),
                               weight=weight)
    # one gather for the whole batch: per-image indexing would zero-fill a full-size gradient
    # buffer once per image in the backward pass
    pm_t = mask_logits.flatten(0, 1)[torch.cat(flat).to(mask_logits.device)].flatten(1).float()
    tm_t = torch.cat(tm).flatten(1)
    if pm_t.shape[0] == 0:
        zero = mask_logits.sum() * 0
        return {"cls": loss_cls, "bce": zero, "dice": zero}
    loss_bce = F.binary_cross_entropy_with_logits(pm_t, tm_t)
    sig = pm_t.sigmoid()
    loss_dice = (1 - (2 * (sig * tm_t).sum(-1) + 1) / (sig.sum(-1) + tm_t.sum(-1) + 1)).mean()
    return {"cls": loss_cls, "bce": loss_bce, "dice": loss_dice}


def set_loss(out: Outputs, targets: list[tuple[Tensor, Tensor]],
             w: LossWeights | None = None) -> tuple[Tensor, dict[str, float]]:
    """Total loss over the final and every auxiliary decoder layer; targets = per image
    (labels (S,), masks bool (S, H, W))."""
    w = w or LossWeights()
    total = 0.0
    parts: dict[str, float] = {}
    for masks, cls in [*out.aux, (out.mask_logits, out.class_logits)]:
        d = _layer_loss(masks, cls, targets, w)
        total = total + w.cls * d["cls"] + w.bce * d["bce"] + w.dice * d["dice"]
        for k, v in d.items():
            parts[k] = float(v.detach())  # the last layer's parts are what is reported
    return total, parts
