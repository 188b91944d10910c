"""What the transformers-based backends share: checkpoint directories, weight hashes, each
processor's preprocessing (``StretchProcessor`` for SAM 2 / SAM 3; SAM v1 calls its own
``SamImageProcessor``), chunked decoding, and the SAM v1 / SAM 2 point-prompt glue.

SAM v1 (``sam.py``) and SAM 2 (``sam2.py``) have the same prompt encoder and the same mask
decoder contract, so ``PointPromptSFM`` holds all of their seam code; each of them only says how
to embed an image and how to call its mask decoder. SAM 3 (``sam3.py``) uses the loading helpers.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..geometry import Stretch, letterbox_shape
from .base import MASK2FORMER_OBJECT_THRESHOLD, Features, Outputs, autocast

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IOU_EPS = 1e-4      # a predicted IoU is clamped to [eps, 1 - eps] before its logit
SAM_GRID = 32       # SAM's automatic mask generator: points_per_side
PROMPT_CHUNK = 64   # SAM decoders copy the image embedding per prompt: decode this many at once


# -- checkpoints -----------------------------------------------------------------------------
def weight_files(directory: Path) -> list[Path]:
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


def pixel_stats(directory: Path, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """The checkpoint processor's image mean/std when it ships one, else the given defaults."""
    try:
        pre = json.loads((directory / "preprocessor_config.json").read_text())
        m, s = pre.get("image_mean"), pre.get("image_std")
        if len(m) == 3 and len(s) == 3:
            mean, std = tuple(map(float, m)), tuple(map(float, s))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return {"pixel_mean": tuple(mean), "pixel_std": tuple(std)}


def preprocessor_config(directory: Path) -> dict:
    """The checkpoint's ``preprocessor_config.json`` (its processor's settings), or {}."""
    try:
        cfg = json.loads((directory / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


class StretchProcessor:
    """``Sam2ImageProcessor`` / ``Sam3ImageProcessor`` (transformers' torchvision backend)
    reproduced with torch alone (torchvision is not a dependency): each uint8 image resized to
    ``size`` x ``size`` by antialiased bilinear interpolation ON THE uint8 TENSOR (what
    torchvision's ``resize`` does on CPU), then ``(x - mean / r) / (std / r)`` in float32 with
    ``r`` the rescale factor (its fused rescale + normalise), no padding. Settings come from the
    checkpoint's ``preprocessor_config.json`` when it ships one, else the processor's defaults
    at the model's input size. The tests check it against the processor itself, bit for bit."""

    def __init__(self, size: int, mean, std, rescale_factor: float = 1 / 255):
        self.size = int(size)
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32) * (1.0 / rescale_factor)
        self.std = torch.tensor(tuple(std), dtype=torch.float32) * (1.0 / rescale_factor)
        self.geometry = Stretch(self.size)

    @staticmethod
    def from_dir(directory: Path, size: int, mean, std, what: str) -> "StretchProcessor":
        cfg = preprocessor_config(directory)
        want = cfg.get("size") or {"height": size, "width": size}
        if not isinstance(want, dict) or (want.get("height"), want.get("width")) != (size, size):
            raise UserError(f"{directory}/preprocessor_config.json: size {want} does not match "
                            f"the {what} model's {size} x {size} input")
        if cfg.get("resample", 2) != 2 or cfg.get("do_pad"):
            raise UserError(f"{directory}/preprocessor_config.json: only the {what} "
                            "processor's bilinear resize without padding is supported")
        m, sd = cfg.get("image_mean", mean), cfg.get("image_std", std)
        return StretchProcessor(size, m, sd, float(cfg.get("rescale_factor", 1 / 255)))

    def __call__(self, images: list) -> Tensor:
        """uint8 (H, W, 3) images -> normalised float32 pixel values (B, 3, size, size)."""
        out = []
        for im in images:
            x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].contiguous()
            if tuple(x.shape[-2:]) != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                  align_corners=False, antialias=True)
            out.append(x)
        x = torch.cat(out).float()
        return (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)


def check_checkpoint_dir(checkpoint, model_type: str | tuple[str, ...], what: str,
                         how_to_get: str) -> tuple[Path, list[Path]]:
    """A LOCAL ``save_pretrained`` directory whose config.json names ``model_type`` (or one of
    them); returns (path, weight files) or raises a one-line ``UserError`` ending in
    ``how_to_get``."""
    accepted = (model_type,) if isinstance(model_type, str) else tuple(model_type)
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserError(f"{path}: {what} checkpoint not found; {how_to_get}")
    if not path.is_dir():
        raise UserError(f"{path}: a {what} checkpoint is a directory (config.json + "
                        f"model.safetensors), not a file; {how_to_get}")
    try:
        config = json.loads((path / "config.json").read_text())
    except OSError:
        raise UserError(f"{path}: not a transformers checkpoint (no config.json); "
                        f"{how_to_get}") from None
    except ValueError:
        raise UserError(f"{path}/config.json: not valid JSON; {how_to_get}") from None
    found = config.get("model_type") if isinstance(config, dict) else None
    if found not in accepted:
        raise UserError(f"{path}: not a {what} checkpoint (model_type {found!r}, expected "
                        f"{' or '.join(map(repr, accepted))}); {how_to_get}")
    files = weight_files(path)
    if not files:
        raise UserError(f"{path}: no weights file (model.safetensors or pytorch_model.bin); "
                        f"{how_to_get}")
    return path, files


def from_pretrained(model_cls, path: Path, what: str, how_to_get: str):
    """``model_cls.from_pretrained`` on a local directory, offline, with every failure (corrupt
    file, wrong shapes, missing weights) turned into a one-line ``UserError``."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        model, info = model_cls.from_pretrained(str(path), local_files_only=True,
                                                output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, EOFError, SafetensorError,
            pickle.UnpicklingError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path}: corrupt or incompatible {what} checkpoint ({msg})") from None
    finally:
        if not bars_were_off:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{path}: incomplete {what} checkpoint ({len(missing)} weights missing, "
                        f"e.g. {missing[0]}); {how_to_get}")
    return model


# -- images ----------------------------------------------------------------------------------
def letterbox_tensor(images: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, size, size) as ``geometry.to_batch`` does it (longest side
    resized, zero padding at bottom / right); a no-op when the input is already letterboxed."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    nh, nw = letterbox_shape(images.shape[-2], images.shape[-1], size)
    x = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False,
                      antialias=True)
    return F.pad(x, (0, size - nw, 0, size - nh))


def chunked(fn, n: int, chunk: int, *tensors: Tensor) -> list:
    """``fn(*[t[:, s:s + chunk] for t in tensors])`` over chunks of dim 1 (length ``n``). While
    gradients are recorded each chunk is checkpointed (recomputed in backward), so peak memory is
    one chunk's activations, not all of them."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for s in range(0, n, chunk):
        part = [t[:, s:s + chunk] for t in tensors]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part))
    return outs


def batched_prompts(spatial: Tensor, b: int, dim: int) -> Tensor:
    """(N, D) shared by every image or (B, N, D) per image -> (B, N, D); else ValueError."""
    if spatial.dim() == 2:
        spatial = spatial.unsqueeze(0).expand(b, -1, -1)
    if spatial.dim() != 3 or spatial.shape[0] != b or spatial.shape[-1] != dim:
        raise ValueError(f"spatial must be (N, {dim}) or ({b}, N, {dim}); "
                         f"got {tuple(spatial.shape)}")
    return spatial


# -- the backends' common base ---------------------------------------------------------------
class TransformersSFM(nn.Module):
    """A frozen transformers model behind the seam: weights hash, pixel statistics, the
    processor's preprocessing (``processor``: uint8 images -> pixel values) and geometry
    (``geometry``: how masks go back to the image, as the processor's post-processing), and the
    decoding ``precision`` ("fp32" default, or "bf16" autocast). Subclasses set ``image_size``,
    ``_ref`` (a frozen weight: the device and dtype the model runs in) and ``encode_pixels``.

    ``encode_images`` (uint8 images of any size, the processor's preprocessing) is what the
    feature cache and the predictor call; ``encode_image`` takes [0, 1] tensors (B, 3, S, S)
    and only normalises them (another size is letterboxed: a fallback for direct callers)."""

    image_size: int
    processor = None
    geometry = None
    precision = "fp32"

    def __init__(self, model, weights_hash: str, pixel_mean, pixel_std):
        super().__init__()
        self.model = model
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self._hash = weights_hash

    def _pixels(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] (another size is letterboxed: fallback) -> the model's
        normalised input, on its device and in its dtype."""
        ref = self._ref
        x = letterbox_tensor(images.to(device=ref.device, dtype=torch.float32), self.image_size)
        return ((x - self.pixel_mean) / self.pixel_std).to(ref.dtype)

    def weights_hash(self) -> str:
        return self._hash

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Features:
        """(B, 3, S, S) images in [0, 1] (S = ``image_size``) -> the image encoder's features
        (normalised with the processor's mean / std; another size is letterboxed here)."""
        return self.encode_pixels(self._pixels(images))

    @torch.no_grad()
    def encode_images(self, images: list) -> Features:
        """uint8 (H, W, 3) images of any sizes, preprocessed exactly as the checkpoint's
        transformers processor does (``processor``) -> the image encoder's features."""
        ref = self._ref
        return self.encode_pixels(self.processor(images).to(device=ref.device, dtype=ref.dtype))

    def encode_pixels(self, pixels: Tensor) -> Features:
        raise NotImplementedError

    def decode(self, feats: Features, spatial: Tensor, semantic: Tensor | None) -> Outputs:
        """The backend's ``_decode`` under its ``precision`` (fp32 unless "bf16")."""
        with autocast(self._ref.device, self.precision):
            return self._decode(feats, spatial, semantic)


# -- SAM v1 / SAM 2 ----------------------------------------------------------------------------
class PointPromptSFM(TransformersSFM):
    """A frozen SAM-family model (``SamModel``, ``Sam2Model``) behind the ``PromptableSFM``
    seam: one positive point per prompt, one mask per prompt, class-agnostic scores.

    Subclasses define ``_embed(pixels) -> dict`` (the cached image tensors) and, when their
    mask decoder reads more than the image embedding, ``_decoder_extras(tensors) -> dict``."""

    what = "SAM"            # for messages
    object_mask_threshold = MASK2FORMER_OBJECT_THRESHOLD   # panoptic cut on its IoU scores

    @property
    def has_text_encoder(self) -> bool:
        return False

    def __init__(self, model, weights_hash: str = "untrained",
                 pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
        super().__init__(model, weights_hash, pixel_mean, pixel_std)
        cfg = model.config
        self.embed_dim = int(cfg.prompt_encoder_config.hidden_size)
        self.image_size = int(cfg.prompt_encoder_config.image_size)
        self.prompt_chunk = PROMPT_CHUNK

    @property
    def _ref(self) -> Tensor:
        """A frozen weight: the device and dtype the model runs in."""
        return self.model.prompt_encoder.no_mask_embed.weight

    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor) -> Features:
        """The processor's normalised pixel values -> the image encoder's features."""
        return Features(self._embed(pixels))

    @property
    def default_n_prompts(self) -> int:
        """SAM's own point grid (the automatic mask generator's ``points_per_side`` 32:
        ``grid_layout(1024)`` is exactly its 32 x 32 grid of cell centres)."""
        return SAM_GRID ** 2

    def encode_points(self, points: Tensor) -> Tensor:
        """(N, 2) [0, 1] (x, y) in the padded square input -> (N, D): the prompt encoder's own
        embedding of one positive point per prompt. Differentiable w.r.t. ``points``."""
        ref = self._ref
        pts = points.to(device=ref.device, dtype=ref.dtype) * self.image_size
        pts = pts.reshape(1, -1, 1, 2)  # (batch 1, N prompts, 1 point each, xy)
        labels = torch.ones(pts.shape[:3], dtype=torch.int, device=ref.device)
        sparse, _ = self.model.prompt_encoder(input_points=pts, input_labels=labels,
                                              input_boxes=None, input_masks=None)
        # sparse: (1, N, 2, D) = [the point, the "not a point" padding token]
        return sparse[0, :, 0, :]

    def encode_texts(self, names: list[str]) -> None:
        return None  # no text encoder

    def padding_embedding(self) -> Tensor:
        """(D,) the token the prompt encoder appends to point-only prompts (label -1)."""
        return self.model.prompt_encoder.not_a_point_embed.weight[0]

    def _decode(self, feats: Features, spatial: Tensor, semantic: Tensor | None) -> Outputs:
        """Each of the N spatial embeddings, (N, D) or (B, N, D), is the sparse prompt of its
        own prompt; returns low-res mask logits (B, N, h, w) over the padded square and class
        logits (B, N, 2) = [logit(clamp(predicted IoU)), 0]. Prompts are decoded
        ``prompt_chunk`` at a time (the decoder copies the image embedding per prompt)."""
        if semantic is not None:
            raise UserError(f"SemPrompt needs a text encoder and {self.what} has none; "
                            "learn spatial prompts only")
        ref = self._ref
        tensors = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in feats.tensors.items()}
        b = len(feats)
        spatial = batched_prompts(spatial, b, self.embed_dim).to(device=ref.device,
                                                                  dtype=ref.dtype)
        h, w = self.model.prompt_encoder.image_embedding_size
        dense = ref.reshape(1, -1, 1, 1).expand(b, -1, h, w)      # the no-mask embedding
        pad = self.padding_embedding().view(1, 1, 1, -1)

        def run(sp: Tensor) -> tuple[Tensor, Tensor]:
            sparse = torch.cat([sp.unsqueeze(2), pad.expand(b, sp.shape[1], 1, -1)], dim=2)
            masks, iou = self._decode_masks(tensors, sparse, dense)
            return masks[:, :, 0], iou[:, :, 0]

        parts = chunked(run, spatial.shape[1], self.prompt_chunk, spatial)
        mask_logits = torch.cat([m for m, _ in parts], dim=1)      # (B, N, h', w')
        obj = torch.logit(torch.cat([i for _, i in parts], dim=1).clamp(IOU_EPS, 1 - IOU_EPS))
        class_logits = torch.stack([obj, torch.zeros_like(obj)], dim=-1)  # (B, N, 2)
        return Outputs(mask_logits, class_logits)

    def _decode_masks(self, tensors: dict[str, Tensor], sparse: Tensor, dense: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """The model's own mask decoder, single-mask output (as ``forward`` with
        ``multimask_output=False``): (masks (B, N, 1, h, w), iou (B, N, 1))."""
        emb = tensors["image_embeddings"]
        pos = self.model.get_image_wide_positional_embeddings().expand(emb.shape[0], -1, -1, -1)
        masks, iou = self.model.mask_decoder(
            image_embeddings=emb, image_positional_embeddings=pos,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False, **self._decoder_extras(tensors))[:2]
        return masks, iou

    # -- what a subclass fills ------------------------------------------------------------------
    def _embed(self, pixels: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _decoder_extras(self, tensors: dict[str, Tensor]) -> dict:
        return {}
