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

import torch
from torch import Tensor

from ..data.views import AGNOSTIC_IS_THING, AGNOSTIC_NAMES, object_vs_background
from ..distributed import rank_world
from ..geometry import geometry_of
from ..sfm.base import Features, Outputs, PromptableSFM, autocast
from ..sfm.features import FeatureCache
from .metrics import SegmentationEvaluator
from .postprocess import postprocess, with_background

EVAL_BATCH = 50  # samples (image x prompt set) per decoder pass (the CLI's --eval-batch)


@torch.no_grad()
def evaluate(sfm: PromptableSFM, spatial: Tensor, semantic: Tensor | None, dataset,
             cache: FeatureCache | None = None, batch: int = EVAL_BATCH,
             indices: list[int] | None = None, evaluator: SegmentationEvaluator | None = None,
             object_mask_threshold: float | None = None) -> dict:
    """Metrics (percent) of ``sfm`` prompted with ``spatial`` / ``semantic`` on ``dataset``.
    ``indices`` restricts to a shard of the dataset (distributed evaluation); ``batch`` samples
    (images x prompt sets) go through the decoder at once; ``object_mask_threshold`` overrides the SFM's own panoptic
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
    ``batch // len(prompt_list)`` images (at least 1) goes through the decoder once, repeated for
    each prompt set on the batch dimension, so a pass holds about ``batch`` samples whatever the
    number of sets (passes of ~50-80 samples are the fastest on a CPU; the decoder's outputs do
    not depend on the pass size, so neither do the metrics). One metrics dict per
    prompt set, in order; each equals ``evaluate`` of that set alone (a test checks it).
    ``per_image``: each dict also holds "per_image", the statistics of a paired bootstrap over
    the images (``ssprompt.evaluation.records.PerImage``). Identical prompt sets (e.g. the seeds
    whose selection kept the default embeddings) are decoded and scored once; without
    ``evaluators`` their results are copies of one evaluation."""
    if not prompt_list:
        return []
    if evaluators is None:
        unique, where = _unique_sets(prompt_list)
        if len(unique) < len(prompt_list):
            done = evaluate_many(sfm, unique, dataset, cache, batch, indices, None,
                                 object_mask_threshold, per_image)
            return [copy.deepcopy(done[i]) for i in where]
    agnostic = prompt_list[0][1] is None
    if any((se is None) != agnostic for _, se in prompt_list):
        raise ValueError("evaluate_many: mix of prompt sets with and without semantic prompts")
    cache = cache if cache is not None else FeatureCache()
    names = AGNOSTIC_NAMES if agnostic else dataset.class_names
    is_thing = AGNOSTIC_IS_THING if agnostic else dataset.is_thing
    threshold = object_mask_threshold if object_mask_threshold is not None else \
        sfm.object_mask_threshold
    evs = evaluators or [SegmentationEvaluator(names, is_thing, sync=rank_world()[1] > 1,
                                               per_image=per_image) for _ in prompt_list]
    indices = list(range(len(dataset))) if indices is None else indices
    per_pass = max(1, batch // len(prompt_list))
    for s in range(0, len(indices), per_pass):
        scenes = [dataset[i] for i in indices[s:s + per_pass]]
        if agnostic:
            scenes = [object_vs_background(sc) for sc in scenes]
        sizes = [tuple(sc.semantic.shape) for sc in scenes]
        feats = cache.get(sfm, [sc.image for sc in scenes])
        for ev, out in zip(evs, _decode_sets(sfm, feats, prompt_list)):
            preds = postprocess(out, sizes, geometry_of(sfm), [True] if agnostic else is_thing,
                                threshold)
            if agnostic:
                preds = [with_background(p) for p in preds]
            ev.update(preds, scenes)
    return [ev.compute() for ev in evs]


def _unique_sets(prompt_list: list[tuple[Tensor, Tensor | None]]):
    """(the distinct prompt sets in first-seen order, each input's position among them);
    sets are the same when their tensors are equal bit for bit."""
    unique, where, seen = [], [], {}
    for sp, se in prompt_list:
        key = (sp.detach().cpu().numpy().tobytes(), tuple(sp.shape),
               None if se is None else (se.detach().cpu().numpy().tobytes(), tuple(se.shape)))
        if key not in seen:
            seen[key] = len(unique)
            unique.append((sp, se))
        where.append(seen[key])
    return unique, where


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
    return [out.images(j * b, (j + 1) * b) for j in range(k)]
