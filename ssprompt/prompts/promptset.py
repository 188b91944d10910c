"""A variant's full set of prompts (spatial + semantic), built from one config, saved and
reloaded as safetensors.

A prompts file describes itself: its safetensors metadata holds the class names and their
thing / stuff flags, the SFM weights hash, N, the variant kind (the method) and learners and the
training config, so loading it for another SFM or another class list is refused
(``check_prompts``). Files written before that (no class names inside) still load; only their
class count is checked.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from ..methods.base import MethodState
from ..methods.options import FUSED_KINDS, KINDS, LEARNERS, PromptConfig  # noqa: F401
from ..sfm.base import Features, PromptableSFM, default_n_prompts, weights_hash_of
from .fusion import FusedPrompt
from .semantic import default_semantic, engineered_semantic
from .spatial import Vanilla2DPrompt, default_spatial


def default_prompts(sfm: PromptableSFM, class_names: list[str] | None,
                    n_prompts: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The zero-shot prompts: the frozen encoders' own (default) embeddings of the N-point grid
    (N, D) and of the bare class names (C, D), or None where there are no class names or the
    SFM has no text encoder. ``n_prompts=None``: the backend's own N."""
    spatial = default_spatial(sfm, n_prompts)
    has_text = class_names is not None and sfm.has_text_encoder
    return spatial, (default_semantic(sfm, class_names) if has_text else None)


class PromptSet(MethodState):
    """Spatial (N, D) and semantic (C, D) prompts for one variant; ``forward`` gives both. The
    state (``methods.base.MethodState``) of the six SSPrompt kinds (``methods.fixed``,
    ``methods.vanilla2d``, ``methods.ssprompt`` build it)."""

    def __init__(self, sfm: PromptableSFM, class_names: list[str] | None, cfg: PromptConfig,
                 generator: torch.Generator | None = None, is_thing: list[bool] | None = None):
        super().__init__()
        if cfg.n_prompts is None:   # the backend's own number, recorded in the config
            cfg.n_prompts = default_n_prompts(sfm)
        self.cfg = cfg
        # what the prompts file records about the vocabulary (see save_prompts)
        self.class_names = None if class_names is None else list(class_names)
        self.is_thing = None if is_thing is None else [bool(x) for x in is_thing]
        kw = {"init": cfg.init, "weight_shape": cfg.weight_shape, "weight_init": cfg.weight_init,
              "generator": generator}
        spatial, semantic = default_prompts(sfm, class_names, cfg.n_prompts)
        if "semantic" in cfg.learners and cfg.kind in FUSED_KINDS and semantic is None:
            raise UserError("learners semantic: this SFM has no text encoder (SAM has none); "
                            "learn spatial prompts only", field="learners")
        # spatial: SpaPrompt (a learned embedding fused with each default) or the defaults
        if cfg.kind == "vanilla_2d":
            self.spatial = Vanilla2DPrompt(sfm, cfg.n_prompts)
        elif cfg.kind in FUSED_KINDS and "spatial" in cfg.learners:
            self.spatial = FusedPrompt(spatial, cfg.kind, **kw)
        else:
            self.spatial = FusedPrompt(spatial, "frozen")
        # semantic: SemPrompt, the template ensemble, or the defaults
        if semantic is None:
            self.semantic = None
        elif cfg.kind == "prompt_engineering":
            self.semantic = FusedPrompt(engineered_semantic(sfm, class_names), "frozen")
        elif cfg.kind in FUSED_KINDS and "semantic" in cfg.learners:
            self.semantic = FusedPrompt(semantic, cfg.kind, **kw)
        else:
            self.semantic = FusedPrompt(semantic, "frozen")

    @property
    def options(self) -> PromptConfig:
        return self.cfg

    def forward(self) -> tuple[Tensor, Tensor | None]:
        return self.spatial(), (self.semantic() if self.semantic is not None else None)

    @property
    def agnostic(self) -> bool:
        return self.semantic is None

    def prepare(self, sfm: PromptableSFM, feats: Features,
                targets: list[tuple[Tensor, Tensor]]) -> None:
        if isinstance(self.semantic, FusedPrompt):
            # class prompts learn only the classes these shots show (``FusedPrompt.learn_only``)
            self.semantic.learn_only(sorted({int(c) for lab, _ in targets
                                             for c in lab.tolist()}))

    def param_groups(self, cfg) -> list[dict]:
        # fusion-weight logits move on a sigmoid scale: they get their own learning rate and
        # no weight decay (decay would pull every w towards 0.5)
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        weights = [p for n, p in named if n.endswith("weight_logit")]
        spatial = [p for n, p in named if n == "spatial.learned"]
        others = [p for n, p in named if not n.endswith("weight_logit") and n != "spatial.learned"]
        groups = [{"params": others, "lr_mult": 1.0, "weight_decay": cfg.weight_decay}]
        if spatial:
            groups.append({"params": spatial, "lr_mult": cfg.spatial_lr_mult,
                           "weight_decay": cfg.weight_decay})
        if weights:
            groups.append({"params": weights, "lr_mult": cfg.weight_lr_mult, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def regulariser(self) -> Tensor:
        return self.drift()

    def restore_defaults(self, sfm: PromptableSFM) -> None:
        spatial, semantic = default_prompts(sfm, None if self.semantic is None
                                            else self.class_names, self.cfg.n_prompts)
        self.spatial = FusedPrompt(spatial, "frozen")
        if semantic is not None:
            self.semantic = FusedPrompt(semantic, "frozen")

    @torch.no_grad()
    def moved(self) -> dict[str, float] | None:
        """How far training moved each fused learner's embeddings z from the defaults:
        RMS(z - z_default) / RMS(z_default). What a step-size confound changes."""
        out = {}
        for name in ("spatial", "semantic"):
            m = getattr(self, name)
            if isinstance(m, FusedPrompt) and m.mode != "frozen":
                d = m.default
                out[name] = round(float(((m() - d) ** 2).mean().sqrt()
                                        / (d ** 2).mean().sqrt().clamp_min(1e-12)), 5)
        return out or None

    def drift(self) -> Tensor:
        """Squared distance of the fused learners' embeddings from their defaults, relative to
        the defaults' own mean square (so spatial and semantic prompts, whose scales differ
        ~10x, weigh alike); 0 if none. ``learned_only`` is left out (its default is gone)
        unless the config says ``anchored``."""
        modes = ("average", "weighted") + (("learned_only",) if self.cfg.anchored else ())
        if self.cfg.anchored is False:
            modes = ()
        terms = [((m.learned - m.default) ** 2).mean() / (m.default ** 2).mean().clamp_min(1e-12)
                 for m in (self.spatial, self.semantic)
                 if isinstance(m, FusedPrompt) and m.mode in modes]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def fusion_weights(self) -> dict[str, Tensor]:
        out = {}
        for name in ("spatial", "semantic"):
            m = getattr(self, name)
            if isinstance(m, FusedPrompt):
                out[name] = m.weight().detach().mean(-1)
        return out


PROMPTS_FORMAT = 2  # 1: no vocabulary inside (class count checked only)


def save_prompts(path: Path, prompts: MethodState, meta: dict) -> None:
    """A method's saved form: the decoder's inputs (``spatial``, ``semantic``: what every
    loader reads) + every state tensor (``learner.*``; ``methods.base.load_state`` rebuilds a
    state from them) + its fusion weights, and JSON metadata: ``meta`` (the caller's: ``sfm``
    weights hash, ``config``, ``metrics``, ...) plus what makes the file self-describing, taken
    from ``prompts`` unless ``meta`` gives it: ``class_names``, ``is_thing``, ``n_prompts``,
    ``kind`` (the method's name), ``learners`` (SSPrompt kinds)."""
    from safetensors.torch import save

    from ..io import write_bytes

    spatial, semantic = prompts()
    tensors = {"spatial": spatial.detach().float().clone().contiguous()}
    if semantic is not None:
        tensors["semantic"] = semantic.detach().float().clone().contiguous()
    for k, v in prompts.state_dict().items():
        tensors[f"learner.{k}"] = v.detach().float().clone().contiguous()
    for k, v in prompts.fusion_weights().items():
        tensors[f"weight.{k}"] = v.float().clone().contiguous()
    own = {"learners": list(prompts.options.learners)} \
        if hasattr(prompts.options, "learners") else {}
    meta = {"format": PROMPTS_FORMAT, "class_names": prompts.class_names,
            "is_thing": prompts.is_thing, "n_prompts": int(spatial.shape[-2]),
            "kind": prompts.options.method, **own, **meta}
    write_bytes(path, save(tensors, metadata={"ssprompt": json.dumps(meta)}))


class _Prompts(NamedTuple):
    spatial: Tensor                # (N, D) fused spatial embeddings
    semantic: Tensor | None        # (C, D) fused class embeddings, None for a spatial-only SFM
    meta: dict


class LearnedPrompts(_Prompts):
    """What a prompts file holds: ``spatial, semantic, meta = load_prompts(path)``; ``state``:
    the file's other tensors by name (``learner.*``: the method's state, for
    ``methods.base.load_state``), {} unless read from a file."""

    def __new__(cls, spatial, semantic, meta, state: dict | None = None):
        self = super().__new__(cls, spatial, semantic, meta)
        self.state = dict(state or {})
        return self

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    @property
    def is_thing(self) -> list[bool] | None:
        return self.meta.get("is_thing")


def load_prompts(path: str | Path) -> LearnedPrompts:
    """(spatial (N, D), semantic (C, D) or None, metadata) from a prompts file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: prompts file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("ssprompt", "{}"))
            spatial = f.get_tensor("spatial")
            semantic = f.get_tensor("semantic") if "semantic" in f.keys() else None
            state = {k: f.get_tensor(k) for k in f.keys() if k not in ("spatial", "semantic")}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt prompts file ({str(e).splitlines()[0][:120]})") from None
    except KeyError:
        raise UserError(f"{path}: not an ssprompt prompts file (no 'spatial' tensor)") from None
    return LearnedPrompts(spatial, semantic, meta, state)


def check_prompts(prompts: LearnedPrompts, sfm: PromptableSFM, class_names: list[str] | None,
                  path: str | Path) -> None:
    """Refuse, in one line, prompts learned for other SFM weights or another class list.
    Spatial-only prompts (SAM: scored class-agnostically) fit any class list."""
    meta = prompts.meta
    learned_for = weights_hash_of(meta)
    if learned_for and learned_for != sfm.weights_hash():
        raise UserError(f"{path}: learned for SFM weights {learned_for}, but this SFM is "
                        f"{sfm.weights_hash()}")
    if prompts.semantic is None or class_names is None:
        return
    saved = prompts.class_names
    if saved is not None and list(saved) != list(class_names):
        diff = next((i for i, (a, b) in enumerate(zip(saved, class_names)) if a != b),
                    min(len(saved), len(class_names)))
        ours, theirs = (repr(n[diff]) if diff < len(n) else "missing"
                        for n in (saved, class_names))
        raise UserError(f"{path}: learned for another class list ({len(saved)} classes, this "
                        f"data has {len(class_names)}; class {diff} is {ours} in the prompts, "
                        f"{theirs} here)")
    if prompts.semantic.shape[0] != len(class_names):
        raise UserError(f"{path}: has {prompts.semantic.shape[0]} class prompts but the data "
                        f"has {len(class_names)} classes")


def config_dict(cfg) -> dict:
    """A method's options as a cell records them (``CellSpec.as_dict``)."""
    d = asdict(cfg)
    if "learners" in d:
        d["learners"] = list(cfg.learners)
    return d
