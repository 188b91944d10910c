"""SFM backends, registered in one place.

A backend is one module under ``ssprompt/sfm/`` with a loader ``load_x(checkpoint, device)`` that
returns a frozen ``PromptableSFM``; adding one means writing that module and one ``REGISTRY``
line below (the CLI's ``--sfm`` help is built from it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import PRECISIONS, Features, Outputs, PromptableSFM, freeze


@dataclass(frozen=True)
class Backend:
    loader: str              # "module:function" under ssprompt.sfm, imported on first use
    description: str         # one line, for --help
    checkpoint: str | None   # what --checkpoint must be; None: optional (packaged weights)


REGISTRY: dict[str, Backend] = {
    "embedded": Backend("embedded:load_embedded",
                        "the packaged small SFM (spatial + semantic prompts; default)", None),
    "sam": Backend("sam:load_sam", "SAM v1, transformers SamModel (spatial prompts only)",
                   "a local SamModel.save_pretrained directory"),
    "sam2": Backend("sam2:load_sam2", "SAM 2, transformers Sam2Model (spatial prompts only)",
                    "a local Sam2Model.save_pretrained directory"),
    "sam3": Backend("sam3:load_sam3",
                    "SAM 3, transformers Sam3Model (object queries + class-name text prompts)",
                    "a local Sam3Model.save_pretrained directory with its tokenizer"),
}
BACKENDS = tuple(REGISTRY)


def backends_help() -> str:
    """One line per registered backend, for ``--sfm``'s help."""
    return "; ".join(f"{name}: {b.description}" for name, b in REGISTRY.items())


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def load_sfm(name: str = "embedded", checkpoint: str | None = None,
             device: str = "auto", precision: str = "fp32") -> PromptableSFM:
    """A frozen SFM backend by its ``REGISTRY`` name; ``checkpoint`` is what that backend
    loads (a weights file for embedded, a local transformers directory for the others).
    ``precision``: "fp32" (default, every device) or "bf16" (bfloat16 autocast while the
    transformers backends decode)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    backend = REGISTRY.get(name)
    if backend is None:
        raise UserError(f"--sfm {name}: unknown backend; choose one of {', '.join(BACKENDS)}")
    if checkpoint is None and backend.checkpoint is not None:
        raise UserError(f"--sfm {name}: needs --checkpoint DIR, {backend.checkpoint}")
    dev = resolve_device(device)
    module, fn = backend.loader.split(":")
    loader = getattr(importlib.import_module(f"{__name__}.{module}"), fn)
    sfm = loader(checkpoint, dev)
    sfm.precision = precision
    return sfm


__all__ = ["BACKENDS", "REGISTRY", "Backend", "Features", "Outputs", "PromptableSFM",
           "backends_help", "freeze", "load_sfm", "resolve_device"]
