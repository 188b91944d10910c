"""SAM 3 through Hugging Face transformers' ``Sam3Model``: the full SSPrompt method (spatial AND
semantic prompts) on a real, installable SFM.

SAM 3 ("segment anything with concepts") encodes a text concept with a CLIP text encoder, fuses
it into the image features (DETR encoder), and lets a fixed set of learned *object queries*
(``detr_decoder.query_embed`` + learned reference boxes ``detr_decoder.reference_points``, 200 in
the released model) each propose one mask with one score for that concept, plus one presence
score for the concept in the image. Only transformers' own modules run; this file maps the
backend seam (``base.PromptableSFM``) onto them:

* **Spatial prompts are object queries.** The paper's spatial prompts are "one query, one mask";
  in SAM 3 that is an object query: its content embedding and its reference box decide where it
  looks and which mask it gives. A spatial prompt is therefore the (D + 4)-vector
  ``[query content (D) | reference box (cx, cy, w, h) before its sigmoid (4)]``, and ``decode``
  swaps the N given rows in for SAM 3's own query parameters for that call
  (``torch.func.functional_call``: the model's code runs unchanged, with N queries instead of
  200). ``encode_points(p)`` gives, for N points, the N learned queries whose reference-box
  centres are closest to the points (a one-to-one Hungarian assignment; N > 200 reuses queries in
  rounds), unchanged. So the default layout of N = 200 points returns exactly SAM 3's 200 queries
  (in grid order; the decoder is permutation-equivariant) and zero-shot is SAM 3 itself, while
  N = 25 / 50 / 100 keep the N learned queries that best cover an N-point grid. The other
  candidate, N grid boxes through the geometry encoder, was rejected: geometry prompts are
  exemplars that condition *all* queries together (one box does not give one mask), so they
  cannot play "one prompt, one mask". A learned query cannot be moved by 2-D coordinates, so
  ``vanilla_2d`` is refused with a one-line error.
* **Class prompts are token sequences.** SAM 3 conditions on the per-token text features
  (``get_text_features(...).pooler_output``: T = 32 tokens x D, CLIP tokenizer padded to 32, with
  an attention mask); no pooled vector is ever used by the model, and pooling would change what it
  sees. A class prompt is the whole sequence flattened, (T * D,), with the padding tokens set to
  exactly zero; ``decode`` recovers the attention mask as "a token is valid iff its row is not
  all zero". Masked tokens get exactly zero gradient, so under weighted / average fusion started
  from the default they stay zero (AdamW's decay and the anchor keep zeros at zero) and the
  class keeps its own token count. (``init="random"`` draws noise with the vocabulary's
  per-coordinate spread: slots padded in every class name stay zero, others become tokens.)
  Prompt engineering goes through the same encoder: ``semantic.engineered_semantic`` averages
  the unit-normalised flattened template sequences, i.e. slot by slot (a crude baseline for a
  per-token encoder: the templates' tokens do not line up).
* **Outputs: SAM 3 as its users run it, one forward per class.** SAM 3 answers one concept
  per forward, so ``decode`` runs one forward per class prompt (the C concepts along the batch
  dimension with the cached image features repeated, ``concept_chunk`` (image, concept) pairs
  per forward, each chunk checkpointed while training): concept c gives each query n its own
  mask and SAM 3's own score ``p(c, n) = sigmoid(logit(c, n)) * sigmoid(presence(c))`` (what
  its processor thresholds), and its semantic head a map. The merge rule, one for all C:

  - **Pairs are the queries.** ``Outputs`` holds every (concept, query) pair as one query,
    concept-major (pair c * N + n): C * N masks, each its own forward's; class logits one-hot
    on the pair's concept, ``[-30, .., log p(c, n), .., -30, log(1 - p(c, n))]``, whose
    softmax is exactly [0, .., p, .., 0, 1 - p]: SAM 3's score and its complement, never
    renormalised against the other classes (-30, not -inf, keeps the set loss finite when a
    pair is matched to another class: its cross-entropy is then ~30 with no gradient).
    ``own_scores`` tells ``evaluation.postprocess`` to use SAM 3's rules below. When not
    training, an image keeps only its ``max_pairs`` best pairs (by p; all C * N when fewer).
  - **Instances** (``postprocess.own_score_instances``): every pair of a thing class with
    p > ``object_mask_threshold`` (0.3, the processor's default), mask = probability > 0.5 at
    the image's size, score = p: ``post_process_instance_segmentation`` of each class's forward,
    concatenated; best first, at most 100 (COCO), empty masks dropped.
  - **Panoptic** (``postprocess.own_score_panoptic``): the pairs with p > 0.3 compete for each
    pixel by p x mask probability and keep a segment by Mask2Former's overlap rule (stuff pairs
    of one class merge).
  - **Semantic**: SAM 3's own semantic head (``semantic_seg``, the map its
    ``post_process_semantic_segmentation`` binarises for one concept), one map per class
    (``Outputs.semantic_logits`` (B, C, h, w)); each pixel takes the class whose map is most
    probable (resized as probabilities, like the masks). The processor's 0.5 cut is a one-concept
    yes / no; with C classes covering the image a pixel is never void (as Mask2Former's rule).

  Learned class prompts go through the same path: they replace the text features of their
  class's forward, and training sees the same C * N pairs (the set loss matches each
  ground-truth segment to a pair; gradients reach each class's prompt through its own
  forward's masks and scores). Training does not hold those C * N masks:
  ``engine.train`` calls ``decode_losses``, which equals the set loss of ``decode``'s outputs
  (loss and gradients to float rounding, tested) but keeps only each pair's two scores, the
  Hungarian cost rows of a concept chunk at a time, and the masks of the matched pairs
  (decoded again): memory grows with the matched pairs and one chunk, not C x N (measured in
  docs/performance.md). A batch of these outputs is split with ``Outputs.images``, which
  keeps ``semantic_logits`` and ``own_scores``. With ``semantic=None`` the one concept
  "object" is used (class logits (B, N, 2); class-agnostic evaluation reads objects off the
  panoptic map, so p > 0.3 decides).
* Images are preprocessed as ``Sam3ImageProcessor`` does (``sam_common.StretchProcessor``:
  resized to ``image_size`` x ``image_size`` whatever their aspect ratio, no padding, normalised
  with its mean/std, 0.5 / 0.5 unless ``preprocessor_config.json`` says otherwise), and the three
  FPN levels SAM 3's detector reads are cached (their position encodings are recomputed). Masks
  go back to the image as its ``post_process_instance_segmentation`` does: the sigmoid
  probabilities resized straight to the image's size (``geometry.Stretch(probabilities=True)``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..geometry import Stretch
from .base import Features, Outputs, autocast, freeze
from .sam_common import (
    StretchProcessor,
    TransformersSFM,
    batched_prompts,
    check_checkpoint_dir,
    from_pretrained,
    pixel_stats,
    weights_file_hash,
)

HOW_TO_GET = ("download one on a machine with network (the gated `facebook/sam3`: accept its "
              "licence, then `huggingface-cli download facebook/sam3 --local-dir sam3`), copy "
              "the directory (weights, config.json and tokenizer files) here, then pass "
              "the directory as the checkpoint")
SAM3_SCORE_THRESHOLD = 0.3  # Sam3Processor.post_process_instance_segmentation's default
CONCEPT_CHUNK = 8           # (image, concept) pairs per SAM 3 forward
MAX_PAIRS = 1000            # (concept, query) pairs an image keeps when not training
OTHER_CLASS_LOGIT = -30.0   # a pair's class logit for every class but its own
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def log1m_product_sigmoid(a: Tensor, b: Tensor) -> Tensor:
    """log(1 - sigmoid(a) * sigmoid(b)), stable for any a, b:
    1 - s(a)s(b) = (e^-a + e^-b + e^-(a+b)) s(a) s(b)."""
    a, b = torch.broadcast_tensors(a, b)
    return (torch.logsumexp(torch.stack([-a, -b, -a - b]), 0) + F.logsigmoid(a)
            + F.logsigmoid(b))


class PairLogits:
    """The class logits (B, P, C + 1) of (concept, query) pairs, never materialised: pair r's
    row is ``OTHER_CLASS_LOGIT`` but at its concept (log p) and at "no object" (log (1 - p)),
    as ``Sam3SFM._class_logits`` builds it. ``cross_entropy`` is ``F.cross_entropy`` of those
    rows (weighted mean) to float rounding, in O(B P) memory instead of O(B P C)."""

    def __init__(self, log_p: Tensor, log_q: Tensor, concept: Tensor, c: int):
        self.log_p, self.log_q, self.concept, self.c = log_p, log_q, concept, c
        self.shape = (*log_p.shape, c + 1)
        self.device = log_p.device

    def materialise(self) -> Tensor:
        return Sam3SFM._class_logits(self.log_p, self.log_q, self.concept, self.c)

    def cross_entropy(self, start: int, end: int, target: Tensor, weight: Tensor) -> Tensor:
        """Weighted mean cross-entropy of images ``start:end``'s pairs against ``target``
        (their (end - start, P) class indices, C = no object)."""
        lp = self.log_p[start:end].flatten().float()
        lq = self.log_q[start:end].flatten().float()
        own = self.concept[start:end].flatten()
        t = target.flatten()
        parts = [lp, lq]
        if self.c > 1:   # the C - 1 other classes' equal logits, as one term
            parts.append(torch.full_like(lp, OTHER_CLASS_LOGIT + math.log(self.c - 1)))
        lse = torch.logsumexp(torch.stack(parts), 0)
        picked = torch.where(t == own, lp, torch.where(t == self.c, lq, OTHER_CLASS_LOGIT))
        wt = weight[t]
        return (wt * (lse - picked)).sum() / wt.sum()


class Sam3SFM(TransformersSFM):
    """A frozen ``transformers.Sam3Model`` (+ its tokenizer) behind the ``PromptableSFM`` seam.
    ``embed_dim`` is the spatial prompt width (D + 4), ``text_dim`` the class prompt width
    (T * D)."""

    what = "SAM 3"

    def __init__(self, model, tokenizer, weights_hash: str = "untrained",
                 pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5)):
        super().__init__(model, weights_hash, pixel_mean, pixel_std)
        self.tokenizer = tokenizer
        cfg = model.config
        self.hidden = int(cfg.detr_decoder_config.hidden_size)
        self.embed_dim = self.hidden + 4
        self.text_len = int(cfg.text_config.max_position_embeddings)
        self.text_hidden = int(cfg.detr_encoder_config.hidden_size)
        self.text_dim = self.text_len * self.text_hidden
        self.image_size = int(cfg.vision_config.backbone_config.image_size)
        self.num_queries = int(cfg.detr_decoder_config.num_queries)
        self.levels = len(cfg.vision_config.scale_factors) - 1  # the detector drops the last
        self.object_mask_threshold = SAM3_SCORE_THRESHOLD
        self.concept_chunk = CONCEPT_CHUNK
        self.max_pairs = MAX_PAIRS
        self._pos: dict = {}
        self._object_text: Tensor | None = None

    @property
    def _ref(self) -> Tensor:
        return self.model.detr_decoder.query_embed.weight

    @property
    def has_text_encoder(self) -> bool:
        return True

    # -- the backend seam ------------------------------------------------------------------
    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor) -> Features:
        """The processor's pixel values -> the FPN levels SAM 3's detector reads, ``fpn0``
        (4x) .. ``fpn2`` (1x)."""
        out = self.model.get_vision_features(pixel_values=pixels)
        return Features({f"fpn{i}": out.fpn_hidden_states[i] for i in range(self.levels)})

    @property
    def default_n_prompts(self) -> int:
        """SAM 3's own number of object queries (``detr_decoder_config.num_queries``)."""
        return self.num_queries

    def queries(self) -> Tensor:
        """(Q, D + 4) SAM 3's own object queries: content | reference box before sigmoid."""
        dec = self.model.detr_decoder
        return torch.cat([dec.query_embed.weight, dec.reference_points.weight], -1).detach()

    def encode_points(self, points: Tensor) -> Tensor:
        """(N, 2) [0, 1] (x, y) -> (N, D + 4): the learned queries whose reference-box centres
        are closest to the points, one each (Hungarian; rounds of Q when N > Q)."""
        if points.requires_grad:
            raise UserError("kind vanilla_2d: SAM 3's spatial prompts are its learned object "
                            "queries, which 2-D coordinates cannot move; use kind average, "
                            "weighted or learned_only", field="kind")
        from scipy.optimize import linear_sum_assignment

        q = self.queries()
        centres = q[:, self.hidden:self.hidden + 2].float().sigmoid().cpu().numpy()
        pts = points.detach().float().reshape(-1, 2).cpu().numpy()
        cost = ((pts[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # (N, Q)
        pick = np.empty(len(pts), dtype=np.int64)
        for s in range(0, len(pts), len(centres)):
            rows, cols = linear_sum_assignment(cost[s:s + len(centres)])
            pick[s + rows] = cols
        return q[torch.from_numpy(pick).to(q.device)].float()

    @torch.no_grad()
    def encode_texts(self, names: list[str]) -> Tensor:
        """(C, T * D): SAM 3's per-token text features of each name (CLIP tokenizer padded to
        T), padding tokens zeroed, flattened."""
        ref = self._ref
        tok = self.tokenizer(list(names), padding="max_length", max_length=self.text_len,
                             truncation=True, return_tensors="pt")
        ids = tok["input_ids"].to(ref.device)
        mask = tok["attention_mask"].to(ref.device)
        feats = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        return (feats * mask[..., None].to(feats.dtype)).flatten(1).float()

    def _decode(self, feats: Features, spatial: Tensor, semantic: Tensor | None) -> Outputs:
        """Spatial (N, D + 4) or (B, N, D + 4) object queries and semantic (C, T * D) or
        (B, C, T * D) class prompts -> one query per (concept, query) pair: mask logits
        (B, P, h, w) over the square input, class logits (B, P, C + 1), SAM 3's semantic maps
        (B, C, h, w); P = C * N (see the module docstring)."""
        vision, spatial, text, valid = self._inputs(feats, spatial, semantic)
        c = text.shape[1]
        groups = [self._decode_group([v[s:e] for v in vision], spatial[s], text[s:e],
                                     valid[s:e]) for s, e in self._groups(spatial)]
        masks, log_p, log_q, concept, maps = (torch.cat(x) for x in zip(*groups))
        class_logits = self._class_logits(log_p, log_q, concept, c)
        return Outputs(masks, class_logits, semantic_logits=maps, own_scores=True)

    def decode_losses(self, feats: Features, spatial: Tensor, semantic: Tensor | None,
                      groups: list[list[tuple[Tensor, Tensor]]], w=None
                      ) -> list[tuple[Tensor, dict[str, float]]]:
        """``losses.set_losses(self.decode(feats, spatial, semantic), groups, w)`` (what
        ``engine.train`` calls instead, with the same arguments) without ever holding the
        C x N pairs' masks: memory grows with the matched pairs and one concept chunk.

        1. Each concept chunk is decoded as in ``decode`` (checkpointed); its pairs' log p and
           log (1 - p) are kept (the class loss covers every pair), and their rows of the
           Hungarian cost (``losses.match_cost``: each row is its own pair's) are computed from
           the chunk's masks, which are then dropped (the backward recomputes the chunk
           without its mask branch: no loss reads those masks).
        2. Each image's pairs are matched to its segments on the whole cost (``assign``).
        3. The concepts of the matched pairs are decoded again, ``concept_chunk``
           (image, concept) items per checkpointed forward, and only the matched pairs' masks
           are kept for the mask loss.

        Loss and gradients equal ``set_losses`` of the full ``decode`` to float rounding (the
        forward is deterministic, so step 3's masks are step 1's; the gradient is the sum of
        the two passes' parts). ``max_pairs`` never applies: training sees every pair."""
        from .losses import assign, fit_targets, match_cost, matched_set_losses

        device = self._ref.device
        grad = torch.is_grad_enabled()
        with autocast(device, self.precision):
            vision, spatial, text, valid = self._inputs(feats, spatial, semantic)
        b, c = text.shape[:2]
        n = spatial.shape[1]
        targets = [t for g in groups for t in g]                      # per image, batch order
        if len(targets) != b:
            raise ValueError(f"decode_losses: {len(targets)} targets for {b} images")
        w = self._weights(w)
        fitted, costs = None, [[] for _ in range(b)]
        log_p, log_q = [], []
        for s, e in self._groups(spatial):
            chunks = self._chunks([v[s:e] for v in vision], spatial[s], text[s:e],
                                  valid[s:e], grad and self._needs_grad(spatial[s], text[s:e]))
            lp, lq = [], []
            while True:
                with autocast(device, self.precision):
                    chunk = next(chunks, None)
                if chunk is None:
                    break
                (masks, p, q, concept), _ = chunk
                del chunk                                             # its semantic maps
                lp.append(p)
                lq.append(q)
                if fitted is None:
                    fitted = fit_targets(groups, tuple(masks.shape[-2:]))
                    flat = [t for g in fitted for t in g]
                with torch.no_grad():
                    cls = self._class_logits(p, q, concept, c)
                    for j in range(e - s):
                        labels, soft = flat[s + j]
                        if labels.numel():
                            costs[s + j].append(match_cost(masks[j], cls[j], labels, soft, w))
                del masks, cls                  # no pair's mask outlives its chunk
            log_p.append(torch.cat(lp, 1))
            log_q.append(torch.cat(lq, 1))
        log_p, log_q = torch.cat(log_p), torch.cat(log_q)
        concept = torch.arange(c, device=log_p.device).repeat_interleave(n).expand(b, -1)
        class_logits = PairLogits(log_p, log_q, concept, c)             # never (B, P, C + 1)
        empty = torch.empty(0, dtype=torch.long)
        matches = [assign(torch.cat(cost)) if cost else (empty, empty) for cost in costs]
        rows = self._matched_masks(vision, spatial, text, valid, matches, n, grad)
        pos = {i * c * n + q: k for k, (i, q) in enumerate(
            (i, q) for i, (qi, _) in enumerate(matches) for q in qi.tolist())}

        def gather(index: Tensor) -> Tensor:     # rows are already in the loss's order
            at = torch.tensor([pos[i] for i in index.tolist()], dtype=torch.long,
                              device=rows.device)
            return rows[at].float()

        return matched_set_losses(class_logits, fitted, matches, gather, w)

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _weights(w):
        from .losses import LossWeights

        return w or LossWeights()

    def _inputs(self, feats: Features, spatial: Tensor, semantic: Tensor | None
                ) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """The cached FPN levels, the (B, N, D + 4) queries, the (B, C, T, D) text features and
        their (B, C, T) valid tokens, checked."""
        ref = self._ref
        b = len(feats)
        vision = [feats.tensors[f"fpn{i}"].to(device=ref.device, dtype=ref.dtype)
                  for i in range(self.levels)]
        spatial = batched_prompts(spatial, b, self.embed_dim).to(device=ref.device,
                                                                  dtype=ref.dtype)
        if semantic is None:
            semantic = self._object()
        if semantic.dim() == 2:
            semantic = semantic.unsqueeze(0).expand(b, -1, -1)
        if semantic.dim() != 3 or semantic.shape[0] != b or semantic.shape[-1] != self.text_dim:
            raise ValueError(f"semantic must be (C, {self.text_dim}) or ({b}, C, "
                             f"{self.text_dim}); got {tuple(semantic.shape)}")
        c = semantic.shape[1]
        text = semantic.to(device=ref.device, dtype=ref.dtype).reshape(
            b, c, self.text_len, self.text_hidden)
        valid = (text != 0).any(-1)                                   # (B, C, T)
        if not valid.any(-1).all():
            raise ValueError("a class prompt is all zeros (no token to attend to)")
        return vision, spatial, text, valid

    @staticmethod
    def _class_logits(log_p: Tensor, log_q: Tensor, concept: Tensor, c: int) -> Tensor:
        """(.., P) log p, log (1 - p) and concept of pairs -> their (.., P, C + 1) class
        logits (see the module docstring)."""
        own = F.one_hot(concept, c).bool()                            # (B, P, C)
        return torch.cat([torch.where(own, log_p[..., None], OTHER_CLASS_LOGIT),
                          log_q[..., None]], -1)

    def _object(self) -> Tensor:
        """The one concept "object", for class-agnostic decoding."""
        if self._object_text is None or self._object_text.device != self._ref.device:
            self._object_text = self.encode_texts(["object"])
        return self._object_text

    @staticmethod
    def _groups(spatial: Tensor) -> list[tuple[int, int]]:
        """Runs of consecutive images that share one set of queries (SAM 3's queries are
        parameters, shared by a forward's whole batch); several prompt sets trained together
        (``train_many``) give one run each."""
        b = spatial.shape[0]
        if spatial.stride(0) == 0:
            return [(0, b)]
        cuts = [0] + [i for i in range(1, b) if not torch.equal(spatial[i], spatial[i - 1])]
        return list(zip(cuts, cuts[1:] + [b]))

    def _position(self, level: Tensor) -> Tensor:
        """The neck's sine position encoding of an FPN level (image-independent, memoised)."""
        key = (tuple(level.shape[1:]), level.device, level.dtype)
        if key not in self._pos:
            self._pos[key] = self.model.vision_encoder.neck.position_encoding(
                torch.Size((1, *level.shape[1:])), level.device, level.dtype)
        return self._pos[key]

    def _forward(self, queries: Tensor, text: Tensor, valid: Tensor, repeat: int | Tensor,
                 *vision: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One ``Sam3Model.forward`` on cached features (each image repeated ``repeat`` times,
        one per concept; or the images at the index ``repeat``, one per text) with ``queries``
        swapped in for SAM 3's object queries: its masks, logits, presence logits and semantic
        map."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        levels = [v.repeat_interleave(repeat, 0) if isinstance(repeat, int) else v[repeat]
                  for v in vision]
        pos = [self._position(v).expand(v.shape[0], -1, -1, -1) for v in levels]
        embeds = Sam3VisionEncoderOutput(fpn_hidden_states=(*levels, levels[-1]),
                                         fpn_position_encoding=(*pos, pos[-1]))
        swap = {"detr_decoder.query_embed.weight": queries[:, :self.hidden],
                "detr_decoder.reference_points.weight": queries[:, self.hidden:]}
        out = torch.func.functional_call(
            self.model, swap, args=(),
            kwargs={"vision_embeds": embeds,
                    "text_embeds": BaseModelOutputWithPooling(pooler_output=text),
                    "attention_mask": valid.long()})
        return out.pred_masks, out.pred_logits, out.presence_logits, out.semantic_seg

    @staticmethod
    def _needs_grad(queries: Tensor, text: Tensor) -> bool:
        return queries.requires_grad or text.requires_grad

    def _chunks(self, vision: list[Tensor], queries: Tensor, text: Tensor, valid: Tensor,
                grad: bool):
        """g images sharing ``queries`` (N, D + 4), C concepts each, ``concept_chunk``
        (image, concept) pairs per forward (checkpointed if ``grad``) -> per forward, its
        (concept, query) pairs, concept-major: masks (g, kk * N, h, w), log p and
        log (1 - p) (g, kk * N), concept (g, kk * N); and its semantic maps (g, kk, h, w)."""
        g, c = text.shape[:2]
        n = queries.shape[0]
        k = max(1, self.concept_chunk // g)                 # concepts per forward
        for c0 in range(0, c, k):
            t = text[:, c0:c0 + k]
            kk = t.shape[1]
            args = (queries, t.flatten(0, 1), valid[:, c0:c0 + k].flatten(0, 1), kk, *vision)
            masks, logit, presence, semantic = (
                checkpoint(self._forward, *args, use_reentrant=False) if grad
                else self._forward(*args))
            h, w = masks.shape[-2:]
            logit, presence = logit.reshape(g, kk * n), presence.repeat_interleave(n, 1)
            presence = presence.reshape(g, kk * n)
            concept = torch.arange(c0, c0 + kk, device=logit.device).repeat_interleave(n)
            chunk = ((masks.reshape(g, kk * n, h, w), F.logsigmoid(logit) + F.logsigmoid(presence),
                      log1m_product_sigmoid(logit, presence), concept.expand(g, -1)),
                     semantic.reshape(g, kk, *semantic.shape[-2:]))
            del masks, semantic
            yield chunk
            del chunk    # the caller decides what outlives a chunk (decode_losses: no mask)

    def _decode_group(self, vision: list[Tensor], queries: Tensor, text: Tensor, valid: Tensor
                      ) -> tuple[Tensor, ...]:
        """g images sharing ``queries`` (N, D + 4), C concepts each -> their (concept, query)
        pairs, concept-major: masks (g, P, h, w), log p and log (1 - p) (g, P), concept (g, P),
        and the semantic maps (g, C, h, w); P = C * N, or the ``max_pairs`` best pairs (in
        pair order) when not training."""
        grad = torch.is_grad_enabled() and self._needs_grad(queries, text)
        pairs: list[list[Tensor]] = [[], [], [], []]
        maps = []
        for chunk, semantic in self._chunks(vision, queries, text, valid, grad):
            for part, x in zip(pairs, chunk):
                part.append(x)
            maps.append(semantic)
            if not grad and sum(x.shape[1] for x in pairs[1]) > self.max_pairs:
                pairs = [[x] for x in self._best_pairs([torch.cat(p, 1) for p in pairs])]
        return (*(torch.cat(p, 1) for p in pairs), torch.cat(maps, 1))

    def _matched_masks(self, vision: list[Tensor], spatial: Tensor, text: Tensor,
                       valid: Tensor, matches: list[tuple[Tensor, Tensor]], n: int,
                       grad: bool) -> Tensor:
        """The mask logits (M, h * w) of every image's matched pairs (``matches[i][0]``: pair
        indices c * N + q), in batch and match order: the matched (image, concept) items
        decoded again, ``concept_chunk`` per forward (checkpointed if ``grad``), only the
        matched rows of each forward kept."""
        device = self._ref.device
        rows: list[Tensor] = []
        for s, e in self._groups(spatial):
            queries = spatial[s]
            pairs = [(i, q // n, q % n) for i in range(s, e) for q in matches[i][0].tolist()]
            items = sorted({(i, cc) for i, cc, _ in pairs})
            if not items:
                continue
            slot = {item: j for j, item in enumerate(items)}
            want = [(slot[(i, cc)], q) for i, cc, q in pairs]     # (item, query), match order
            kept, order = [], {}
            step = max(1, self.concept_chunk)
            for j0 in range(0, len(items), step):
                part = items[j0:j0 + step]
                img = torch.tensor([i for i, _ in part], device=device)
                con = torch.tensor([cc for _, cc in part], device=device)
                args = (queries, text[img, con], valid[img, con], img, *vision)
                with autocast(device, self.precision):
                    masks = (checkpoint(self._forward, *args, use_reentrant=False)
                             if grad and self._needs_grad(queries, text)
                             else self._forward(*args))[0]
                sel = [(j, q) for j, q in want if j0 <= j < j0 + len(part)]
                for key in sel:
                    order[key] = len(order)
                idx = torch.tensor([(j - j0) * n + q for j, q in sel], device=device)
                kept.append(masks.flatten(0, 1)[idx].flatten(1))
                del masks
            rows.append(torch.cat(kept)[torch.tensor([order[k] for k in want], device=device)])
        if not rows:
            return vision[0].new_zeros(0, 0)
        return torch.cat(rows)

    def _best_pairs(self, pairs: list[Tensor]) -> list[Tensor]:
        """The ``max_pairs`` pairs of each image with the highest p, in pair order."""
        best = pairs[1].topk(self.max_pairs, dim=1).indices.sort(1).values
        return [torch.take_along_dim(x, best.view(*best.shape, *[1] * (x.dim() - 2)), dim=1)
                for x in pairs]


def load_sam3(checkpoint: str | Path, device: str | torch.device = "cpu") -> Sam3SFM:
    """A frozen SAM 3 backend from a LOCAL directory holding ``Sam3Model.save_pretrained`` and
    its (CLIP) tokenizer files; never downloads."""
    from transformers import AutoTokenizer, Sam3Model

    path, files = check_checkpoint_dir(checkpoint, ("sam3", "sam3_video"), "SAM 3", HOW_TO_GET)
    # without its files transformers builds an EMPTY CLIP tokenizer (every name -> one unknown
    # token) instead of failing: refuse that explicitly
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer next to the SAM 3 weights (none of "
                        f"{', '.join(TOKENIZER_FILES)}); {HOW_TO_GET}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path}: unusable tokenizer next to the SAM 3 weights ({msg}); "
                        f"{HOW_TO_GET}") from None
    if len(tokenizer) < 256:
        raise UserError(f"{path}: the tokenizer has {len(tokenizer)} tokens, not a CLIP "
                        f"vocabulary; {HOW_TO_GET}")
    model = from_pretrained(Sam3Model, path, "SAM 3", HOW_TO_GET)
    sfm = Sam3SFM(model, tokenizer, weights_file_hash(files),
                  **pixel_stats(path, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    sfm.processor = StretchProcessor.from_dir(path, sfm.image_size, (0.5, 0.5, 0.5),
                                              (0.5, 0.5, 0.5), "SAM 3")
    sfm.geometry = Stretch(sfm.image_size, probabilities=True)
    return freeze(sfm.to(device))
