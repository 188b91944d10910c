"""A variant's full set of prompts (spatial + semantic), built from one config, saved and
reloaded as safetensors.

A prompts file describes itself: its safetensors metadata holds the class names and their
thing / stuff flags, the SFM weights hash, N, the variant kind and learners and the training config, so
loading it for another SFM or another class list is refused (``check_prompts``). Files written
before that (no class names inside) still load; only their class count is checked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..sfm.base import PromptableSFM, default_n_prompts, weights_hash_of
from .fusion import FusedPrompt
from .semantic import default_semantic, engineered_semantic
from .spatial import Vanilla2DPrompt, default_spatial

# what a variant does with its prompts (the study YAML's ``kind``, ``ssprompt train --kind``):
# zero_shot and prompt_engineering learn nothing; vanilla_2d learns the points' coordinates;
# average, weighted and learned_only are the fusion modes of learned embeddings (fusion.py)
KINDS = ("zero_shot", "prompt_engineering", "vanilla_2d", "average", "weighted", "learned_only")
FUSED_KINDS = ("average", "weighted", "learned_only")   # kind = the learners' fusion mode
LEARNERS = ("spatial", "semantic")


def default_prompts(sfm: PromptableSFM, class_names: list[str] | None,
                    n_prompts: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The zero-shot prompts: the frozen encoders' own (default) embeddings of the N-point grid
    (N, D) and of the bare class names (C, D), or None where there are no class names or the
    SFM has no text encoder. ``n_prompts=None``: the backend's own N."""
    spatial = default_spatial(sfm, n_prompts)
    has_text = class_names is not None and sfm.has_text_encoder
    return spatial, (default_semantic(sfm, class_names) if has_text else None)


@dataclass
class PromptConfig:
    kind: str = "weighted"         # one of KINDS
    learners: tuple[str, ...] = LEARNERS
    n_prompts: int | None = None   # None: the backend's own (base.default_n_prompts)
    init: str | None = None   # None: "random" for learned_only, "default" otherwise
    weight_shape: str = "prompt"   # the learned fusion weight per prompt, or per prompt and dim
    weight_init: float = 0.5  # the learned fusion weight's start (``weighted``)
    # the anchor (the pull of z_learned towards z_default, TrainConfig.anchor) applies to the
    # fused modes; None: fused modes yes, learned_only no (its default is gone). True also
    # anchors learned_only: the study's control that keeps the pull but drops the fusion
    anchored: bool | None = None

    def __post_init__(self):
        if self.init is None:
            # learned_only starts from noise (the default embedding is really gone); the fused
            # modes start from a copy of the default, which did better on the val split
            self.init = "random" if self.kind == "learned_only" else "default"
        if self.kind not in KINDS:
            hint = " ('default' is now 'zero_shot')" if self.kind == "default" else ""
            raise UserError(f"kind {self.kind}: unknown{hint}; choose one of {', '.join(KINDS)}",
                            field="kind")
        if isinstance(self.learners, str):
            self.learners = tuple(x for x in self.learners.split(",") if x)
        self.learners = tuple(self.learners)
        bad = [x for x in self.learners if x not in LEARNERS]
        if bad or not self.learners:
            raise UserError(f"learners {','.join(self.learners)}: choose from spatial,semantic",
                            field="learners")
        if self.n_prompts is not None and (not isinstance(self.n_prompts, int)
                                           or self.n_prompts <= 0):
            raise UserError(f"n_prompts {self.n_prompts}: must be a positive integer",
                            field="n_prompts")


class PromptSet(nn.Module):
    """Spatial (N, D) and semantic (C, D) prompts for one variant; ``forward`` gives both."""

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

    def forward(self) -> tuple[Tensor, Tensor | None]:
        return self.spatial(), (self.semantic() if self.semantic is not None else None)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable())

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


def save_prompts(path: Path, prompts: PromptSet, meta: dict) -> None:
    """Fused embeddings (what the decoder reads) + every learner tensor, and JSON metadata:
    ``meta`` (the caller's: ``sfm`` weights hash, ``config``, ``metrics``, ...) plus what makes
    the file self-describing, taken from ``prompts`` unless ``meta`` gives it: ``class_names``,
    ``is_thing``, ``n_prompts``, ``kind``, ``learners``."""
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
    meta = {"format": PROMPTS_FORMAT, "class_names": prompts.class_names,
            "is_thing": prompts.is_thing, "n_prompts": int(spatial.shape[-2]),
            "kind": prompts.cfg.kind, "learners": list(prompts.cfg.learners), **meta}
    write_bytes(path, save(tensors, metadata={"ssprompt": json.dumps(meta)}))


class LearnedPrompts(NamedTuple):
    """What a prompts file holds: ``spatial, semantic, meta = load_prompts(path)``."""

    spatial: Tensor                # (N, D) fused spatial embeddings
    semantic: Tensor | None        # (C, D) fused class embeddings, None for a spatial-only SFM
    meta: dict

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
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt prompts file ({str(e).splitlines()[0][:120]})") from None
    except KeyError:
        raise UserError(f"{path}: not an ssprompt prompts file (no 'spatial' tensor)") from None
    return LearnedPrompts(spatial, semantic, meta)


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


def config_dict(cfg: PromptConfig) -> dict:
    d = asdict(cfg)
    d["learners"] = list(cfg.learners)
    return d
