"""SFM backends: the embedded default (runs anywhere) and SAM through transformers."""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import Features, Outputs, PromptableSFM, freeze

BACKENDS = ("embedded", "sam")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def load_sfm(name: str = "embedded", checkpoint: str | None = None,
             device: str = "auto") -> PromptableSFM:
    """A frozen SFM backend by name; ``checkpoint`` is a weights file (embedded) or a local
    SAM directory (sam)."""
    dev = resolve_device(device)
    if name == "embedded":
        from .embedded import load_embedded
        return load_embedded(checkpoint, dev)
    if name == "sam":
        if checkpoint is None:
            raise UserError("--sfm sam: needs --checkpoint DIR, a local SAM checkpoint saved by "
                            "transformers (SamModel.save_pretrained)")
        from .sam import load_sam
        return load_sam(checkpoint, dev)
    raise UserError(f"--sfm {name}: unknown backend; choose one of {', '.join(BACKENDS)}")


__all__ = ["Features", "Outputs", "PromptableSFM", "freeze", "load_sfm", "resolve_device"]
