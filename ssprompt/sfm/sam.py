"""SAM through Hugging Face transformers' ``SamModel``: a frozen, promptable SFM backend.

Only transformers' own modules are used (vision encoder, prompt encoder, mask decoder); this file
and the glue it shares with SAM 2 (``sam_common.PointPromptSFM``) map the backend seam
(``base.PromptableSFM``) onto them:

* images go through transformers' own ``SamImageProcessor`` (the checkpoint's
  ``preprocessor_config.json`` when it ships one, else its defaults at the model's input size):
  longest side resized to ``image_size``, normalised, THEN zero-padded to the square; masks come
  back as its ``post_process_masks`` does (``geometry.PadLongest``: bilinear to the padded
  square, crop, bilinear to the image's size);
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
from ..errors import UserError
from ..geometry import PadLongest
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


def sam_processor(path: Path, size: int):
    """The checkpoint's own ``SamImageProcessor`` (its ``preprocessor_config.json``), else the
    processor's defaults at the model's input ``size``; a callable uint8 images -> pixel values.
    (Without torchvision transformers gives its PIL implementation of the same processor.)"""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the "falling back to SamImageProcessorPil" notice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformers import SamImageProcessor   # its import warns without torchvision

            if (path / "preprocessor_config.json").is_file():
                proc = SamImageProcessor.from_pretrained(str(path), local_files_only=True)
            else:
                proc = SamImageProcessor(size={"longest_edge": size},
                                         pad_size={"height": size, "width": size})
    except (OSError, ValueError, TypeError, KeyError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path}/preprocessor_config.json: unusable SAM processor ({msg})") \
            from None
    finally:
        hf_logging.set_verbosity(verbosity)
    longest = (proc.size or {}).get("longest_edge") if isinstance(proc.size, dict) else \
        getattr(proc.size, "longest_edge", None)
    pad = proc.pad_size if isinstance(proc.pad_size, dict) else vars(proc.pad_size or {})
    if longest != size or (pad.get("height"), pad.get("width")) != (size, size) \
            or not proc.do_pad:
        raise UserError(f"{path}/preprocessor_config.json: the processor resizes to {longest} "
                        f"and pads to {pad}, not the SAM model's {size} x {size} input")

    def run(images: list) -> Tensor:
        return proc(images=list(images), return_tensors="pt")["pixel_values"]
    return run


def load_sam(checkpoint: str | Path, device: str | torch.device = "cpu") -> SamSFM:
    """A frozen SAM backend from a LOCAL transformers checkpoint directory (the
    ``save_pretrained`` layout: ``config.json`` + ``model.safetensors``); never downloads."""
    from transformers import SamModel

    path, files = check_checkpoint_dir(checkpoint, "sam", "SAM", HOW_TO_GET)
    model = from_pretrained(SamModel, path, "SAM", HOW_TO_GET)
    sfm = SamSFM(model, weights_file_hash(files), **pixel_stats(path))
    sfm.processor = sam_processor(path, sfm.image_size)
    sfm.geometry = PadLongest(sfm.image_size)
    return freeze(sfm.to(device))
