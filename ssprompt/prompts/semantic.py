"""Semantic prompts: the frozen text encoder's class-name embeddings (SemPrompt is a
``FusedPrompt`` over them, built by ``PromptSet``), and the prompt-engineering baseline (an
ensemble of hand-written templates, nothing learned)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from ..sfm.base import PromptableSFM

TEMPLATES = (
    "a photo of a {}.",
    "a picture of the {}.",
    "there is a {} in the scene.",
    "a cropped photo of a {}.",
    "a close-up image of the {}.",
    "an image showing {}.",
    "a {} in the background.",
    "a low-resolution photo of a {}.",
)


def default_semantic(sfm: PromptableSFM, class_names: list[str]) -> Tensor:
    """The frozen text encoder's embeddings (C, D) of the bare class names."""
    if not sfm.has_text_encoder:
        raise UserError("learners semantic: this SFM has no text encoder (SAM has none); "
                        "learn spatial prompts only", field="learners")
    with torch.no_grad():
        return sfm.encode_texts(class_names).float()


def engineered_semantic(sfm: PromptableSFM, class_names: list[str],
                        templates: tuple[str, ...] = TEMPLATES) -> Tensor:
    """Template ensemble: mean of the unit-normalised embeddings of every template, rescaled to
    the bare names' norm (the CLIP recipe)."""
    base = default_semantic(sfm, class_names)
    with torch.no_grad():
        per_t = torch.stack([sfm.encode_texts([t.format(n) for n in class_names])
                             for t in templates])                     # (T, C, D)
    mean = torch.nn.functional.normalize(per_t, dim=-1).mean(0)
    return torch.nn.functional.normalize(mean, dim=-1) * base.norm(dim=-1, keepdim=True)

