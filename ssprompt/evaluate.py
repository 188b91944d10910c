"""Evaluate a frozen SFM with given prompts on a split: mIoU, AP50 and PQ."""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import rank_world
from .features import FeatureCache
from .inference import MASK2FORMER_OBJECT_THRESHOLD
from .metrics import SegmentationEvaluator
from .sfm.base import PromptableSFM, autocast


@torch.no_grad()
def evaluate(sfm: PromptableSFM, spatial: Tensor, semantic: Tensor | None, dataset,
             cache: FeatureCache | None = None, batch: int = 50,
             indices: list[int] | None = None, evaluator: SegmentationEvaluator | None = None
             ) -> dict:
    """Metrics (percent) of ``sfm`` prompted with ``spatial`` / ``semantic`` on ``dataset``.
    ``indices`` restricts to a shard of the dataset (distributed evaluation)."""
    cache = cache if cache is not None else FeatureCache()
    names = dataset.class_names if semantic is not None else ["object"]
    is_thing = dataset.is_thing if semantic is not None else [True]
    ev = evaluator or SegmentationEvaluator(
        names, is_thing, sync=rank_world()[1] > 1,
        object_mask_threshold=getattr(sfm, "object_mask_threshold", MASK2FORMER_OBJECT_THRESHOLD))
    indices = list(range(len(dataset))) if indices is None else indices
    for s in range(0, len(indices), batch):
        scenes = [dataset[i] for i in indices[s:s + batch]]
        feats = cache.get(sfm, [sc.image for sc in scenes])
        with autocast(next(iter(feats.tensors.values())).device):
            out = sfm.decode(feats, spatial, semantic)
        if semantic is None:
            scenes = [class_agnostic(sc) for sc in scenes]
        ev.update(out, scenes)
    return ev.compute()


def class_agnostic(scene):
    """Every thing segment becomes class 0 ("object"); stuff becomes void."""
    import copy

    import numpy as np

    from .data.scenes import VOID

    s = copy.copy(scene)
    thing_ids = [seg["id"] for seg in scene.segments if seg["isthing"]]
    keep = np.isin(scene.instance, thing_ids)
    s.semantic = np.where(keep, 0, VOID).astype(np.int32)
    s.instance = np.where(keep, scene.instance, 0).astype(np.int32)
    s.segments = [dict(seg, category=0) for seg in scene.segments if seg["isthing"]]
    return s
