"""Evaluate a frozen SFM with given prompts on a split: mIoU, AP50 and PQ.

Decoder -> ``postprocess`` (the one post-processing stage) -> ``SegmentationEvaluator`` (which
only compares predictions with the ground truth). Several prompt sets are scored in one decoder
pass per image batch (``evaluate_many``), as training does for the seeds of a cell.

Class-agnostic SFMs (no semantic prompt: SAM, or any SFM without a text encoder) are scored on
a 2-class problem, {object, background}; see ``object_vs_background`` for the ground truth and
``postprocess.with_background`` for the prediction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.views import AGNOSTIC_IS_THING, AGNOSTIC_NAMES, object_vs_background
from ..distributed import rank_world
from ..sfm.base import Features, Outputs, PromptableSFM, autocast
from ..sfm.features import FeatureCache
from .metrics import SegmentationEvaluator
from .postprocess import postprocess, with_background

EVAL_BATCH = 50  # images per decoder pass (the CLI's --eval-batch)


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
    the images (``ssprompt.evaluation.records.PerImage``)."""
    if not prompt_list:
        return []
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
