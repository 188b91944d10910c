"""Mask decoder: spatial prompt embeddings act as queries over image tokens (masked attention in
the Mask2Former manner); each query gives a mask and a class embedding, scored against the
semantic prompt embeddings by cosine similarity, plus a "no object" logit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import MLP


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = MLP([dim, 2 * dim, dim])
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.heads = heads

    def forward(self, q: Tensor, qpos: Tensor, tokens: Tensor, pos: Tensor,
                attn_mask: Tensor | None) -> Tensor:
        q = q + self.cross(q + qpos, tokens + pos, tokens, attn_mask=attn_mask,
                           need_weights=False)[0]
        q = self.n1(q)
        k = q + qpos
        q = self.n2(q + self.self_attn(k, k, q, need_weights=False)[0])
        return self.n3(q + self.ffn(q))


class MaskDecoder(nn.Module):
    def __init__(self, embed_dim: int = 128, mask_dim: int = 64, layers: int = 3, heads: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(embed_dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.class_embed = MLP([embed_dim, embed_dim, embed_dim])
        self.mask_embed = MLP([embed_dim, embed_dim, mask_dim])
        self.no_object = nn.Linear(embed_dim, 1)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))  # exp -> ~12
        self.heads = heads

    def classify(self, q: Tensor, semantic: Tensor | None) -> Tensor:
        """(B, N, D) normalised queries -> class logits (B, N, C + 1), last = no object."""
        if semantic is None:  # class-agnostic: only "object" vs "no object"
            no_obj = self.no_object(q)
            return torch.cat([torch.zeros_like(no_obj), no_obj], -1)
        ce = F.normalize(self.class_embed(q), dim=-1)
        sem = F.normalize(semantic, dim=-1)
        sem = sem if sem.dim() == 3 else sem.unsqueeze(0)
        sim = torch.einsum("bnd,bcd->bnc", ce, sem.expand(q.shape[0], -1, -1))
        return torch.cat([sim * self.logit_scale.exp(), self.no_object(q)], -1)

    def attention_mask(self, q: Tensor, pooled_features: Tensor) -> Tensor:
        """Masked attention: each query attends where its mask, predicted at token resolution,
        is on. Average pooling commutes with the (linear) mask head, so predicting on pooled
        mask features equals pooling the full-resolution prediction, 16x cheaper."""
        with torch.no_grad():
            small = torch.einsum("bnd,bdl->bnl", self.mask_embed(q), pooled_features)
            attn = small < 0  # True = may not attend
            attn[attn.all(-1)] = False
            return attn.repeat_interleave(self.heads, dim=0)

    def forward(self, tokens: Tensor, pos: Tensor, mask_features: Tensor, spatial: Tensor,
                semantic: Tensor | None, token_hw: tuple[int, int], aux: bool = True):
        """Predictions of every layer (``aux``) or of the last only: list of (masks, classes)."""
        b = tokens.shape[0]
        qpos = spatial if spatial.dim() == 3 else spatial.unsqueeze(0)
        qpos = qpos.expand(b, -1, -1)
        pooled = F.adaptive_avg_pool2d(mask_features, token_hw).flatten(2)
        q = qpos
        preds = []
        for i in range(len(self.layers) + 1):
            qn = self.norm(q)
            if aux or i == len(self.layers):
                masks = torch.einsum("bnd,bdhw->bnhw", self.mask_embed(qn), mask_features)
                preds.append((masks, self.classify(qn, semantic)))
            if i < len(self.layers):
                q = self.layers[i](q, qpos, tokens, pos, self.attention_mask(qn, pooled))
        return preds
