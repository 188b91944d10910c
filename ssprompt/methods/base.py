"""The method protocol: what every way of adapting the frozen SFM builds (``MethodState``), the
only thing the training loop, held-out selection, saving and evaluation see of a method.

A state turns the SFM's defaults into the decoder's inputs (``forward``: spatial (N, D),
semantic (C, D) or None), may adapt the decoding itself (``decode``: identity by default; a
decoder LoRA patches the decoder inside it, a cache adapter adds to the class logits after it,
a per-image prompt method replaces the spatial prompts from the features), names its trainable
parameters and their optimiser groups, may fit itself to the shots before training
(``prepare``), and saves as a prompts file (``prompts.promptset.save_prompts``: the decoder's
inputs, every state tensor, JSON metadata naming the method and its options).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..sfm.base import Features, Outputs, PromptableSFM


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """The learning-rate factor at optimiser step ``step`` (0-based) of a ``steps``-step run:
    linear warmup over ``warmup`` steps times a cosine decay over all ``steps`` (the default
    schedule of ``MethodState.lr_at``)."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


class MethodState(nn.Module):
    """The protocol, with its defaults. A method's state subclasses it and sets ``options`` (its
    options dataclass; ``options.method`` is its registered name), ``class_names`` and
    ``is_thing`` (the vocabulary its file records, or None)."""

    options: object
    class_names: list[str] | None = None
    is_thing: list[bool] | None = None

    # -- what the decoder reads --------------------------------------------------------------
    def forward(self) -> tuple[Tensor, Tensor | None]:
        """The decoder's inputs: spatial (N, D) and semantic (C, D) embeddings (None: the SFM
        has no text encoder, and it is scored class-agnostically)."""
        raise NotImplementedError

    def decode(self, sfm: PromptableSFM, feats: Features, spatial: Tensor,
               semantic: Tensor | None) -> Outputs:
        """Decode ``feats`` with the inputs ``forward`` gave (batched (B, N, D) / (B, C, D), or
        (N, D) / (C, D) for the whole batch). Default: the frozen SFM's own ``decode``. Override
        it to adapt the decoder (patch it inside, then restore it), to post-process its
        outputs (e.g. add to ``class_logits``) or to prompt each image from its features; a
        state that does is decoded on its own, not batched with other states."""
        return sfm.decode(feats, spatial, semantic)

    @property
    def adapts_decode(self) -> bool:
        return type(self).decode is not MethodState.decode

    @property
    def agnostic(self) -> bool:
        """No class prompts: trained and scored class-agnostically (SAM)."""
        return self()[1] is None

    # -- training ----------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable())

    @property
    def needs_shots(self) -> bool:
        """Whether the shots change it (trained, or fitted in ``prepare`` like a training-free
        prototype method); False: the study evaluates it once for every seed."""
        return bool(self.trainable())

    def prepare(self, sfm: PromptableSFM, feats: Features,
                targets: list[tuple[Tensor, Tensor]]) -> None:
        """Called once per training job before its first step, with its shots' frozen features
        and (labels (K,), masks (K, h, w)) targets in the SFM's frame: fit what the shots
        determine (cache keys, prototypes, which classes may learn). Default: nothing."""

    def param_groups(self, cfg) -> list[dict]:
        """AdamW parameter groups for the ``TrainConfig`` ``cfg``; each has ``lr_mult`` (its
        learning rate is the schedule's times it) and ``weight_decay``. Default: one group of
        every trainable parameter at ``cfg.lr`` and ``cfg.weight_decay``."""
        return [{"params": self.trainable(), "lr_mult": 1.0, "weight_decay": cfg.weight_decay}]

    def optimizer(self, groups: list[dict], cfg) -> torch.optim.Optimizer:
        """The optimiser over ``param_groups(cfg)`` (a method whose recipe names another, e.g.
        CoOp's SGD). Default: AdamW."""
        return torch.optim.AdamW(groups, lr=cfg.lr)

    def lr_at(self, step: int, steps: int, cfg) -> float:
        """The learning rate at optimiser step ``step`` (0-based) of a ``steps``-step run; each
        group's is this times its ``lr_mult``. Default: ``cfg.lr`` times linear warm-up over
        ``cfg.warmup`` steps times cosine decay (``lr_scale``)."""

        return cfg.lr * lr_scale(step, steps, cfg.warmup)

    def regulariser(self) -> Tensor:
        """Added to the loss times ``TrainConfig.anchor`` (SSPrompt: the drift of the learned
        embeddings from the defaults). Default 0."""
        return torch.zeros(())

    # -- selection and reporting -------------------------------------------------------------
    def restore_defaults(self, sfm: PromptableSFM) -> None:
        """Make the state give exactly the zero-shot prompts (held-out selection's fallback)."""
        raise NotImplementedError(f"{type(self).__name__}: no restore_defaults")

    def moved(self) -> dict[str, float] | None:
        """How far training moved the state from its start (reported per cell); None: n/a."""
        return None

    def fusion_weights(self) -> dict[str, Tensor]:
        return {}


class _Adapted:
    """An SFM whose ``decode`` is a state's (``adapted_sfm``); everything else is the SFM's."""

    def __init__(self, sfm: PromptableSFM, state: MethodState):
        self._sfm, self._state = sfm, state

    def __getattr__(self, name):
        return getattr(self._sfm, name)

    def decode(self, feats: Features, spatial: Tensor, semantic: Tensor | None) -> Outputs:
        return self._state.decode(self._sfm, feats, spatial, semantic)


def adapted_sfm(sfm: PromptableSFM, state: MethodState | None):
    """``sfm`` as ``state`` decodes it: the SFM itself for a state that does not adapt decoding
    (every SSPrompt kind), else a stand-in whose ``decode`` is ``state.decode`` (pass it where
    an SFM decodes that state's prompts: evaluation, the held-out tracker, ``Predictor``)."""
    if state is None or not getattr(state, "adapts_decode", False):
        return sfm
    return _Adapted(sfm, state)


def build_state(sfm: PromptableSFM, class_names: list[str] | None, options,
                generator: torch.Generator | None = None,
                is_thing: list[bool] | None = None) -> MethodState:
    """A fresh state of the method ``options`` belong to (``options.method``)."""
    from . import get_method

    return get_method(options.method).builder()(sfm, class_names, options, generator=generator,
                                                  is_thing=is_thing)


def load_state(sfm: PromptableSFM, prompts) -> MethodState:
    """The state a prompts file (a ``load_prompts`` result) was saved from: the method its
    metadata names, built from its recorded options, with its saved tensors loaded."""
    from . import get_method, make_options

    meta = prompts.meta
    recorded = dict((meta.get("config") or {}).get("prompt") or {})
    name = recorded.pop("method", None) or recorded.pop("kind", None) or meta.get("kind")
    recorded.pop("kind", None)
    options = make_options(name, recorded)
    get_method(name)
    state = build_state(sfm, prompts.class_names, options, is_thing=prompts.is_thing)
    tensors = {k[len("learner."):]: v for k, v in (prompts.state or {}).items()
               if k.startswith("learner.")}
    if tensors:
        state.load_state_dict(tensors, strict=False)
    return state


@torch.no_grad()
def identity_at_init(sfm: PromptableSFM, name: str, class_names: list[str] | None,
                     feats: Features, **options) -> bool | None:
    """The identity-at-init check: method ``name`` built with its ``identity`` option values
    (``Method.identity``; ``options`` add to them, e.g. ``n_prompts``) decodes ``feats``
    exactly as its ``reference`` method (zero-shot or prompt engineering) does: the same mask
    and class logits, bit for bit. None where the method declares no such setting."""
    from . import get_method, make_options

    method = get_method(name)
    if method.identity is None:
        return None

    def outputs(who: str, values: dict):
        own = {k: v for k, v in values.items() if k in _fields_of(who)}
        state = build_state(sfm, class_names, make_options(who, own),
                            generator=torch.Generator().manual_seed(0))
        return state.decode(sfm, feats, *state())

    got = outputs(name, {**options, **method.identity})
    ref = outputs(method.reference, options)
    return torch.equal(got.mask_logits, ref.mask_logits) and \
        torch.equal(got.class_logits, ref.class_logits)


def _fields_of(name: str) -> set[str]:
    from . import option_fields

    return set(option_fields(name))
