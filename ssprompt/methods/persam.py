"""PerSAM and PerSAM-F (Zhang et al. 2023, github ZrrSkywalker/Personalize-SAM) on a frozen SFM.

PerSAM is training-free: per class, a *prototype* is the mean of the image encoder's features
under that class's masks over the support images (``prepare``); on each target image the
prototype's cosine-similarity map picks the spatial prompt: its top-1 location is a positive
point, its lowest a negative point (where the backend takes point labels: SAM, SAM 2), and
these class prompts are decoded *in place of* the default point grid (``decode``: the points
come from each image's own features). PerSAM-F adds 2 learned weights over SAM's 3 multimask
outputs (init 1/3, the first mask takes 1 - w1 - w2), fitted with Dice + focal loss.

How it maps onto ssprompt's query-based decoders:

* **One query per class (and per positive point).** ``points_per_class`` (default 1, PerSAM's
  top-1) positive points per class with a prototype (a class the shots show), each encoded by
  the backend's point encoder (``sfm.encode_points``; SAM / SAM 2: their prompt encoder with
  the positive and the negative point and their labels) is one spatial prompt, one query: C
  queries per image instead of the grid's N (``keep_grid`` also decodes the grid beside them).
  PerSAM replaces SAM's automatic grid by its located prompt, so the grid is dropped by default.
* **Classes come from the SFM.** PerSAM segments one concept and never classifies; in a
  C-class scene the frozen decoder scores each prompted query as it scores any query (the
  embedded SFM and SAM 3: against the class names; SAM / SAM 2: its IoU head, class-agnostic),
  so a point that lands on another class's object (its class is absent) is scored as that
  object, not forced to the prototype's class.
* **Target-guided attention and target-semantic prompting** (PerSAM's two decoder tweaks) are
  passed where the decoder takes them, transformers' SAM / SAM 2 mask decoders
  (``attention_similarity``: the sigmoid of the standardised similarity map; ``target_embedding``:
  the class's mean feature); the embedded SFM and SAM 3 have no such inputs. PerSAM's cascaded
  post-refinement (two more decoder passes with the mask and box fed back) is left out: ssprompt's
  decoders take no mask input (embedded, SAM 3), and it would triple SAM's cost.
* **Features.** The image encoder's output (``encoder_map``): the embedded SFM's tokens, SAM's /
  SAM 2's image embedding, SAM 3's lowest-resolution FPN level. A mask is area-resized to that
  grid; a prototype is the coverage-weighted mean of the features (every instance, every shot).
* **PerSAM-F** needs multimask outputs: SAM and SAM 2 (``multimask_output=True``). Its weights
  are fitted in ``prepare``, exactly the recipe (AdamW lr 1e-3, eps 1e-4, cosine, 1,000 steps,
  Dice + focal), on the support images' own class prompts: each (shot, class) pair's top-1
  query against the ground-truth segment of that class under its point. The decoder's outputs
  do not depend on the weights, so they are decoded once and the 1,000 steps cost no decoder
  pass; the study's step budget does not apply (the method's 2 parameters are not trained by
  the shared loop). The embedded SFM and SAM 3 give one mask per query (no multimask
  outputs), so PerSAM-F does not apply there (``build`` refuses).

Identity: PerSAM replaces the grid, so it is not zero-shot at init; with
``points_per_class=0, keep_grid=True`` it decodes exactly the grid (zero-shot), and so does a
state with no prototype (before ``prepare``, or ``restore_defaults``).

The options are declared torch-free (``ssprompt train --help`` imports no torch); the state
class is defined on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import UserError
from .options import Options, opt

PERSAM_F_INIT = 1.0 / 3.0     # PerSAM-F: each of its 2 mask weights starts at 1/3
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


@dataclass
class PerSAMOptions(Options):
    points_per_class: int = opt(1, "persam: positive point prompts per class, the top of its "
                                "prototype's similarity map (PerSAM: 1; 0 with keep_grid: "
                                "zero-shot)")
    keep_grid: bool = opt(False, "persam: also decode the default grid beside the class "
                          "prompts (PerSAM replaces the grid: no)")
    negative_point: bool = opt(True, "persam: add the similarity map's lowest point as a "
                               "negative point where the backend takes point labels (SAM, SAM 2)")
    guided: bool = opt(True, "persam: target-guided attention and target-semantic prompting "
                       "where the decoder takes them (SAM, SAM 2)")

    def __post_init__(self):
        super().__post_init__()
        n = self.points_per_class
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise UserError(f"points_per_class {n}: must be a non-negative integer",
                            field="points_per_class")
        if n == 0 and not self.keep_grid:
            raise UserError("points_per_class 0 without keep_grid: no prompt left",
                            field="points_per_class")


@dataclass
class PerSAMFOptions(PerSAMOptions):
    persam_steps: int = opt(1000, "persam_f: AdamW steps fitting its 2 mask weights (on the "
                            "decoder's cached outputs; PerSAM-F: 1000)")
    persam_lr: float = opt(1e-3, "persam_f: the mask weights' AdamW learning rate (cosine)")


def encoder_map(feats):
    """(B, D, h, w) float: the image encoder's output feature map in ``feats`` (the embedded
    SFM's tokens, SAM's / SAM 2's image embedding, SAM 3's lowest-resolution FPN level)."""
    t = feats.tensors
    if "image_embeddings" in t:
        return t["image_embeddings"].float()
    if "tokens" in t:
        x = t["tokens"].float()
        b, n, d = x.shape
        s = int(round(n ** 0.5))
        return x.transpose(1, 2).reshape(b, d, s, n // s)
    fpn = sorted(k for k in t if k.startswith("fpn"))
    if fpn:
        return t[fpn[-1]].float()
    raise UserError(f"no image-encoder feature map among the features ({', '.join(t)})")


def resize_to(x, hw):
    """(B, S, H, W) maps -> (B, S, h, w): area average when shrinking, bilinear otherwise."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if x.shape[-2] >= hw[0] and x.shape[-1] >= hw[1]:
        return F.adaptive_avg_pool2d(x, hw)
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def _dice_focal(logits, target):
    """PerSAM-F's loss: Dice + sigmoid focal (alpha 0.25, gamma 2), mean over masks."""
    import torch.nn.functional as F

    x, t = logits.flatten(1), target.flatten(1)
    p = x.sigmoid()
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    a_t = FOCAL_ALPHA * t + (1 - FOCAL_ALPHA) * (1 - t)
    focal = (a_t * ce * (1 - p_t) ** FOCAL_GAMMA).mean(-1)
    return (dice + focal).mean()


def _is_point_prompt_sfm(sfm) -> bool:
    from ..sfm.sam_common import PointPromptSFM

    return isinstance(sfm, PointPromptSFM)


@functools.cache
def state_class():
    """The PerSAM state class (defined on first use: torch is imported here, not at import)."""
    return _define()


def build(sfm, class_names, options, generator=None, is_thing=None):
    return state_class()(sfm, class_names, options, is_thing=is_thing)


def _define():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ..prompts.promptset import default_prompts
    from ..sfm.base import Outputs, default_n_prompts
    from ..sfm.losses import _fit
    from ..sfm.sam_common import IOU_EPS
    from .base import MethodState

    class PerSAM(MethodState):
        """Per-class prototypes (``prepare``) whose similarity maps place each image's point
        prompts (``decode``); PerSAM-F (``options.method == "persam_f"``) adds its 2 mask
        weights over SAM's multimask outputs."""

        def __init__(self, sfm, class_names, options, is_thing=None):
            super().__init__()
            if options.n_prompts is None:
                options.n_prompts = default_n_prompts(sfm)
            self.options = options
            self.class_names = None if class_names is None else list(class_names)
            self.is_thing = None if is_thing is None else [bool(x) for x in is_thing]
            self.fine_tuned = options.method == "persam_f"
            self.sam = _is_point_prompt_sfm(sfm)
            if self.fine_tuned and not self.sam:
                raise UserError(f"kind persam_f: {type(sfm).__name__} gives one mask per "
                                "query (no multimask outputs to weigh); use kind persam",
                                field="kind")
            spatial, semantic = default_prompts(sfm, class_names, options.n_prompts)
            self.register_buffer("spatial_default", spatial, persistent=False)
            self.register_buffer("semantic_default", semantic, persistent=False)
            n_classes = 1 if semantic is None else len(class_names)
            # (C, D) prototypes (D is the feature map's, known at prepare / load), seen (C,)
            self.register_buffer("prototypes", torch.zeros(n_classes, 0))
            self.register_buffer("seen", torch.zeros(n_classes))
            if self.fine_tuned:
                self.mask_weights = nn.Parameter(torch.full((2,), PERSAM_F_INIT),
                                                 requires_grad=False)

        # -- the protocol ---------------------------------------------------------------
        def forward(self):
            return self.spatial_default, self.semantic_default

        @property
        def agnostic(self) -> bool:
            return self.semantic_default is None

        @property
        def needs_shots(self) -> bool:
            return True

        def trainable(self):
            return []       # PerSAM-F's weights are fitted in prepare (its own recipe)

        def num_trainable(self) -> int:
            return 2 if self.fine_tuned else 0

        def restore_defaults(self, sfm) -> None:
            self.prototypes = torch.zeros(self.seen.shape[0], 0, device=self.seen.device)
            self.seen.zero_()

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            key = prefix + "prototypes"
            if key in state_dict:
                self.prototypes = torch.zeros_like(state_dict[key], device=self.seen.device)
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

        # -- prototypes -------------------------------------------------------------------
        @torch.no_grad()
        def prepare(self, sfm, feats, targets) -> None:
            fmap = encoder_map(feats)                                  # (B, D, h, w)
            c, d = self.seen.shape[0], fmap.shape[1]
            total = torch.zeros(c, d, dtype=torch.float64, device=fmap.device)
            weight = torch.zeros(c, dtype=torch.float64, device=fmap.device)
            for i, (labels, masks) in enumerate(targets):
                if labels.numel() == 0:
                    continue
                cover = resize_to(masks.float()[None].to(fmap.device), fmap.shape[-2:])[0]
                f = fmap[i].flatten(1).double()                        # (D, hw)
                for lab, m in zip(labels.tolist(), cover.flatten(1).double()):
                    total[lab] += f @ m
                    weight[lab] += m.sum()
            seen = weight > 0
            protos = torch.where(seen[:, None], total / weight.clamp_min(1e-12)[:, None], 0.0)
            self.prototypes = protos.float().to(self.seen.device)
            self.seen = seen.float().to(self.seen.device)
            if self.fine_tuned and seen.any():
                self._fit_weights(sfm, feats, targets)

        def _classes(self):
            return [int(c) for c in torch.nonzero(self.seen > 0).flatten().tolist()]

        def _similarity(self, feats, classes):
            """(B, S, h, w) cosine maps of the prototypes of ``classes`` on each image."""
            fmap = F.normalize(encoder_map(feats), dim=1)
            protos = F.normalize(self.prototypes[classes].to(fmap.device), dim=-1)
            return torch.einsum("sd,bdhw->bshw", protos, fmap)

        def _points(self, sim, k):
            """Top-``k`` (positive) and lowest (negative) locations of each map, as [0, 1]
            (x, y) cell centres: (B, S * k, 2) positive, (B, S * k, 2) its class's negative,
            (B, S * k) the prompt's class position in ``sim``."""
            b, s, h, w = sim.shape
            flat = sim.flatten(2)
            top = flat.topk(min(k, h * w), dim=-1).indices               # (B, S, k)
            low = flat.argmin(-1, keepdim=True).expand_as(top)

            def xy(idx):
                return torch.stack([(idx % w + 0.5) / w, (idx // w + 0.5) / h], -1).float()
            owner = torch.arange(s, device=sim.device)[None, :, None].expand_as(top)
            return xy(top).flatten(1, 2), xy(low).flatten(1, 2), owner.flatten(1)

        # -- decoding ---------------------------------------------------------------------
        def decode(self, sfm, feats, spatial, semantic):
            classes = self._classes()
            k = self.options.points_per_class
            if not classes or k == 0:
                return sfm.decode(feats, spatial, semantic)            # the grid: zero-shot
            sim = self._similarity(feats, classes)
            pos, neg, owner = self._points(sim, k)
            if self.sam:
                out = self._decode_sam(sfm, feats, sim, pos, neg, owner, classes,
                                       self.fine_tuned)
            else:
                enc = torch.stack([sfm.encode_points(p) for p in pos])  # (B, M, D)
                out = sfm.decode(feats, enc, semantic)
            if not self.options.keep_grid:
                return out
            grid = sfm.decode(feats, spatial, semantic)
            return Outputs(torch.cat([grid.mask_logits, out.mask_logits.to(
                grid.mask_logits.dtype)], 1), torch.cat([grid.class_logits,
                out.class_logits.to(grid.class_logits.dtype)], 1),
                semantic_logits=grid.semantic_logits, own_scores=grid.own_scores)

        def _sam_masks(self, sfm, feats, sim, pos, neg, owner, classes, multimask):
            """SAM / SAM 2's mask decoder on each image's class prompts (positive point, and
            the negative one where asked), with PerSAM's target-guided attention and
            target-semantic prompting: masks (B, M, K, h, w), IoU (B, M, K)."""
            ref = sfm._ref
            tensors = {n: v.to(device=ref.device, dtype=ref.dtype)
                       for n, v in feats.tensors.items()}
            b, m = pos.shape[:2]
            pts = pos[:, :, None] if not self.options.negative_point else \
                torch.stack([pos, neg], 2)
            pts = (pts * sfm.image_size).to(device=ref.device, dtype=ref.dtype)
            labels = torch.ones(pts.shape[:3], dtype=torch.int, device=ref.device)
            if self.options.negative_point:
                labels[:, :, 1] = 0
            sparse, _ = sfm.model.prompt_encoder(input_points=pts, input_labels=labels,
                                                 input_boxes=None, input_masks=None)
            emb = tensors["image_embeddings"]
            h, w = emb.shape[-2:]
            dense = ref.reshape(1, -1, 1, 1).expand(b, -1, h, w)
            posenc = sfm.model.get_image_wide_positional_embeddings().expand(b, -1, -1, -1)
            extra = {}
            if self.options.guided:
                # PerSAM: the similarity map, standardised, sigmoid, at the embedding's size,
                # biases the token-to-image attention; the class's mean feature is added to
                # the prompt tokens
                own = torch.gather(sim, 1, owner[:, :, None, None].expand(-1, -1, *sim.shape[2:]))
                std = (own - own.mean((-2, -1), keepdim=True)) / \
                    own.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
                std = resize_to(std, (h, w)).sigmoid()
                extra["attention_similarity"] = std.reshape(b * m, 1, 1, h * w).to(
                    device=ref.device, dtype=ref.dtype)
                target = self.prototypes[classes].to(ref.device)[owner]     # (B, M, D')
                if target.shape[-1] == sparse.shape[-1]:
                    extra["target_embedding"] = target[:, :, None].to(ref.dtype)
            masks, iou = sfm.model.mask_decoder(
                image_embeddings=emb, image_positional_embeddings=posenc,
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multimask, **extra, **sfm._decoder_extras(tensors))[:2]
            return masks, iou

        def _weights(self):
            w = self.mask_weights
            return torch.cat([1 - w.sum(0, keepdim=True), w])

        def _decode_sam(self, sfm, feats, sim, pos, neg, owner, classes, multimask):
            masks, iou = self._sam_masks(sfm, feats, sim, pos, neg, owner, classes, multimask)
            if multimask:   # PerSAM-F: the weighted sum of the 3 masks (and of their IoUs)
                wt = self._weights().to(masks.dtype)
                masks = (masks * wt[:, None, None]).sum(2)
                iou = (iou * wt).sum(2)
            else:
                masks, iou = masks[:, :, 0], iou[:, :, 0]
            obj = torch.logit(iou.float().clamp(IOU_EPS, 1 - IOU_EPS))
            return Outputs(masks, torch.stack([obj, torch.zeros_like(obj)], -1))

        def _fit_weights(self, sfm, feats, targets) -> None:
            """PerSAM-F on the shots: each (shot, class) pair's top-1 prompt, decoded once with
            multimask outputs, against the class's ground-truth segment under its point;
            its 2 weights fitted by AdamW (lr, eps 1e-4, cosine) on Dice + focal."""
            classes = self._classes()
            logits, goals = [], []
            with torch.no_grad():
                for i, (labels, masks) in enumerate(targets):
                    present = [c for c in classes if c in set(labels.tolist())]
                    if not present:
                        continue
                    one = feats.index([i])
                    sim = self._similarity(one, present)
                    pos, neg, owner = self._points(sim, 1)
                    out, _ = self._sam_masks(sfm, one, sim, pos, neg, owner, present, True)
                    hh, ww = masks.shape[-2:]
                    for j, c in enumerate(present):
                        x, y = pos[0, j].tolist()
                        px, py = min(int(x * ww), ww - 1), min(int(y * hh), hh - 1)
                        hit = [s for s in range(len(labels)) if int(labels[s]) == c
                               and bool(masks[s, py, px])]
                        if hit:
                            logits.append(out[0, j].float())
                            goals.append(_fit(masks[hit[0]][None], tuple(out.shape[-2:]))[0])
            if not logits:
                return
            x, t = torch.stack(logits), torch.stack(goals).to(logits[0].device)
            steps = self.options.persam_steps
            w = nn.Parameter(torch.full((2,), PERSAM_F_INIT, device=x.device))
            opt = torch.optim.AdamW([w], lr=self.options.persam_lr, eps=1e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
            with torch.enable_grad():
                for _ in range(steps):
                    wt = torch.cat([1 - w.sum(0, keepdim=True), w])
                    loss = _dice_focal((x * wt[:, None, None]).sum(1), t)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
            with torch.no_grad():
                self.mask_weights.copy_(w.detach().to(self.mask_weights.device))

    return PerSAM
