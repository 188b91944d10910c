"""Segment images with a frozen SFM and (learned or default) prompts: the Python API.

    from ssprompt import Predictor, load_prompts, load_sfm

    sfm = load_sfm()                                   # the packaged embedded SFM
    predictor = Predictor(sfm, load_prompts("runs/novel/prompts.safetensors"))
    pred = predictor.predict(image)    # (H, W, 3) or (H, W) array, or an image file's path
    pred.semantic.numpy()  # (H, W) int64 class index per pixel (torch tensors, on the SFM's
    pred.instances         # device: .cpu().numpy()); scored thing masks (K, H, W), ...
    pred.panoptic, pred.segments                       # segment ids (H, W) + their classes
    predictor.class_names                              # class index -> name
    data = open_dataset("coco:ROOT", "test")           # a COCO split: its own ids
    for image_id, pred in predictor.predict_dataset(data): ...  # class c: data.category_ids[c]

Images are read by the one rule of ``ssprompt.data.images`` (uint8 as is; 16-bit scaled by
value / 65535 * 255; grayscale copied to 3 channels; alpha dropped). Every output is a torch
tensor (``Prediction``); on things-only class lists (no stuff class) a pixel no kept segment
covers has ``semantic`` ``NOTHING`` (-1).

In the spirit of Segment Anything's ``SamPredictor``: ``set_image`` runs the image encoder once,
``predict()`` decodes it; every output is at the image's own size (the SFM sees it as its own
processor prepares it: ``ssprompt.geometry``; predictions are mapped back by ``ssprompt.evaluation.postprocess``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .data.views import AGNOSTIC_IS_THING, AGNOSTIC_NAMES
from .errors import UserError
from .evaluation.postprocess import Prediction, postprocess, with_background
from .geometry import geometry_of
from .prompts.promptset import LearnedPrompts, check_prompts, load_prompts
from .sfm.base import Features, PromptableSFM, encode_images, sfm_device
from .sfm.features import FeatureCache

# ``Prediction.semantic`` of a pixel no predicted segment covers, on things-only class lists
# (no stuff class to give it): "nothing" (255 / 65535 in ``ssprompt predict``'s semantic PNGs)
NOTHING = -1


class Predictor:
    """Predictions of ``sfm`` prompted with ``prompts`` (a ``load_prompts`` result or a path to
    a prompts file) or, without prompts, zero-shot with the default N-point grid and the bare
    ``class_names``.

    The classes come from the prompts file when it records them; ``class_names`` / ``is_thing``
    given as well must agree with it. Zero-shot needs ``class_names`` (``is_thing`` defaults to
    every class a thing). An SFM without a text encoder (SAM) predicts class-agnostically:
    classes ``object`` (thing) and ``background`` (stuff).

    ``n_prompts``: zero-shot grid size (default: the backend's own, ``sfm.default_n_prompts``).
    ``cache``: a ``FeatureCache`` to reuse image features across calls (``ssprompt predict``
    uses the evaluation's, so files score exactly as ``ssprompt eval``)."""

    def __init__(self, sfm: PromptableSFM, prompts: LearnedPrompts | str | Path | None = None,
                 class_names: list[str] | None = None, is_thing: list[bool] | None = None,
                 n_prompts: int | None = None, object_mask_threshold: float | None = None,
                 cache: FeatureCache | None = None, batch: int = 50):
        self.sfm, self.cache, self.batch = sfm, cache, batch
        self.device = sfm_device(sfm)
        if prompts is not None:
            path = prompts if isinstance(prompts, (str, Path)) else "prompts"
            if isinstance(prompts, (str, Path)):
                prompts = load_prompts(prompts)
            names = class_names if class_names is not None else prompts.class_names
            check_prompts(prompts, sfm, names, path)
            if is_thing is None:
                is_thing = prompts.is_thing
            spatial, semantic = prompts.spatial, prompts.semantic
            self.sfm = _decoder_of(sfm, prompts)
            if semantic is not None and names is None:
                raise UserError(f"{path}: records no class names (an older prompts file); "
                                "pass class_names")
        else:
            from .prompts.promptset import default_prompts

            names = class_names
            if sfm.has_text_encoder and not names:
                raise UserError("zero-shot prediction needs class_names (the classes to prompt)")
            spatial, semantic = default_prompts(sfm, names, n_prompts)
        self.agnostic = semantic is None
        if self.agnostic:
            names, is_thing = AGNOSTIC_NAMES, AGNOSTIC_IS_THING
        elif is_thing is None:
            is_thing = [True] * len(names)
        if len(is_thing) != len(names):
            raise UserError(f"is_thing has {len(is_thing)} flags for {len(names)} classes")
        self.class_names: list[str] = list(names)
        self.is_thing: list[bool] = [bool(t) for t in is_thing]
        self.things_only = not self.agnostic and all(self.is_thing)
        self.spatial = spatial.to(self.device)
        self.semantic = None if semantic is None else semantic.to(self.device)
        self.object_mask_threshold = object_mask_threshold if object_mask_threshold is not None \
            else sfm.object_mask_threshold
        self._image: tuple[Features, tuple[int, int]] | None = None

    # -- SamPredictor style: encode once, decode on demand -----------------------------------
    def set_image(self, image: np.ndarray | str | Path) -> None:
        """Run the image encoder on one image ((H, W, 3) or (H, W) array, or a file's path) and
        keep its features."""
        image = _check_image(image)
        self._image = (self._features([image]), image.shape[:2])

    def predict(self, image: np.ndarray | list[np.ndarray] | None = None
                ) -> Prediction | list[Prediction]:
        """One image -> a ``Prediction``: an (H, W, 3) or (H, W) array (grayscale; uint8 as
        is, other dtypes by ``data.images``' rule) or an image file's path. A list of them (or
        a (B, H, W, 3) array) -> a list of predictions. No argument -> the image given to
        ``set_image``. Outputs are torch tensors (``pred.semantic.cpu().numpy()``)."""
        if image is None:
            if self._image is None:
                raise UserError("predict(): call set_image(image) first, or pass an image")
            feats, hw = self._image
            return self._decode(feats, [hw])[0]
        if isinstance(image, (str, Path)) or (hasattr(image, "ndim") and image.ndim in (2, 3)):
            return self.predict_batch([image])[0]          # one image, never a list of rows
        if hasattr(image, "ndim") and image.ndim != 4:
            raise UserError(f"a single image must be (H, W, 3) or (H, W) (a batch: (B, H, W, 3)"
                            f" or a list); got shape {tuple(image.shape)}")
        return self.predict_batch(list(image))

    __call__ = predict

    def predict_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        """Predictions of images of any sizes (arrays or paths), ``batch`` at a time through
        the SFM."""
        images = [_check_image(im) for im in images]
        out: list[Prediction] = []
        for s in range(0, len(images), self.batch):
            chunk = images[s:s + self.batch]
            out += self._decode(self._features(chunk), [im.shape[:2] for im in chunk])
        return out

    def predict_dataset(self, data, n: int | None = None) -> list[tuple[int, Prediction]]:
        """(image id, ``Prediction``) for the first ``n`` (default all) images of a split (an
        ``open_dataset`` result, whose class list must be this predictor's): a COCO split's
        own image ids, a scene task's index + 1. A predicted class index ``c`` is the COCO
        category id ``data.category_ids[c]``."""
        if list(data.class_names) != self.class_names and not self.agnostic:
            raise UserError("predict_dataset: the split's classes differ from this predictor's")
        count = len(data) if n is None else min(n, len(data))
        ids = [data.image_id(i) if hasattr(data, "image_id") else i + 1 for i in range(count)]
        out: list[tuple[int, Prediction]] = []
        for s in range(0, count, self.batch):
            chunk = range(s, min(count, s + self.batch))
            out += zip([ids[i] for i in chunk],
                       self.predict_batch([data[i].image for i in chunk]))
        return out

    # -- internals --------------------------------------------------------------------------
    @torch.no_grad()
    def _features(self, images: list[np.ndarray]) -> Features:
        if self.cache is not None:
            return self.cache.get(self.sfm, images)
        return encode_images(self.sfm, images, self.device)

    @torch.no_grad()
    def _decode(self, feats: Features, sizes: list[tuple[int, int]]) -> list[Prediction]:
        out = self.sfm.decode(feats, self.spatial, self.semantic)  # under its own precision
        preds = postprocess(out, sizes, geometry_of(self.sfm),
                            [True] if self.agnostic else self.is_thing,
                            self.object_mask_threshold)
        if self.agnostic:
            return [with_background(p) for p in preds]
        if self.things_only:   # no stuff class to fill the background with: "nothing"
            preds = [replace(p, semantic=torch.where(p.panoptic == 0, NOTHING, p.semantic))
                     for p in preds]
        return preds


def _decoder_of(sfm: PromptableSFM, prompts: LearnedPrompts) -> PromptableSFM:
    """``sfm`` as the method that saved ``prompts`` decodes (``methods.base.adapted_sfm``):
    itself for prompt-only methods (every SSPrompt kind), else with the method's state (e.g. an
    adapted decoder) rebuilt from the file."""
    from .methods import METHODS
    from .methods.options import KINDS

    kind = (prompts.meta or {}).get("kind")
    if kind is None or kind in KINDS or kind not in METHODS:
        return sfm
    from .methods.base import adapted_sfm, load_state

    return adapted_sfm(sfm, load_state(sfm, prompts))


def _check_image(image) -> np.ndarray:
    """uint8 (H, W, 3) from an array or a path, by the one reader's rule (``data.images``)."""
    from .data.images import read_image, to_rgb8

    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    return to_rgb8(image, "image")
