"""The embedded SFM: a small SEEM-like promptable segmenter that runs on a 2-core CPU.

Assembled from one component a file under ``modeling/``; pretrained by ``ssprompt pretrain``;
weights shipped as package data, ``ssprompt/weights/embedded_sfm.safetensors`` (found with
importlib.resources, so a non-editable install works), and loaded with safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

from torch import Tensor, nn

from ..errors import UserError
from .base import Features, Outputs, autocast, freeze
from .modeling.image_encoder import ImageEncoder
from .modeling.mask_decoder import MaskDecoder
from .modeling.prompt_encoder import PointEncoder
from .modeling.text_encoder import TextEncoder

DEFAULT_WEIGHTS = Path(str(files("ssprompt").joinpath("weights", "embedded_sfm.safetensors")))


# Panoptic post-processing keeps a query if its top class probability exceeds this. Mask2Former's
# 0.8 suits COCO models; this small SFM spreads probability over similar classes (shirt /
# t-shirt / pullover), so 0.8 dropped half of the source val segments (PQ 52.6 vs 64.1 at 0.4).
# Chosen on the source `val` split (never test); saved with the weights' config.
OBJECT_MASK_THRESHOLD = 0.4


class EmbeddedSFM(nn.Module):
    precision = "fp32"          # decoding precision ("bf16": bfloat16 autocast); load_sfm sets it
    default_n_prompts = 100     # the default number of spatial prompts (a 10 x 10 grid)

    def __init__(self, embed_dim: int = 128, mask_dim: int = 64, layers: int = 3,
                 image_size: int = 96, object_mask_threshold: float = OBJECT_MASK_THRESHOLD):
        super().__init__()
        self.config = {"embed_dim": embed_dim, "mask_dim": mask_dim, "layers": layers,
                       "image_size": image_size, "object_mask_threshold": object_mask_threshold}
        self.embed_dim, self.image_size = embed_dim, image_size
        self.object_mask_threshold = object_mask_threshold
        self.image_encoder = ImageEncoder(embed_dim, mask_dim)
        self.point_encoder = PointEncoder(embed_dim, self.image_encoder.pos)
        self.text_encoder = TextEncoder(embed_dim)
        self.decoder = MaskDecoder(embed_dim, mask_dim, layers)
        self._hash = "untrained"

    # -- the backend seam ------------------------------------------------------------------
    @property
    def has_text_encoder(self) -> bool:
        return True

    def encode_image(self, images: Tensor) -> Features:
        return Features(self.image_encoder(images))

    def encode_points(self, points: Tensor) -> Tensor:
        return self.point_encoder(points)

    def encode_texts(self, names: list[str]) -> Tensor:
        return self.text_encoder(names)

    def decode(self, feats: Features, spatial: Tensor, semantic: Tensor | None,
               aux: bool = False) -> Outputs:
        """``aux=True`` also returns every earlier decoder layer's predictions (pretraining's
        deep supervision); prompt learning and inference use the last layer only."""
        t = feats.tensors
        h = w = int(round(t["tokens"].shape[1] ** 0.5))
        with autocast(t["tokens"].device, self.precision):   # fp32 unless "bf16"
            preds = self.decoder(t["tokens"], t["pos"], t["mask_features"], spatial, semantic,
                                 (h, w), aux=aux)
        return Outputs(preds[-1][0], preds[-1][1], aux=preds[:-1])

    def weights_hash(self) -> str:
        return self._hash

    # -- weights ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> str:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"config": json.dumps(self.config)})
        tmp.replace(path)
        return file_hash(path)


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_embedded(path: str | Path | None = None, device: str = "cpu") -> EmbeddedSFM:
    """Load the frozen embedded SFM from a safetensors file (default: the committed weights)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.exists():
        raise UserError(f"checkpoint {path}: SFM weights file not found (give a weights "
                        ".safetensors from `ssprompt pretrain`, or none for the packaged weights)",
                        field="checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta.get("config", "{}"))
        model = EmbeddedSFM(**config)
        model.load_state_dict(state)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        msg = str(e).splitlines()[0][:160]
        raise UserError(f"{path}: corrupt or incompatible SFM weights ({msg})") from None
    model._hash = file_hash(path)
    return freeze(model.to(device))
