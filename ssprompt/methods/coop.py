"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models", github
KaiyangZhou/CoOp, trainers/coop.py) on a frozen SFM's text encoder.

M = 16 context vectors, shared by every class, sit before each class name at the frozen text
encoder's token-embedding input (``[ctx_1] .. [ctx_M] name.``, CoOp's class token at the end);
the encoding of that prompt replaces the class-name embedding, through the rest of the SFM's
text path exactly as a class name goes. Gradients flow through the frozen text encoder into
the context vectors, which are the only trained parameters; the spatial prompts are the
default grid. As CoOp's ``CTX_INIT``: ``ctx_init`` empty (the default) draws the ``n_ctx``
context vectors from N(0, 0.02); a phrase ("a photo of a") starts them from its token
embeddings (M = its token count), so that at learning rate 0 the class prompts are exactly the
SFM's encodings of "a photo of a {name}." (``sfm.encode_texts``: one template of prompt
engineering's ensemble, before the ensemble's normalise-and-rescale). With ``n_ctx=0,
suffix=""`` the prompt is the bare name: exactly zero-shot (the registry's identity setting,
checked on every backend).

Per backend (a text encoder is needed: SAM and SAM 2 have none, and ``build`` refuses):

* **embedded**: its text path is MiniLM (mean-pooled over the real tokens, L2-normalised, as
  ``text_encoder._embed_one``) then the SFM's pretrained projection (``embed_sentences``); the
  context replaces MiniLM's word-embedding rows at positions 1..M (after ``[CLS]``). Training
  encodes the C prompts in one padded batch; evaluation one prompt at a time, exactly as
  ``encode_texts`` encodes a text (the two differ by ~1e-7: BLAS rounding by batch shape).
* **SAM 3**: its CLIP text encoder (``get_text_features``: per-token features, padded to T
  tokens, padding zeroed and flattened as ``Sam3SFM.encode_texts``); the context replaces the
  token-embedding rows at positions 1..M (after the start token). M + the name's tokens + 2
  must fit SAM 3's T (32).

The context enters through a forward hook on the token-embedding layer that exists only during
the text pass (the encoder's own code runs, unchanged, on its own token ids); the hook is
removed after it.

The recipe, mapped onto ssprompt's step budget: SGD (momentum 0.9, weight decay 5e-4, Dassl's
default), lr 0.002 (``coop_lr``), cosine decay, 1 warm-up epoch at a constant 1e-5. An epoch is
``ceil(k / batch)`` steps (k: the job's training images), so the warm-up is that many steps at
``coop_lr x 1e-5 / 0.002`` (1e-5 at the default; 0 at ``coop_lr`` 0), then
``coop_lr x (1 + cos(pi (t - W) / steps)) / 2`` (Dassl's cosine over the full run, entered
after the warm-up). CoOp trains 200 epochs at 16 shots; here every trained method gets the same
``steps`` (100 steps = 50 epochs at k = 16, batch 8). The train config's ``lr`` /
``weight_decay`` / ``warmup`` are SSPrompt's and are not used. What the frozen-SFM setting
changes: CoOp's cross-entropy over CLIP's image-text logits becomes ssprompt's set loss over the
decoder's masks and class logits (the class prompts score the decoder's queries).

The options are declared torch-free (``ssprompt train --help`` imports no torch); the state
class is defined on first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..errors import UserError
from .options import Options, opt

COOP_LR = 0.002             # CoOp's SGD learning rate
WARMUP_CONS_LR = 1e-5       # its constant warm-up learning rate (1 epoch)
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
CTX_STD = 0.02              # its random context init, N(0, 0.02)
PLACEHOLDER = "X"           # CoOp's placeholder token for the context positions


@dataclass
class CoOpOptions(Options):
    """CoOp: learned context vectors before every class name, at the text encoder's input."""

    n_ctx: int = opt(16, "context vectors learned before every class name, drawn from "
                     "N(0, 0.02) (0: none, the bare class name)")
    ctx_init: str | None = opt(None, "a phrase (e.g. 'a photo of a') whose token embeddings "
                               "start the context instead (its token count replaces n_ctx; "
                               "default: none, random)")
    suffix: str = opt(".", "text after the class name (CoOp's '.')")
    coop_lr: float = opt(COOP_LR, "SGD learning rate (CoOp's; the train lr is SSPrompt's and "
                         "not used)")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.n_ctx, int) or isinstance(self.n_ctx, bool) or self.n_ctx < 0:
            raise UserError(f"n_ctx {self.n_ctx}: must be an integer >= 0", field="n_ctx")
        if isinstance(self.coop_lr, bool) or not isinstance(self.coop_lr, (int, float)) \
                or self.coop_lr < 0:
            raise UserError(f"coop_lr {self.coop_lr}: must be a number >= 0", field="coop_lr")
        self.coop_lr = float(self.coop_lr)
        self.ctx_init = "" if self.ctx_init is None else str(self.ctx_init)
        self.suffix = str(self.suffix)


def prompt_texts(options, class_names: list[str]) -> tuple[str, list[str]]:
    """(the context's text, each class's prompt text): ``X X .. X name.`` or
    ``a photo of a name.``."""
    prefix = " ".join(options.ctx_init.split()) or " ".join([PLACEHOLDER] * options.n_ctx)
    return prefix, [f"{prefix} {n}{options.suffix}" if prefix else f"{n}{options.suffix}"
                    for n in class_names]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning rate at ``step`` over ``coop_lr``: CoOp's constant warm-up (1e-5 / 0.002)
    for ``warmup`` steps, then cosine over the full run."""
    if step < warmup:
        return WARMUP_CONS_LR / COOP_LR
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / steps))


@functools.cache
def state_class():
    """The CoOp state class (defined on first use: torch is imported here, not at import)."""
    return _define()


def build(sfm, class_names, options, generator=None, is_thing=None):
    return state_class()(sfm, class_names, options, generator=generator, is_thing=is_thing)


def text_path(sfm, class_names, options):
    """The backend's text encoder with a token-embedding input (``_MiniLMPath`` for the
    embedded SFM, ``_ClipPath`` for SAM 3); UserError where there is none."""
    if class_names is None or not sfm.has_text_encoder:
        raise UserError(f"kind coop: {type(sfm).__name__} has no text encoder (SAM and SAM 2 "
                        "have none): CoOp learns a text prompt", field="kind")
    from ..sfm.modeling.text_encoder import TextEncoder

    if isinstance(getattr(sfm, "text_encoder", None), TextEncoder):
        return _define_paths()[0](sfm, class_names, options)
    from ..sfm.sam3 import Sam3SFM

    if isinstance(sfm, Sam3SFM):
        return _define_paths()[1](sfm, class_names, options)
    raise UserError(f"kind coop: {type(sfm).__name__}'s text encoder has no token-embedding "
                    "input that ssprompt knows", field="kind")


_PATHS = None


def _define_paths():
    global _PATHS
    if _PATHS is not None:
        return _PATHS
    import torch
    import torch.nn.functional as F

    class _TokenPath:
        """Token ids of the C prompts, where the context goes (positions 1..M), and a
        text pass with the context in place of those positions' token embeddings."""

        embedding: torch.nn.Module

        def _locate(self, tok, prefix: str, ids: torch.Tensor) -> None:
            pre = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
            self.m = len(pre)
            self.prefix_ids = torch.tensor(pre, dtype=torch.long)
            if self.m and not bool((ids[:, 1:1 + self.m] == self.prefix_ids).all()):
                raise UserError(f"kind coop: the tokenizer does not keep the context "
                                f"{prefix!r} as the first tokens of every prompt", field="kind")

        def phrase_embeddings(self) -> torch.Tensor:
            """(M, H) the token embeddings of the context phrase."""
            w = self.embedding.weight
            return w[self.prefix_ids.to(w.device)].detach().float().clone()

        def width(self) -> int:
            return int(self.embedding.weight.shape[1])

        def _run(self, ctx, fn):
            if self.m == 0:
                return fn()

            def hook(module, args, out):
                c = ctx.to(device=out.device, dtype=out.dtype).unsqueeze(0)
                return torch.cat([out[:, :1], c.expand(out.shape[0], -1, -1),
                                  out[:, 1 + self.m:]], 1)

            handle = self.embedding.register_forward_hook(hook)
            try:
                return fn()
            finally:
                handle.remove()

    class _MiniLMPath(_TokenPath):
        """The embedded SFM: MiniLM mean-pooled over the real tokens, L2-normalised (as
        ``text_encoder._embed_one``), then the SFM's projection (``embed_sentences``)."""

        def __init__(self, sfm, class_names, options):
            from ..sfm.modeling.text_encoder import _minilm

            self.tok, self.model = _minilm()
            self.embedding = self.model.get_input_embeddings()
            self.project = sfm.text_encoder
            prefix, texts = prompt_texts(options, class_names)
            self.batch = self.tok(texts, padding=True, truncation=True, return_tensors="pt")
            self.singles = [self.tok([t], padding=True, truncation=True, return_tensors="pt")
                            for t in texts]
            self._locate(self.tok, prefix, self.batch["input_ids"])

        def _pooled(self, ctx, batch):
            hidden = self._run(ctx, lambda: self.model(**batch).last_hidden_state)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)   # mean pooling, as _embed_one
            return F.normalize(pooled, dim=-1)

        def encode(self, ctx):
            # training: the C prompts in one padded pass; otherwise one pass per prompt, as
            # ``_embed_one`` encodes a text (the padded batch equals it only to ~1e-7: BLAS
            # rounds by batch shape), so that a prompt equal to a text encodes to exactly its
            # ``encode_texts`` embedding
            if torch.is_grad_enabled():
                sent = self._pooled(ctx, self.batch)
            else:
                sent = torch.cat([self._pooled(ctx, b) for b in self.singles])
            proj = self.project.proj[0].weight
            return self.project.embed_sentences(sent.to(proj.device)).float()

    class _ClipPath(_TokenPath):
        """SAM 3: its CLIP text encoder's per-token features (``Sam3SFM.encode_texts``)."""

        def __init__(self, sfm, class_names, options):
            self.sfm = sfm
            tok = sfm.tokenizer
            self.embedding = sfm.model.text_encoder.get_input_embeddings()
            prefix, texts = prompt_texts(options, class_names)
            full = tok(list(texts), truncation=False)["input_ids"]
            long = [t for t, ids in zip(texts, full) if len(ids) > sfm.text_len]
            if long:
                raise UserError(f"kind coop: prompt {long[0]!r} has more than SAM 3's "
                                f"{sfm.text_len} tokens; use fewer context vectors (n_ctx)",
                                field="n_ctx")
            b = tok(list(texts), padding="max_length", max_length=sfm.text_len,
                    truncation=True, return_tensors="pt")
            self.ids, self.mask = b["input_ids"], b["attention_mask"]
            self._locate(tok, prefix, self.ids)

        def encode(self, ctx):
            ref = self.sfm._ref
            ids, mask = self.ids.to(ref.device), self.mask.to(ref.device)
            feats = self._run(ctx, lambda: self.sfm.model.get_text_features(
                input_ids=ids, attention_mask=mask).pooler_output)
            return (feats * mask[..., None].to(feats.dtype)).flatten(1).float()

    _PATHS = (_MiniLMPath, _ClipPath)
    return _PATHS


def _define():
    import torch
    from torch import nn

    from ..prompts.promptset import default_prompts
    from ..sfm.base import default_n_prompts
    from .base import MethodState

    class CoOp(MethodState):
        """The context vectors ``ctx`` (M, H) and the default grid (a buffer); ``forward``
        encodes the C prompts with the context through the frozen text encoder."""

        def __init__(self, sfm, class_names, options, generator=None, is_thing=None):
            super().__init__()
            if options.n_prompts is None:   # the backend's own number, recorded in the options
                options.n_prompts = default_n_prompts(sfm)
            self.options = options
            self.class_names = None if class_names is None else list(class_names)
            self.is_thing = None if is_thing is None else [bool(x) for x in is_thing]
            self.text = text_path(sfm, class_names, options)   # not a module: not saved
            spatial, semantic = default_prompts(sfm, class_names, options.n_prompts)
            self.register_buffer("spatial", spatial)
            self.register_buffer("zero_shot", semantic)       # restore_defaults' prompts
            self.register_buffer("fallback", torch.zeros((), dtype=torch.bool))
            if options.ctx_init.strip():
                ctx = self.text.phrase_embeddings()
            else:
                ctx = torch.empty(self.text.m, self.text.width())
                nn.init.normal_(ctx, std=CTX_STD, generator=generator)
            self.ctx = nn.Parameter(ctx)
            self.register_buffer("ctx_start", ctx.detach().clone())
            self.k: int | None = None
            self._cache = None

        def forward(self):
            if bool(self.fallback):
                return self.spatial, self.zero_shot
            if torch.is_grad_enabled():
                return self.spatial, self.text.encode(self.ctx)
            key = (self.ctx._version, self.ctx.data_ptr())
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.text.encode(self.ctx))
            return self.spatial, self._cache[1]

        def prepare(self, sfm, feats, targets) -> None:
            self.k = len(targets)    # an epoch's steps (the warm-up) follow from k and batch

        def param_groups(self, cfg):
            return [{"params": self.trainable(), "lr_mult": 1.0, "weight_decay": WEIGHT_DECAY}]

        def optimizer(self, groups, cfg):
            return torch.optim.SGD(groups, lr=self.options.coop_lr, momentum=MOMENTUM)

        def warmup_steps(self, cfg) -> int:
            """One epoch: ceil(k / batch) steps (1 before ``prepare``)."""
            k = self.k or 1
            return math.ceil(k / max(1, min(cfg.batch, k)))

        def lr_at(self, step, steps, cfg):
            return self.options.coop_lr * lr_factor(step, steps, self.warmup_steps(cfg))

        @torch.no_grad()
        def restore_defaults(self, sfm) -> None:
            self.fallback.fill_(True)

        @torch.no_grad()
        def moved(self):
            """RMS(ctx - its start) / RMS(its start)."""
            if self.ctx.numel() == 0:
                return None
            d = ((self.ctx - self.ctx_start) ** 2).mean().sqrt()
            return {"ctx": round(float(d / (self.ctx_start ** 2).mean().sqrt()
                                       .clamp_min(1e-12)), 5)}

    return CoOp
