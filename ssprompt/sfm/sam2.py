"""SAM 2 through Hugging Face transformers' ``Sam2Model``: a frozen, spatial-only SFM backend.

SAM 2 keeps SAM v1's prompt encoder and mask-decoder contract, so everything but two methods is
``sam_common.PointPromptSFM`` (see ``sam.py`` for the conventions: one positive point per
prompt in the model's square input frame, class logits ``[logit(clamp(iou)), 0]``).
What differs:

* preprocessing is ``Sam2ImageProcessor``'s: the image resized to ``image_size`` x
  ``image_size`` whatever its aspect ratio (no padding; ``sam_common.StretchProcessor``), and
  masks go back as its ``post_process_masks`` does, resized straight to the image
  (``geometry.Stretch``); so a point p in [0, 1]^2 is the same fraction of the image itself;

* the image encoder (Hiera + FPN) gives three maps; the two high-resolution ones (already
  projected by the mask decoder's ``conv_s0`` / ``conv_s1``, as ``Sam2Model`` does) are cached
  beside the image embedding (to which SAM 2's ``no_memory_embedding`` is added, as for a single
  image), and the mask decoder reads all three;
* the mask decoder is called with ``multimask_output=False``, so in eval mode it applies SAM 2's
  own stability fallback to the best of its multimask outputs, exactly as ``Sam2Model.forward``.

EdgeTAM (``EdgeTamModel``) shares this interface but its image encoder needs ``timm``, which is
not installed here, so it is not registered.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .base import freeze
from .sam_common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PointPromptSFM,
    StretchProcessor,
    check_checkpoint_dir,
    from_pretrained,
    pixel_stats,
    weights_file_hash,
)

HOW_TO_GET = ("download one in transformers' format on a machine with network (e.g. "
              "`huggingface-cli download facebook/sam2-hiera-base-plus-hf --local-dir "
              "sam2-base-plus`), copy it here, then give the directory as the checkpoint")
LEVELS = ("feat_s0", "feat_s1", "image_embeddings")  # high-res to low-res


class Sam2SFM(PointPromptSFM):
    """A frozen ``transformers.Sam2Model`` behind the ``PromptableSFM`` seam."""

    what = "SAM 2"

    def _embed(self, pixels: Tensor) -> dict[str, Tensor]:
        maps = self.model.get_image_embeddings(pixels)
        return dict(zip(LEVELS, maps))

    def _decoder_extras(self, tensors):
        return {"high_resolution_features": [tensors["feat_s0"], tensors["feat_s1"]]}


def load_sam2(checkpoint: str | Path, device: str | torch.device = "cpu") -> Sam2SFM:
    """A frozen SAM 2 backend from a LOCAL transformers ``Sam2Model.save_pretrained``
    directory; never downloads."""
    from transformers import Sam2Model

    path, files = check_checkpoint_dir(checkpoint, "sam2", "SAM 2", HOW_TO_GET)
    model = from_pretrained(Sam2Model, path, "SAM 2", HOW_TO_GET)
    sfm = Sam2SFM(model, weights_file_hash(files), **pixel_stats(path))
    sfm.processor = StretchProcessor.from_dir(path, sfm.image_size, IMAGENET_MEAN, IMAGENET_STD,
                                              "SAM 2")
    sfm.geometry = sfm.processor.geometry
    return freeze(sfm.to(device))
