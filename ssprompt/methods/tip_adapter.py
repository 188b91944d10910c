"""Tip-Adapter and Tip-Adapter-F (Zhang et al. 2022, github gaopengcuhk/Tip-Adapter) on the
mask embeddings of a frozen SFM: the training-free cache of few-shot features that PrAda builds
on.

Tip-Adapter keeps a cache of the few-shot images' features (keys K, L2-normalised) and their
one-hot labels (values L); a test feature f adds ``alpha * exp(-beta * (1 - f K^T)) L`` to the
zero-shot logits. Here:

* **Features are per query.** The SFM's ``Outputs`` carry no per-query embedding, so a query's
  feature is the image encoder's feature map (``persam.encoder_map``: the embedded SFM's tokens,
  SAM 3's lowest-resolution FPN level) pooled under the query's predicted mask (the mask
  probabilities resized to the feature grid, weighted by probability inside the mask, the whole
  soft mask when nothing is above 0.5), L2-normalised; computed from ``feats`` inside
  ``decode``.
* **Keys are the shots' matched queries.** ``prepare`` decodes the support shots with the
  default prompts, Hungarian-matches the queries to the ground-truth segments (the set loss's
  matcher, ``sfm.losses.hungarian_match``), and keeps each matched query's feature as a key,
  its segment's class as the value. The cache term is added to the C class logits of every
  query; the "no object" logit is left as it is. The term sums over keys as Tip-Adapter does.
* **alpha and beta are chosen on the shots, never on test**: by leave-one-image-out, each shot
  is scored with the cache built from the other shots, on a grid fixed in advance
  (``tip_alphas`` x ``tip_betas``, default {0, 0.5, 1, 2, 4} x {1, 3, 5.5, 10}). The score is
  the per-query classification accuracy of that shot's queries (argmax over the C classes and
  "no object" against the matched class, else "no object"), matched queries weighing 1 and
  unmatched 0.1 (the set loss's no-object weight), summed over the held-out shots; ties go to
  the smaller alpha, then the smaller beta (alpha = 0 is zero-shot, so the choice can only
  keep or beat zero-shot on the held-out shots). With one shot nothing can be held out:
  Tip-Adapter's start, alpha 1.17, beta 1. ``tip_alpha`` / ``tip_beta`` fix either instead.
  With alpha = 0 the SFM's outputs are returned untouched (zero-shot, bit for bit).
* **Tip-Adapter-F** trains the keys (AdamW lr 1e-3, eps 1e-4, weight decay 0.01: torch's
  AdamW default the recipe keeps) with the set loss, in the shared loop under the study's
  schedule (warm-up, cosine): its 20 epochs over the few-shot set become the shared step
  budget (100 steps of 8 images = 50 passes over 16 shots, at least 20 epochs for up to 40
  shots). alpha, beta are chosen before training by the same leave-one-image-out search over
  the grid's alpha > 0 (a cache at alpha 0 cannot learn; the recipe's search after training
  would need shots the keys were not trained on).
* Tip-Adapter classifies, so it needs class prompts: SAM and SAM 2 (class-agnostic) are
  refused. On SAM 3 every (concept, query) pair is a query: its cache term re-weighs its own
  concept's score against "no object" (the other concepts' -30 logits stay negligible); SAM
  3's semantic maps are left as they are.

The options are declared torch-free (``ssprompt train --help`` imports no torch); the state
class is defined on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import UserError
from .options import Options, opt

TIP_START = (1.17, 1.0)        # Tip-Adapter's alpha, beta before any search
NO_OBJECT_WEIGHT = 0.1         # the set loss's no-object weight (sfm.losses.LossWeights)
FINE_TUNE_EPS, FINE_TUNE_DECAY = 1e-4, 0.01


def _floats(value, name: str) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [x for x in value.replace(" ", "").split(",") if x]
    try:
        out = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise UserError(f"{name} {value!r}: a comma list of numbers", field=name) from None
    if not out or any(x < 0 for x in out):
        raise UserError(f"{name} {value!r}: a non-empty list of numbers >= 0", field=name)
    return out


@dataclass
class TipAdapterOptions(Options):
    tip_alpha: float | None = opt(None, "tip_adapter: the cache's weight alpha (default: "
                                  "chosen on the shots, leave-one-image-out over tip_alphas)")
    tip_beta: float | None = opt(None, "tip_adapter: the cache's sharpness beta (default: "
                                 "chosen with alpha over tip_betas)")
    tip_alphas: str = opt("0,0.5,1,2,4", "tip_adapter: the alpha grid of the "
                          "leave-one-image-out search (a comma list)")
    tip_betas: str = opt("1,3,5.5,10", "tip_adapter: the beta grid (a comma list)")

    def __post_init__(self):
        super().__post_init__()
        self.tip_alphas = _floats(self.tip_alphas, "tip_alphas")
        self.tip_betas = _floats(self.tip_betas, "tip_betas")
        for name in ("tip_alpha", "tip_beta"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _floats([v], name)[0])


@dataclass
class TipAdapterFOptions(TipAdapterOptions):
    tip_lr: float = opt(1e-3, "tip_adapter_f: the keys' AdamW learning rate (Tip-Adapter-F: "
                        "1e-3; the schedule's warm-up and cosine decay apply)")


def query_features(mask_logits, fmap):
    """(B, N, D) L2-normalised features of each query: ``fmap`` (B, D, h, w) pooled under the
    query's mask (probabilities resized to (h, w), weighted by probability where above 0.5;
    the whole soft mask when none is)."""
    import torch
    import torch.nn.functional as F

    from .persam import resize_to

    prob = resize_to(mask_logits.detach().float().sigmoid(), fmap.shape[-2:])   # (B, N, h, w)
    inside = prob * (prob > 0.5)
    empty = inside.flatten(2).sum(-1) <= 0
    w = torch.where(empty[..., None, None], prob, inside).flatten(2)
    pooled = torch.einsum("bnp,bdp->bnd", w, fmap.flatten(2)) / \
        w.sum(-1, keepdim=True).clamp_min(1e-12)
    return F.normalize(pooled, dim=-1)


def cache_logits(f, keys, values, alpha: float, beta: float):
    """Tip-Adapter: alpha * exp(-beta * (1 - f K^T)) L; f (..., D), keys (M, D), values
    (M, C) -> (..., C)."""
    import torch

    return alpha * torch.exp(-beta * (1 - f @ keys.t())) @ values


def loo_choice(feats_, logits_, targets_, keys, values, owner, alphas, betas):
    """Leave-one-image-out choice of (alpha, beta): each image's queries (features (N, D),
    SFM class logits (N, C + 1), target classes (N,), C = no object) scored with the cache of
    the other images' keys (``owner``: each key's image). Returns (alpha, beta, table)."""
    import torch

    scores = {(a, b): 0.0 for a in alphas for b in betas}
    for i, (f, z, t) in enumerate(zip(feats_, logits_, targets_)):
        other = owner != i
        if not other.any():
            continue
        c = z.shape[-1] - 1
        weight = torch.where(t < c, 1.0, NO_OBJECT_WEIGHT)
        sim = f @ keys[other].t()
        for b in betas:
            cache = torch.exp(-b * (1 - sim)) @ values[other]
            for a in alphas:
                zz = torch.cat([z[:, :c] + a * cache, z[:, c:]], -1)
                right = (zz.argmax(-1) == t).double()
                scores[(a, b)] += float((weight * right).sum() / weight.sum())
    best = None
    for a in sorted(alphas):
        for b in sorted(betas):
            if best is None or scores[(a, b)] > scores[best] + 1e-12:
                best = (a, b)
    return best[0], best[1], scores


@functools.cache
def state_class():
    """The Tip-Adapter state class (defined on first use: torch is imported here)."""
    return _define()


def build(sfm, class_names, options, generator=None, is_thing=None):
    return state_class()(sfm, class_names, options, is_thing=is_thing)


def _define():
    import torch
    from torch import nn

    from ..prompts.promptset import default_prompts
    from ..sfm.base import default_n_prompts
    from ..sfm.losses import LossWeights, _fit, hungarian_match
    from .base import MethodState
    from .persam import encoder_map

    class TipAdapter(MethodState):
        """A cache of the shots' matched query features (keys) and their classes (values)
        whose affinity adds to the SFM's class logits; ``tip_adapter_f`` trains the keys."""

        def __init__(self, sfm, class_names, options, is_thing=None):
            super().__init__()
            if class_names is None or not sfm.has_text_encoder:
                raise UserError(f"kind {options.method}: {type(sfm).__name__} predicts no "
                                "classes (no text encoder), so a class cache does not apply",
                                field="kind")
            if options.n_prompts is None:
                options.n_prompts = default_n_prompts(sfm)
            self.options = options
            self.class_names = list(class_names)
            self.is_thing = None if is_thing is None else [bool(x) for x in is_thing]
            self.fine_tuned = options.method == "tip_adapter_f"
            spatial, semantic = default_prompts(sfm, class_names, options.n_prompts)
            self.register_buffer("spatial_default", spatial, persistent=False)
            self.register_buffer("semantic_default", semantic, persistent=False)
            # the cache: (M, D) keys, (M, C) one-hot values; empty until prepare
            self.keys = nn.Parameter(torch.zeros(0, 0), requires_grad=self.fine_tuned)
            self.register_buffer("values", torch.zeros(0, len(class_names)))
            a = options.tip_alpha if options.tip_alpha is not None else TIP_START[0]
            b = options.tip_beta if options.tip_beta is not None else TIP_START[1]
            self.register_buffer("alpha", torch.tensor(float(a)))
            self.register_buffer("beta", torch.tensor(float(b)))
            self.search: dict | None = None     # the leave-one-image-out table (prepare)

        def forward(self):
            return self.spatial_default, self.semantic_default

        @property
        def agnostic(self) -> bool:
            return False

        @property
        def needs_shots(self) -> bool:
            return True

        def trainable(self):
            return [self.keys] if self.fine_tuned and self.keys.numel() else []

        def param_groups(self, cfg):
            if not self.trainable():
                return []
            return [{"params": self.trainable(), "lr_mult": self.options.tip_lr / cfg.lr,
                     "weight_decay": FINE_TUNE_DECAY, "eps": FINE_TUNE_EPS}]

        def restore_defaults(self, sfm) -> None:
            self.keys = nn.Parameter(torch.zeros(0, 0, device=self.values.device),
                                     requires_grad=self.fine_tuned)
            self.values = torch.zeros(0, self.values.shape[1], device=self.values.device)

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            for name in ("keys", "values"):
                if prefix + name in state_dict:
                    shape = state_dict[prefix + name].shape
                    if name == "keys":
                        self.keys = nn.Parameter(torch.zeros(shape, device=self.values.device),
                                                 requires_grad=self.fine_tuned)
                    else:
                        self.values = torch.zeros(shape, device=self.values.device)
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

        def decode(self, sfm, feats, spatial, semantic):
            out = sfm.decode(feats, spatial, semantic)
            alpha = float(self.alpha)
            if self.keys.numel() == 0 or alpha == 0.0:
                return out                                       # zero-shot, untouched
            f = query_features(out.mask_logits, encoder_map(feats)).to(self.keys.device)
            cache = cache_logits(f, self.keys, self.values, alpha, float(self.beta))
            z = out.class_logits
            out.class_logits = torch.cat([z[..., :-1] + cache.to(z.device, z.dtype),
                                          z[..., -1:]], -1)
            return out

        @torch.no_grad()
        def prepare(self, sfm, feats, targets) -> None:
            fmap_all = encoder_map(feats)
            w = LossWeights()
            fs, zs, ts, keys, labels, owner = [], [], [], [], [], []
            for s in range(0, len(feats), 8):      # the shots, decoded 8 at a time
                idx = list(range(s, min(s + 8, len(feats))))
                part = feats.index(idx)
                out = sfm.decode(part, self.spatial_default, self.semantic_default)
                f = query_features(out.mask_logits, fmap_all[idx])
                for j, i in enumerate(idx):
                    lab, masks = targets[i]
                    m, z = out.mask_logits[j], out.class_logits[j].float()
                    lab = lab.to(z.device)
                    q, t = hungarian_match(m, z, lab, _fit(masks.to(m.device), m.shape[-2:]),
                                           w)
                    target = torch.full((z.shape[0],), z.shape[1] - 1, dtype=torch.long)
                    target[q] = lab[t].cpu()
                    fs.append(f[j].cpu())
                    zs.append(z.cpu())
                    ts.append(target)
                    keys.append(f[j, q].cpu())
                    labels.append(lab[t].cpu())
                    owner += [i] * len(q)
            keys_t = torch.cat(keys) if keys else torch.zeros(0, fmap_all.shape[1])
            labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
            values = torch.nn.functional.one_hot(labels_t, len(self.class_names)).float()
            owner_t = torch.tensor(owner, dtype=torch.long)
            o = self.options
            if o.tip_alpha is None or o.tip_beta is None:
                alphas = (o.tip_alpha,) if o.tip_alpha is not None else o.tip_alphas
                if self.fine_tuned and any(a > 0 for a in alphas):
                    alphas = tuple(a for a in alphas if a > 0)
                betas = (o.tip_beta,) if o.tip_beta is not None else o.tip_betas
                if len(set(owner)) >= 2:
                    a, b, table = loo_choice(fs, zs, ts, keys_t, values, owner_t, alphas, betas)
                    self.search = {f"{x:g},{y:g}": round(v, 4) for (x, y), v in table.items()}
                else:   # nothing to hold out: Tip-Adapter's start
                    a = o.tip_alpha if o.tip_alpha is not None else TIP_START[0]
                    b = o.tip_beta if o.tip_beta is not None else TIP_START[1]
                self.alpha.fill_(a)
                self.beta.fill_(b)
            device = self.values.device
            self.keys = nn.Parameter(keys_t.to(device), requires_grad=self.fine_tuned)
            self.values = values.to(device)

    return TipAdapter
