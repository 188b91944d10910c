"""A variant's full set of prompts (spatial + semantic), built from one config, saved and
reloaded as safetensors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..sfm.base import PromptableSFM
from .fusion import MODES, FusedPrompt
from .semantic import SemPrompt, default_semantic, engineered_semantic
from .spatial import SpaPrompt, Vanilla2DPrompt, default_spatial

VARIANT_MODES = MODES + ("prompt_engineering", "vanilla_2d")
LEARNERS = ("spatial", "semantic")


@dataclass
class PromptConfig:
    mode: str = "weighted"
    learners: tuple[str, ...] = LEARNERS
    n_prompts: int = 100
    init: str | None = None   # None: "random" for learned_only, "default" otherwise
    weight: str = "prompt"

    def __post_init__(self):
        if self.init is None:
            # learned_only starts from noise (the default embedding is really gone); the fused
            # modes start from a copy of the default, which did better on the val split
            self.init = "random" if self.mode == "learned_only" else "default"
        if self.mode not in VARIANT_MODES:
            raise UserError(f"--mode {self.mode}: unknown; choose one of "
                            f"{', '.join(VARIANT_MODES)}")
        if isinstance(self.learners, str):
            self.learners = tuple(x for x in self.learners.split(",") if x)
        self.learners = tuple(self.learners)
        bad = [x for x in self.learners if x not in LEARNERS]
        if bad or not self.learners:
            raise UserError(f"--learners {','.join(self.learners)}: choose from spatial,semantic")
        if not isinstance(self.n_prompts, int) or self.n_prompts <= 0:
            raise UserError(f"--n-prompts {self.n_prompts}: must be a positive integer")


class PromptSet(nn.Module):
    """Spatial (N, D) and semantic (C, D) prompts for one variant; ``forward`` gives both."""

    def __init__(self, sfm: PromptableSFM, class_names: list[str] | None, cfg: PromptConfig,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        kw = {"init": cfg.init, "weight": cfg.weight, "generator": generator}
        has_text = class_names is not None and sfm.encode_texts(class_names[:1]) is not None
        if "semantic" in cfg.learners and cfg.mode not in ("default", "vanilla_2d",
                                                           "prompt_engineering") and not has_text:
            raise UserError("--learners semantic: this SFM has no text encoder (SAM has none); "
                            "use --learners spatial")
        # spatial
        if cfg.mode == "vanilla_2d":
            self.spatial = Vanilla2DPrompt(sfm, cfg.n_prompts)
        elif cfg.mode in MODES and "spatial" in cfg.learners:
            self.spatial = SpaPrompt(sfm, cfg.n_prompts, cfg.mode, **kw)
        else:
            self.spatial = FusedPrompt(default_spatial(sfm, cfg.n_prompts), "default")
        # semantic
        if not has_text:
            self.semantic = None
        elif cfg.mode == "prompt_engineering":
            self.semantic = FusedPrompt(engineered_semantic(sfm, class_names), "default")
        elif cfg.mode in MODES and "semantic" in cfg.learners:
            self.semantic = SemPrompt(sfm, class_names, cfg.mode, **kw)
        else:
            self.semantic = FusedPrompt(default_semantic(sfm, class_names), "default")

    def forward(self) -> tuple[Tensor, Tensor | None]:
        return self.spatial(), (self.semantic() if self.semantic is not None else None)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable())

    def drift(self) -> Tensor:
        """Squared distance of the fused learners' embeddings from their defaults, relative to
        the defaults' own mean square (so spatial and semantic prompts, whose scales differ
        ~10x, weigh alike); 0 if none. ``learned_only`` is left out: its default is gone."""
        terms = [((m.learned - m.default) ** 2).mean() / (m.default ** 2).mean().clamp_min(1e-12)
                 for m in (self.spatial, self.semantic)
                 if isinstance(m, FusedPrompt) and m.mode in ("average", "weighted")]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def fusion_weights(self) -> dict[str, Tensor]:
        out = {}
        for name in ("spatial", "semantic"):
            m = getattr(self, name)
            if isinstance(m, FusedPrompt):
                out[name] = m.weight().detach().mean(-1)
        return out


def save_prompts(path: Path, prompts: PromptSet, meta: dict) -> None:
    """Fused embeddings (what the decoder reads) + every learner tensor, and JSON metadata."""
    from safetensors.torch import save_file

    spatial, semantic = prompts()
    tensors = {"spatial": spatial.detach().float().clone().contiguous()}
    if semantic is not None:
        tensors["semantic"] = semantic.detach().float().clone().contiguous()
    for k, v in prompts.state_dict().items():
        tensors[f"learner.{k}"] = v.detach().float().clone().contiguous()
    for k, v in prompts.fusion_weights().items():
        tensors[f"weight.{k}"] = v.float().clone().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"ssprompt": json.dumps(meta)})
    tmp.replace(path)


def load_prompts(path: str | Path) -> tuple[Tensor, Tensor | None, dict]:
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
    return spatial, semantic, meta


def config_dict(cfg: PromptConfig) -> dict:
    d = asdict(cfg)
    d["learners"] = list(cfg.learners)
    return d
