"""Segment images with a frozen SFM and (learned or default) prompts: the Python API.

    from ssprompt import Predictor, load_prompts, load_sfm

    sfm = load_sfm()                                   # the packaged embedded SFM
    predictor = Predictor(sfm, load_prompts("runs/novel/prompts.safetensors"))
    pred = predictor.predict(image)                    # uint8 (H, W, 3), any size
    pred.semantic        # (H, W) class index per pixel
    pred.instances       # scored thing masks (K, H, W), categories, scores
    pred.panoptic, pred.segments                       # segment ids (H, W) + their classes
    predictor.class_names

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
    def set_image(self, image: np.ndarray) -> None:
        """Run the image encoder on one uint8 (H, W, 3) image and keep its features."""
        image = _check_image(image)
        self._image = (self._features([image]), image.shape[:2])

    def predict(self, image: np.ndarray | list[np.ndarray] | None = None
                ) -> Prediction | list[Prediction]:
        """One image (uint8 (H, W, 3)) -> a ``Prediction``; a list of images (or a (B, H, W, 3)
        array) -> a list of them; no argument -> the image given to ``set_image``."""
        if image is None:
            if self._image is None:
                raise UserError("predict(): call set_image(image) first, or pass an image")
            feats, hw = self._image
            return self._decode(feats, [hw])[0]
        if isinstance(image, np.ndarray) and image.ndim == 3:
            return self.predict_batch([image])[0]
        return self.predict_batch(list(image))

    __call__ = predict

    def predict_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        """Predictions of images of any sizes, ``batch`` at a time through the SFM."""
        images = [_check_image(im) for im in images]
        out: list[Prediction] = []
        for s in range(0, len(images), self.batch):
            chunk = images[s:s + self.batch]
            out += self._decode(self._features(chunk), [im.shape[:2] for im in chunk])
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


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise UserError(f"an image must be uint8 (H, W, 3); got {image.dtype} {image.shape}")
    return image
