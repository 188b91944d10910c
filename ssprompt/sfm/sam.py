"""SAM through Hugging Face transformers' ``SamModel``: a frozen, promptable SFM backend.

Only transformers' own modules are used (vision encoder, prompt encoder, mask decoder); this file
and the glue it shares with SAM 2 (``sam_common.PointPromptSFM``) map the backend seam
(``base.PromptableSFM``) onto them:

* images arrive letterboxed to SAM's square input (``geometry.to_batch``: longest side resized,
  zero padding at bottom / right, as SAM's own processor pads) and are normalised with the
  checkpoint's pixel mean/std (ImageNet unless ``preprocessor_config.json`` says otherwise);
  another size is letterboxed here, never stretched;
* a point p in [0, 1]^2 is the pixel ``p * image_size`` of the padded square input frame,
  labelled positive; each of the N points is its own single-point prompt, so there is one mask
  per prompt;
* SAM's prompt encoder appends a "not a point" padding token to point-only prompts; ``decode``
  appends the same token after every spatial embedding, so ``decode(encode_points(p))`` equals
  ``SamModel(input_points=p * image_size, multimask_output=False)``;
* SAM predicts no classes: the class logits are ``[logit(clamp(iou)), 0]``, an "object" logit from
  SAM's predicted IoU and a constant no-object logit, for class-agnostic / single-class tasks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .base import freeze
from .sam_common import (
    IOU_EPS,
    PointPromptSFM,
    check_checkpoint_dir,
    from_pretrained,
    pixel_stats,
    weights_file_hash,
)

HOW_TO_GET = ("download one on a machine with network (e.g. `huggingface-cli download "
              "facebook/sam-vit-base --local-dir sam-vit-base`), copy it here, then pass "
              "the directory as the checkpoint")
__all__ = ["HOW_TO_GET", "IOU_EPS", "SamSFM", "load_sam", "weights_file_hash"]


class SamSFM(PointPromptSFM):
    """A frozen ``transformers.SamModel`` behind the ``PromptableSFM`` seam."""

    what = "SAM"

    def _embed(self, pixels: Tensor) -> dict[str, Tensor]:
        return {"image_embeddings": self.model.get_image_embeddings(pixels)}


def load_sam(checkpoint: str | Path, device: str | torch.device = "cpu") -> SamSFM:
    """A frozen SAM backend from a LOCAL transformers checkpoint directory (the
    ``save_pretrained`` layout: ``config.json`` + ``model.safetensors``); never downloads."""
    from transformers import SamModel

    path, files = check_checkpoint_dir(checkpoint, "sam", "SAM", HOW_TO_GET)
    model = from_pretrained(SamModel, path, "SAM", HOW_TO_GET)
    sfm = SamSFM(model, weights_file_hash(files), **pixel_stats(path))
    return freeze(sfm.to(device))
