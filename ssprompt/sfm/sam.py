"""SAM through Hugging Face transformers' ``SamModel``: a frozen, promptable SFM backend.

Only transformers' own modules are used (vision encoder, prompt encoder, mask decoder); this file
is glue that maps the backend seam (``base.PromptableSFM``) onto them:

* images in [0, 1] are resized to SAM's square input size and normalised with the checkpoint's
  pixel mean/std (ImageNet unless ``preprocessor_config.json`` says otherwise);
* a point p in [0, 1]^2 is the SAM input-frame pixel coordinate ``p * image_size`` (what SAM's
  processor produces for a point given in the original image's pixels), labelled positive; each
  of the N points is its own single-point prompt, so there is one mask per prompt;
* SAM's prompt encoder appends a "not a point" padding token to point-only prompts; ``decode``
  appends the same token after every spatial embedding, so ``decode(encode_points(p))`` equals
  ``SamModel(input_points=p * image_size, multimask_output=False)``;
* SAM predicts no classes: the class logits are ``[logit(clamp(iou)), 0]``, an "object" logit from
  SAM's predicted IoU and a constant no-object logit, for class-agnostic / single-class tasks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .base import Features, Outputs, freeze

HOW_TO_GET = ("download one on a machine with network (e.g. `huggingface-cli download "
              "facebook/sam-vit-base --local-dir sam-vit-base`), copy it here, then pass "
              "--checkpoint DIR")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
IOU_EPS = 1e-4  # the predicted IoU is clamped to [eps, 1 - eps] before its logit


class SamSFM(nn.Module):
    """A frozen ``transformers.SamModel`` behind the ``PromptableSFM`` seam."""

    def __init__(self, model, weights_hash: str = "untrained",
                 pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.model = model
        cfg = model.config
        self.embed_dim = int(cfg.prompt_encoder_config.hidden_size)
        self.image_size = int(cfg.vision_config.image_size)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self._hash = weights_hash

    # -- helpers ---------------------------------------------------------------------------
    @property
    def _ref(self) -> Tensor:
        """A frozen weight: the device and dtype SAM runs in."""
        return self.model.prompt_encoder.no_mask_embed.weight

    # -- the backend seam ------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Features:
        """(B, 3, H, W) in [0, 1] -> {"image_embeddings": (B, C, h, w)}. The image is resized
        (not letterboxed) to SAM's square input, so [0, 1] point coordinates and the low-res
        masks both span the whole image."""
        ref = self._ref
        x = images.to(device=ref.device, dtype=torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.pixel_mean) / self.pixel_std
        emb = self.model.get_image_embeddings(x.to(ref.dtype))
        return Features({"image_embeddings": emb})

    def encode_points(self, points: Tensor) -> Tensor:
        """(N, 2) [0, 1] (x, y) -> (N, D): SAM's own embedding of one positive point per prompt.
        Differentiable w.r.t. ``points`` (no ``no_grad``; SAM's weights stay frozen)."""
        ref = self._ref
        pts = points.to(device=ref.device, dtype=ref.dtype) * self.image_size
        pts = pts.reshape(1, -1, 1, 2)  # (batch 1, N prompts, 1 point each, xy)
        labels = torch.ones(pts.shape[:3], dtype=torch.int, device=ref.device)
        sparse, _ = self.model.prompt_encoder(input_points=pts, input_labels=labels,
                                              input_boxes=None, input_masks=None)
        # sparse: (1, N, 2, D) = [the point, SAM's "not a point" padding token]
        return sparse[0, :, 0, :]

    def encode_texts(self, names: list[str]) -> None:
        return None  # SAM has no text encoder

    def padding_embedding(self) -> Tensor:
        """(D,) the token SAM's prompt encoder appends to point-only prompts (label -1)."""
        return self.model.prompt_encoder.not_a_point_embed.weight[0]

    def decode(self, feats: Features, spatial: Tensor, semantic: Tensor | None) -> Outputs:
        """Each of the N spatial embeddings (N, D) or (B, N, D) is the sparse prompt of its own
        prompt; returns low-res mask logits (B, N, 4h, 4w) and class logits (B, N, 2)."""
        if semantic is not None:
            raise UserError("SemPrompt needs a text encoder and SAM has none; "
                            "use --learners spatial")
        ref = self._ref
        emb = feats.tensors["image_embeddings"].to(device=ref.device, dtype=ref.dtype)
        b, _, h, w = emb.shape
        if spatial.dim() == 2:
            spatial = spatial.unsqueeze(0).expand(b, -1, -1)
        if spatial.dim() != 3 or spatial.shape[0] != b or spatial.shape[-1] != self.embed_dim:
            raise ValueError(f"spatial must be (N, {self.embed_dim}) or ({b}, N, "
                             f"{self.embed_dim}); got {tuple(spatial.shape)}")
        spatial = spatial.to(device=ref.device, dtype=ref.dtype)
        n = spatial.shape[1]
        pad = self.padding_embedding().view(1, 1, 1, -1).expand(b, n, 1, -1)
        sparse = torch.cat([spatial.unsqueeze(2), pad], dim=2)  # (B, N, 2, D)
        dense = ref.reshape(1, -1, 1, 1).expand(b, -1, h, w)    # SAM's no-mask embedding
        pos = self.model.get_image_wide_positional_embeddings().expand(b, -1, -1, -1)
        masks, iou = self.model.mask_decoder(
            image_embeddings=emb, image_positional_embeddings=pos,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False)
        mask_logits = masks[:, :, 0]                              # (B, N, 4h, 4w)
        obj = torch.logit(iou[:, :, 0].clamp(IOU_EPS, 1 - IOU_EPS))
        class_logits = torch.stack([obj, torch.zeros_like(obj)], dim=-1)  # (B, N, 2)
        return Outputs(mask_logits, class_logits)

    def weights_hash(self) -> str:
        return self._hash


# -- loading -------------------------------------------------------------------------------
def _weight_files(directory: Path) -> list[Path]:
    files = {p for pat in WEIGHT_PATTERNS for p in directory.glob(pat) if p.is_file()}
    return sorted(files, key=lambda p: p.name)


def weights_file_hash(files: list[Path]) -> str:
    """sha256 (first 16 hex) of the weight files' bytes, in name order."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _pixel_stats(directory: Path) -> dict:
    """The checkpoint processor's image mean/std when it ships one, else SAM's (ImageNet)."""
    try:
        pre = json.loads((directory / "preprocessor_config.json").read_text())
        mean, std = pre.get("image_mean"), pre.get("image_std")
        if len(mean) == 3 and len(std) == 3:
            return {"pixel_mean": tuple(map(float, mean)), "pixel_std": tuple(map(float, std))}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return {}


def load_sam(checkpoint: str | Path, device: str | torch.device = "cpu") -> SamSFM:
    """A frozen SAM backend from a LOCAL transformers checkpoint directory (the
    ``save_pretrained`` layout: ``config.json`` + ``model.safetensors``); never downloads."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserError(f"{path}: SAM checkpoint not found; {HOW_TO_GET}")
    if not path.is_dir():
        raise UserError(f"{path}: a SAM checkpoint is a directory (config.json + "
                        f"model.safetensors), not a file; {HOW_TO_GET}")
    try:
        config = json.loads((path / "config.json").read_text())
    except OSError:
        raise UserError(f"{path}: not a transformers checkpoint (no config.json); "
                        f"{HOW_TO_GET}") from None
    except ValueError:
        raise UserError(f"{path}/config.json: not valid JSON; {HOW_TO_GET}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "sam":
        raise UserError(f"{path}: not a SAM checkpoint (model_type {model_type!r}, expected "
                        f"'sam'); {HOW_TO_GET}")
    files = _weight_files(path)
    if not files:
        raise UserError(f"{path}: no weights file (model.safetensors or pytorch_model.bin); "
                        f"{HOW_TO_GET}")

    import pickle

    from safetensors import SafetensorError
    from transformers import SamModel
    from transformers.utils import logging as hf_logging

    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        model, info = SamModel.from_pretrained(str(path), local_files_only=True,
                                               output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, EOFError, SafetensorError,
            pickle.UnpicklingError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path}: corrupt or incompatible SAM checkpoint ({msg})") from None
    finally:
        if not bars_were_off:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{path}: incomplete SAM checkpoint ({len(missing)} weights missing, "
                        f"e.g. {missing[0]}); {HOW_TO_GET}")
    sfm = SamSFM(model, weights_file_hash(files), **_pixel_stats(path))
    return freeze(sfm.to(device))
