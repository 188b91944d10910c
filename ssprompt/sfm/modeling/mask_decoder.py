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

    def predict(self, q: Tensor, mask_features: Tensor, semantic: Tensor | None,
                token_hw: tuple[int, int]):
        q = self.norm(q)
        masks = torch.einsum("bnd,bdhw->bnhw", self.mask_embed(q), mask_features)
        if semantic is None:  # class-agnostic: only "object" vs "no object"
            cls = torch.cat([torch.zeros_like(self.no_object(q)), self.no_object(q)], -1)
        else:
            ce = F.normalize(self.class_embed(q), dim=-1)
            sem = F.normalize(semantic, dim=-1)
            sim = torch.einsum("bnd,bcd->bnc", ce, sem.expand(q.shape[0], -1, -1)
                               if sem.dim() == 3 else sem.unsqueeze(0).expand(q.shape[0], -1, -1))
            cls = torch.cat([sim * self.logit_scale.exp(), self.no_object(q)], -1)
        with torch.no_grad():
            small = F.adaptive_avg_pool2d(masks.detach(), token_hw).flatten(2)  # (B, N, L)
            attn = small < 0  # True = may not attend
            attn[attn.all(-1)] = False
            attn = attn.repeat_interleave(self.heads, dim=0)
        return masks, cls, attn

    def forward(self, tokens: Tensor, pos: Tensor, mask_features: Tensor, spatial: Tensor,
                semantic: Tensor | None, token_hw: tuple[int, int]):
        b = tokens.shape[0]
        qpos = spatial if spatial.dim() == 3 else spatial.unsqueeze(0)
        qpos = qpos.expand(b, -1, -1)
        q = qpos
        preds = []
        masks, cls, attn = self.predict(q, mask_features, semantic, token_hw)
        preds.append((masks, cls))
        for layer in self.layers:
            q = layer(q, qpos, tokens, pos, attn)
            masks, cls, attn = self.predict(q, mask_features, semantic, token_hw)
            preds.append((masks, cls))
        return preds
