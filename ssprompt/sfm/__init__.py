"""SFM backends, registered in one place.

A backend is a loader ``load_x(checkpoint, device)`` that returns a frozen ``PromptableSFM``.
The packaged ones are modules under ``ssprompt/sfm/`` with one ``REGISTRY`` line below; one that
lives elsewhere calls ``register_backend`` (the CLI's ``--sfm`` help is built from the registry).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import PRECISIONS, Features, Outputs, PromptableSFM, freeze


@dataclass(frozen=True)
class Backend:
    # "module:function", imported on first use (".module" under ssprompt.sfm), or the loader
    loader: str | Callable
    description: str         # one line, for --help
    checkpoint: str | None   # what the checkpoint must be; None: optional (packaged weights)


REGISTRY: dict[str, Backend] = {
    "embedded": Backend(".embedded:load_embedded",
                        "the packaged small SFM (spatial + semantic prompts; default)", None),
    "sam": Backend(".sam:load_sam", "SAM v1, transformers SamModel (spatial prompts only)",
                   "a local SamModel.save_pretrained directory"),
    "sam2": Backend(".sam2:load_sam2", "SAM 2, transformers Sam2Model (spatial prompts only)",
                    "a local Sam2Model.save_pretrained directory"),
    "sam3": Backend(".sam3:load_sam3",
                    "SAM 3, transformers Sam3Model (object queries + class-name text prompts)",
                    "a local Sam3Model.save_pretrained directory with its tokenizer"),
}
BACKENDS = tuple(REGISTRY)   # the packaged backends


def register_backend(name: str, loader: str | Callable, description: str,
                     checkpoint: str | None = None) -> None:
    """Make ``load_sfm(name, ...)`` (and ``ssprompt ... --sfm name``) load a backend that lives
    outside ssprompt. ``loader(checkpoint, device: torch.device)`` returns a frozen
    ``PromptableSFM`` (``freeze`` helps), or is given as "package.module:function" (imported
    on first use). ``checkpoint``: what the backend needs as its checkpoint, in a few words
    (None: it needs none). Registering a name again replaces it."""
    if not name or not isinstance(name, str) or any(c.isspace() for c in name):
        raise ValueError(f"register_backend: bad backend name {name!r}")
    if not (callable(loader) or (isinstance(loader, str) and loader.count(":") == 1)):
        raise ValueError("register_backend: loader must be a callable or 'module:function'")
    REGISTRY[name] = Backend(loader, " ".join(str(description).split()), checkpoint)


def backends_help() -> str:
    """One line per registered backend, for ``--sfm``'s help."""
    return "; ".join(f"{name}: {b.description}" for name, b in REGISTRY.items())


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: no CUDA device is available here; use cpu", field="device")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device {name}: choose auto, cpu or cuda", field="device")
    return torch.device(name)


def load_sfm(name: str = "embedded", checkpoint: str | None = None,
             device: str = "auto", precision: str = "fp32") -> PromptableSFM:
    """A frozen SFM backend by its registered name (``REGISTRY``, ``register_backend``);
    ``checkpoint`` is what that backend loads (a weights file for embedded, a local
    transformers directory for sam, sam2, sam3). ``precision``: "fp32" (default, every
    device) or "bf16" (bfloat16 autocast while the transformers backends decode)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}",
                        field="precision")
    backend = REGISTRY.get(name)
    if backend is None:
        raise UserError(f"sfm {name}: unknown backend; choose one of {', '.join(REGISTRY)}",
                        field="sfm")
    if checkpoint is None and backend.checkpoint is not None:
        raise UserError(f"sfm {name}: needs a checkpoint, {backend.checkpoint}", field="sfm")
    dev = resolve_device(device)
    loader = backend.loader
    if not callable(loader):
        module, fn = loader.split(":")
        loader = getattr(importlib.import_module(module, __name__), fn)
    try:
        sfm = loader(checkpoint, dev)
    except UserError as e:
        if e.field is None:      # a loader's own errors are about its checkpoint
            e.field = "checkpoint"
        raise
    sfm.precision = precision
    return sfm


__all__ = ["BACKENDS", "REGISTRY", "Backend", "Features", "Outputs", "PromptableSFM",
           "backends_help", "freeze", "load_sfm", "register_backend", "resolve_device"]
