"""Decoder LoRA (SAMed, Zhang & Liu 2023, github hitachinsk/SAMed, ``SAMed_s``: LoRA on the mask
decoder) on a frozen SFM.

Rank-r updates ``W + B A`` (A Kaiming-uniform, B zero) of the query and value projections of
every attention of the SFM's mask decoder; everything else stays frozen, and the prompts are
the zero-shot defaults (the grid and the bare class names). The shared SFM is never modified:
``decode`` swaps ``W + B A`` in for each patched weight for the duration of that one call and
puts the frozen weight back after it (also on error), so every other cell, and this state's
own evaluation outside ``decode``, sees the SFM unchanged. B = 0 at the start, so step 0
decodes exactly as zero-shot (``W + 0`` is ``W``), and ``restore_defaults`` zeroes B.

Where the LoRA goes, per backend (``lora_targets``):

* **embedded**: each decoder layer's query cross-attention (query -> image tokens) and self
  attention (``nn.MultiheadAttention``: the q rows and v rows of its packed ``in_proj_weight``);
  3 layers x 2 attentions x (q, v) at D = 128, rank 4: 12,288 parameters.
* **SAM / SAM 2**: the two-way transformer's self attention, token -> image and image -> token
  cross attentions of every layer and its final token -> image attention (``q_proj``,
  ``v_proj``): exactly SAMed's set.
* **SAM 3**: its DETR decoder's self, text cross and vision cross attentions of every layer
  and the mask decoder's prompt cross attention. SAM 3's DETR *encoder* (text-image fusion
  before decoding) is an encoder, and stays as it is.

The recipe, as SAMed trains: AdamW lr 5e-3 (``lora_lr``), weight decay 0.1, betas (0.9,
0.999), a linear warm-up then poly decay ``(1 - (t - W) / T) ** 0.9``. SAMed warms up for 250
of its 18,600 iterations (200 epochs x 93 iterations: 2,211 Synapse slices, batch 12 on each
of 2 GPUs); the same fraction of our step budget is ``ceil(steps * 250 / 18,600)`` steps (2 of
100). The train config's ``lr`` / ``weight_decay`` / ``warmup`` are SSPrompt's and are not used;
its ``steps`` and ``batch`` are. What the frozen-SFM setting changes: SAMed also LoRAs the
image encoder and fine-tunes the prompt encoder and the decoder's heads; here the image
features are cached (the image encoder is never run in training) and the heads stay frozen, so
only the decoder attentions adapt. The loss is ssprompt's set loss (SAMed's 0.2 CE + 0.8 Dice
is for its fixed per-organ masks).

Note on memory: the backends checkpoint their decoder chunks only when the prompts need
gradients; LoRA's prompts do not, so its decode runs un-checkpointed (a recomputation in
backward would run outside the swap, with the frozen weights).

The options are declared torch-free (``ssprompt train --help`` imports no torch); the state
class is defined on first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..errors import UserError
from .options import Options, opt

WEIGHT_DECAY = 0.1              # SAMed's AdamW weight decay
POLY_POWER = 0.9                # SAMed's poly decay exponent
SAMED_WARMUP, SAMED_ITERATIONS = 250, 18_600   # SAMed's warm-up of its max iterations
# the decoders LoRA adapts, by module path (the other attentions are encoders')
DECODER_PREFIXES = ("decoder.", "model.mask_decoder.", "model.detr_decoder.")


@dataclass
class LoRAOptions(Options):
    """Decoder LoRA (SAMed): rank-``rank`` updates of the decoder attentions' q and v."""

    rank: int = opt(4, "rank of the LoRA updates of the decoder attentions' q and v projections")
    lora_lr: float = opt(5e-3, "AdamW learning rate of the LoRA updates (SAMed's; the train lr "
                         "is SSPrompt's and not used)")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise UserError(f"rank {self.rank}: must be a positive integer", field="rank")
        if isinstance(self.lora_lr, bool) or not isinstance(self.lora_lr, (int, float)) \
                or self.lora_lr < 0:
            raise UserError(f"lora_lr {self.lora_lr}: must be a number >= 0", field="lora_lr")
        self.lora_lr = float(self.lora_lr)


def warmup_steps(steps: int) -> int:
    """SAMed's warm-up fraction (250 of 18,600 iterations) of a ``steps``-step budget."""
    return max(1, math.ceil(steps * SAMED_WARMUP / SAMED_ITERATIONS))


def lr_factor(step: int, steps: int) -> float:
    """SAMed's schedule at step ``step`` (0-based) of ``steps``: linear warm-up, then
    ``(1 - (step - W) / steps) ** 0.9``."""
    w = warmup_steps(steps)
    if step < w:
        return (step + 1) / w
    return max(0.0, 1.0 - (step - w) / steps) ** POLY_POWER


def lora_targets(sfm) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """The decoder weights LoRA adapts: (module path, parameter name, [(first row, end row) of
    q, of v]); an ``nn.MultiheadAttention`` packs q, k, v in one ``in_proj_weight``."""
    from torch import nn

    out = []
    for path, m in sfm.named_modules():
        if not path.startswith(DECODER_PREFIXES):
            continue
        if isinstance(m, nn.MultiheadAttention):
            if not m._qkv_same_embed_dim:
                raise UserError("lora: an attention with separate q / k / v weights of other "
                                "widths is not supported", field="kind")
            e = m.embed_dim
            out.append((path, "in_proj_weight", [(0, e), (2 * e, 3 * e)]))
        elif isinstance(getattr(m, "q_proj", None), nn.Linear) and \
                isinstance(getattr(m, "v_proj", None), nn.Linear):
            for proj in ("q_proj", "v_proj"):
                rows = getattr(m, proj).weight.shape[0]
                out.append((f"{path}.{proj}" if path else proj, "weight", [(0, rows)]))
    return out


@functools.cache
def state_class():
    """The LoRA state class (defined on first use: torch is imported here, not at import)."""
    return _define()


def build(sfm, class_names, options, generator=None, is_thing=None):
    return state_class()(sfm, class_names, options, generator=generator, is_thing=is_thing)


def _define():
    import contextlib

    import torch
    from torch import nn

    from ..prompts.promptset import default_prompts
    from ..sfm.base import default_n_prompts
    from .base import MethodState

    class DecoderLoRA(MethodState):
        """The zero-shot prompts (buffers) and, per adapted weight W (rows of q and of v), a
        pair A (r, in), B (rows, r): ``decode`` runs the SFM with ``W + B A``."""

        def __init__(self, sfm, class_names, options, generator=None, is_thing=None):
            super().__init__()
            if options.n_prompts is None:   # the backend's own number, recorded in the options
                options.n_prompts = default_n_prompts(sfm)
            self.options = options
            self.class_names = None if class_names is None else list(class_names)
            self.is_thing = None if is_thing is None else [bool(x) for x in is_thing]
            targets = lora_targets(sfm)
            if not targets:
                raise UserError(f"lora: {type(sfm).__name__} has no mask-decoder attention with "
                                "q and v projections to adapt", field="kind")
            spatial, semantic = default_prompts(sfm, class_names, options.n_prompts)
            self.register_buffer("spatial", spatial)
            self.register_buffer("semantic", semantic)
            self.targets = [(path, name, rows) for path, name, rows in targets]
            r = options.rank
            self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
            self._w_sq = 0.0   # the adapted rows' sum of squares (``moved``)
            for path, name, rows in self.targets:
                w = sfm.get_submodule(path)._parameters[name]
                for a, b in rows:
                    self._w_sq += float(w[a:b].detach().float().pow(2).sum())
                    A = torch.empty(r, w.shape[1], device=w.device)
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
                    self.lora_A.append(nn.Parameter(A))
                    self.lora_B.append(nn.Parameter(torch.zeros(b - a, r, device=w.device)))

        def forward(self):
            return self.spatial, self.semantic

        def _patched_weights(self, sfm) -> list[tuple[object, str, torch.Tensor]]:
            """(module, parameter name, W + B A) for every adapted weight."""
            out, i = [], 0
            for path, name, rows in self.targets:
                module = sfm.get_submodule(path)
                w = module._parameters[name]
                parts, end = [], 0
                for a, b in rows:
                    if a > end:
                        parts.append(torch.zeros(a - end, w.shape[1], dtype=w.dtype,
                                                 device=w.device))
                    parts.append((self.lora_B[i] @ self.lora_A[i]).to(w.dtype))
                    end, i = b, i + 1
                if end < w.shape[0]:
                    parts.append(torch.zeros(w.shape[0] - end, w.shape[1], dtype=w.dtype,
                                             device=w.device))
                out.append((module, name, w + torch.cat(parts)))
            return out

        @contextlib.contextmanager
        def patched(self, sfm):
            """The SFM's adapted weights are ``W + B A`` inside the block, the frozen
            parameters again after it."""
            patched = self._patched_weights(sfm)
            saved = [(m, name, m._parameters[name]) for m, name, _ in patched]
            try:
                for m, name, w in patched:
                    m._parameters[name] = w
                yield sfm
            finally:
                for m, name, w in saved:
                    m._parameters[name] = w

        def decode(self, sfm, feats, spatial, semantic):
            with self.patched(sfm):
                return sfm.decode(feats, spatial, semantic)

        def param_groups(self, cfg):
            return [{"params": self.trainable(), "lr_mult": 1.0, "weight_decay": WEIGHT_DECAY}]

        def optimizer(self, groups, cfg):
            return torch.optim.AdamW(groups, lr=self.options.lora_lr, betas=(0.9, 0.999))

        def lr_at(self, step, steps, cfg):
            return self.options.lora_lr * lr_factor(step, steps)

        @torch.no_grad()
        def restore_defaults(self, sfm) -> None:
            for b in self.lora_B:
                b.zero_()

        @torch.no_grad()
        def moved(self):
            """RMS of the updates B A relative to the RMS of the weights they update."""
            num = sum(float((b @ a).pow(2).sum()) for a, b in zip(self.lora_A, self.lora_B))
            return {"decoder": round(math.sqrt(num / max(self._w_sq, 1e-24)), 5)}

    return DecoderLoRA
