"""Evaluate a frozen SFM with given prompts on a split: mIoU, AP50 and PQ.

Decoder -> ``postprocess`` (the one post-processing stage) -> ``SegmentationEvaluator`` (which
only compares predictions with the ground truth). Several prompt sets are scored in one decoder
pass per image batch (``evaluate_many``), as training does for the seeds of a cell.

Class-agnostic SFMs (no semantic prompt: SAM, or any SFM without a text encoder) are scored on
a 2-class problem, {object, background}; see ``object_vs_background`` for the ground truth and
``postprocess.with_background`` for the prediction.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor

from .data.scenes import VOID
from .distributed import rank_world
from .features import FeatureCache
from .metrics import SegmentationEvaluator
from .postprocess import MASK2FORMER_OBJECT_THRESHOLD, postprocess, with_background
from .sfm.base import Features, Outputs, PromptableSFM, autocast

EVAL_BATCH = 50  # images per decoder pass (the CLI's --eval-batch)
AGNOSTIC_NAMES, AGNOSTIC_IS_THING = ["object", "background"], [True, False]


@torch.no_grad()
def evaluate(sfm: PromptableSFM, spatial: Tensor, semantic: Tensor | None, dataset,
             cache: FeatureCache | None = None, batch: int = EVAL_BATCH,
             indices: list[int] | None = None, evaluator: SegmentationEvaluator | None = None,
             object_mask_threshold: float | None = None) -> dict:
    """Metrics (percent) of ``sfm`` prompted with ``spatial`` / ``semantic`` on ``dataset``.
    ``indices`` restricts to a shard of the dataset (distributed evaluation); ``batch`` images
    go through the decoder at once; ``object_mask_threshold`` overrides the SFM's own panoptic
    cut (``sfm.object_mask_threshold``, else Mask2Former's 0.8)."""
    return evaluate_many(sfm, [(spatial, semantic)], dataset, cache, batch, indices,
                         None if evaluator is None else [evaluator], object_mask_threshold)[0]


@torch.no_grad()
def evaluate_many(sfm: PromptableSFM, prompt_list: list[tuple[Tensor, Tensor | None]], dataset,
                  cache: FeatureCache | None = None, batch: int = EVAL_BATCH,
                  indices: list[int] | None = None,
                  evaluators: list[SegmentationEvaluator] | None = None,
                  object_mask_threshold: float | None = None,
                  per_image: bool = False) -> list[dict]:
    """``evaluate`` for several prompt sets (spatial (N, D), semantic (C, D) or None; the same
    N and C, all with or all without semantic prompts), decoded together: every batch of
    ``batch`` images goes through the decoder once, repeated for each prompt set on the batch
    dimension (so a pass holds ``batch x len(prompt_list)`` samples). One metrics dict per
    prompt set, in order; each equals ``evaluate`` of that set alone (a test checks it).
    ``per_image``: each dict also holds "per_image", the statistics of a paired bootstrap over
    the images (``ssprompt.bootstrap.PerImage``)."""
    if not prompt_list:
        return []
    agnostic = prompt_list[0][1] is None
    if any((se is None) != agnostic for _, se in prompt_list):
        raise ValueError("evaluate_many: mix of prompt sets with and without semantic prompts")
    cache = cache if cache is not None else FeatureCache()
    names = AGNOSTIC_NAMES if agnostic else dataset.class_names
    is_thing = AGNOSTIC_IS_THING if agnostic else dataset.is_thing
    threshold = object_mask_threshold if object_mask_threshold is not None else \
        getattr(sfm, "object_mask_threshold", MASK2FORMER_OBJECT_THRESHOLD)
    evs = evaluators or [SegmentationEvaluator(names, is_thing, sync=rank_world()[1] > 1,
                                               per_image=per_image) for _ in prompt_list]
    indices = list(range(len(dataset))) if indices is None else indices
    for s in range(0, len(indices), batch):
        scenes = [dataset[i] for i in indices[s:s + batch]]
        if agnostic:
            scenes = [object_vs_background(sc) for sc in scenes]
        sizes = [tuple(sc.semantic.shape) for sc in scenes]
        feats = cache.get(sfm, [sc.image for sc in scenes])
        for ev, out in zip(evs, _decode_sets(sfm, feats, prompt_list)):
            preds = postprocess(out, sizes, sfm.image_size, [True] if agnostic else is_thing,
                                threshold)
            if agnostic:
                preds = [with_background(p) for p in preds]
            ev.update(preds, scenes)
    return [ev.compute() for ev in evs]


def _decode_sets(sfm: PromptableSFM, feats: Features,
                 prompt_list: list[tuple[Tensor, Tensor | None]]) -> list[Outputs]:
    """One decoder pass over ``feats`` for every prompt set: images repeated once per set,
    prompts expanded per image (each sample is decoded independently). Outputs per set."""
    b, k = len(feats), len(prompt_list)
    with autocast(next(iter(feats.tensors.values())).device):
        if k == 1:
            return [sfm.decode(feats, *prompt_list[0])]
        spatial = torch.cat([sp.expand(b, -1, -1) for sp, _ in prompt_list])
        semantic = None if prompt_list[0][1] is None else \
            torch.cat([se.expand(b, -1, -1) for _, se in prompt_list])
        out = sfm.decode(Features.cat([feats] * k), spatial, semantic)
    return [Outputs(out.mask_logits[j * b:(j + 1) * b], out.class_logits[j * b:(j + 1) * b])
            for j in range(k)]


# ------------------------------------------------------------------------- class-agnostic
def object_vs_background(scene):
    """Ground truth of the class-agnostic 2-class problem: every thing segment becomes class 0
    ("object", a thing class; crowd flags kept), all stuff pixels one segment of class 1
    ("background", a stuff class); void stays void. Scored by mIoU over both classes, AP50 over
    the object class and PQ over both (PQ_th: objects, PQ_st: background)."""
    s = copy.copy(scene)
    thing_ids = [seg["id"] for seg in scene.segments if seg["isthing"]]
    stuff_ids = [seg["id"] for seg in scene.segments if not seg["isthing"]]
    thing, stuff = np.isin(scene.instance, thing_ids), np.isin(scene.instance, stuff_ids)
    s.semantic = np.select([thing, stuff], [0, 1], VOID).astype(np.int32)
    s.segments = [dict(seg, category=0) for seg in scene.segments if seg["isthing"]]
    s.instance = np.where(thing, scene.instance, 0).astype(np.int32)
    if stuff.any():
        bg = int(max(seg["id"] for seg in scene.segments)) + 1
        s.instance[stuff] = bg
        s.segments.append({"id": bg, "category": 1, "isthing": False, "iscrowd": 0,
                           "area": int(stuff.sum())})
    return s


def class_agnostic(scene):
    """Training targets of a class-agnostic SFM: every thing segment becomes class 0
    ("object"); stuff becomes void (its queries learn "no object" there)."""
    s = copy.copy(scene)
    thing_ids = [seg["id"] for seg in scene.segments if seg["isthing"]]
    keep = np.isin(scene.instance, thing_ids)
    s.semantic = np.where(keep, 0, VOID).astype(np.int32)
    s.instance = np.where(keep, scene.instance, 0).astype(np.int32)
    s.segments = [dict(seg, category=0) for seg in scene.segments if seg["isthing"]]
    return s
