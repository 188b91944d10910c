"""Segmentation metrics with torchmetrics' update / compute shape; results in percent.

- ``MeanIoU``: torchmetrics' multiclass confusion matrix; the mean runs over classes with
  ground-truth or predicted pixels, as detectron2's SemSegEvaluator does (a class predicted but
  absent from the ground truth counts with IoU 0; a class in neither is left out).
- ``InstanceAP50``: pycocotools' COCOeval (iouType "segm", RLE masks), AP at IoU 0.50, area
  "all", 100 detections per image: COCO's own AP50.
- ``PanopticQuality``: COCO's PQ exactly as cocodataset/panopticapi ``pq_compute`` defines it:
  matches need IoU > 0.5 between a ground-truth and a predicted segment of the same category,
  where the predicted segment's overlap with void ground truth is taken out of the union;
  ground-truth crowd segments are never matched and never false negatives; an unmatched
  predicted segment is no false positive when more than half of it lies on void or on a crowd
  region of its own category; PQ averages over categories with TP + FP + FN > 0.
  torchmetrics' ``PanopticQuality`` is not used: it needs the predicted void as a category
  pair of its own and (1.9) does not model crowd regions; the test suite checks that ours
  agrees with it where it applies (no crowd, no void) and with panopticapi's rules where it
  does not.

Tensor states sync themselves across torch.distributed ranks (torchmetrics); the COCO
detections of ``InstanceAP50`` are gathered with ``all_gather_object`` in ``compute``.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from .inference import instance_inference, panoptic_inference, semantic_inference, upsample

VOID = 255


def _pct(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(100 * x, 2)


class MeanIoU(Metric):
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = VOID, **kw):
        super().__init__(**kw)
        self.num_classes = num_classes
        self.confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index,
                                                 validate_args=False)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.confmat.update(pred.flatten().long(), target.flatten().long())

    def compute(self) -> dict:
        cm = self.confmat.compute().double()   # rows: target, cols: prediction (synced)
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        iou = inter / union.clamp_min(1)
        valid = union > 0
        miou = float(iou[valid].mean()) if valid.any() else float("nan")
        return {"mIoU": _pct(miou),
                "per_class": [_pct(float(iou[c])) if valid[c] else None
                              for c in range(self.num_classes)]}

    def reset(self) -> None:
        super().reset()
        self.confmat.reset()


class InstanceAP50(Metric):
    full_state_update = False

    def __init__(self, num_classes: int, **kw):
        super().__init__(**kw)
        self.num_classes = num_classes
        self.add_state("n_images", torch.tensor(0), dist_reduce_fx="sum")
        self._gt: list[dict] = []
        self._dt: list[dict] = []
        self._images: list[dict] = []

    def update(self, preds: list[dict], gt) -> None:
        """``preds`` from ``instance_inference``; ``gt`` a Scene (thing segments count)."""
        from pycocotools import mask as mask_util

        img_id = len(self._images) + 1 + 10_000_000 * _rank()
        h, w = gt.instance.shape
        self._images.append({"id": img_id, "height": h, "width": w})
        for seg in gt.segments:
            if not seg["isthing"]:
                continue
            m = np.asfortranarray((gt.instance == seg["id"]).astype(np.uint8))
            rle = mask_util.encode(m)
            self._gt.append({"image_id": img_id, "category_id": int(seg["category"]) + 1,
                             "segmentation": rle, "area": float(mask_util.area(rle)),
                             "bbox": mask_util.toBbox(rle).tolist(),
                             "iscrowd": int(seg.get("iscrowd", 0))})
        for p in preds:
            m = np.asfortranarray(p["mask"].cpu().numpy().astype(np.uint8))
            self._dt.append({"image_id": img_id, "category_id": int(p["category"]) + 1,
                             "segmentation": mask_util.encode(m), "score": float(p["score"])})
        self.n_images += 1

    def compute(self) -> dict:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images, gts, dts = self._images, self._gt, self._dt
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (images, gts, dts))
            images = [x for g in gathered for x in g[0]]
            gts = [x for g in gathered for x in g[1]]
            dts = [x for g in gathered for x in g[2]]
        per_class: list[float | None] = [None] * self.num_classes
        if not any(g["iscrowd"] == 0 for g in gts):
            return {"AP50": None, "per_class": per_class}
        gt_json = {"images": images, "categories": [{"id": c + 1, "name": str(c)}
                                                    for c in range(self.num_classes)],
                   "annotations": [{**g, "id": i + 1} for i, g in enumerate(gts)]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt_json
            coco_gt.createIndex()
            if not dts:
                return {"AP50": 0.0, "per_class": [0.0 if any(
                    g["category_id"] == c + 1 and not g["iscrowd"] for g in gts) else None
                    for c in range(self.num_classes)]}
            coco_dt = coco_gt.loadRes([dict(d) for d in dts])
            ev = COCOeval(coco_gt, coco_dt, iouType="segm")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        ap50 = float(ev.stats[1])
        prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, classes, area all
        for k, cat in enumerate(ev.params.catIds):
            col = prec[:, k]
            col = col[col > -1]
            per_class[cat - 1] = _pct(float(col.mean())) if col.size else None
        return {"AP50": _pct(ap50) if ap50 >= 0 else None, "per_class": per_class}

    def reset(self) -> None:
        super().reset()
        self._gt, self._dt, self._images = [], [], []


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class PanopticQuality(Metric):
    full_state_update = False

    def __init__(self, is_thing: list[bool], **kw):
        super().__init__(**kw)
        self.is_thing = list(is_thing)
        c = len(is_thing)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_seg: Tensor, pred_segments: list[dict], gt) -> None:
        """Prediction: map of segment ids (0 = void) and its segments; ``gt`` a Scene."""
        gt_map = torch.as_tensor(np.asarray(gt.instance, dtype=np.int64))
        pred_map = pred_seg.cpu().long()
        offset = int(max(pred_map.max().item(), 0)) + 1
        pairs, counts = torch.unique(gt_map.flatten() * offset + pred_map.flatten(),
                                     return_counts=True)
        inter = {(int(p) // offset, int(p) % offset): int(n) for p, n in zip(pairs, counts)}
        gt_segs = {s["id"]: s for s in gt.segments}
        pred_segs = {s["id"]: s for s in pred_segments}
        pred_area = {sid: int((pred_map == sid).sum()) for sid in pred_segs}
        gt_area = {sid: int((gt_map == sid).sum()) for sid in gt_segs}
        gt_matched, pred_matched = set(), set()
        for (g, p), n in inter.items():
            if g not in gt_segs or p not in pred_segs:
                continue
            gs, ps = gt_segs[g], pred_segs[p]
            if gs.get("iscrowd", 0) or gs["category"] != ps["category"]:
                continue
            union = pred_area[p] + gt_area[g] - n - inter.get((0, p), 0)
            iou = n / union
            if iou > 0.5:
                self.tp[gs["category"]] += 1
                self.iou[gs["category"]] += iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd: dict[int, int] = {}
        for g, gs in gt_segs.items():
            if g in gt_matched:
                continue
            if gs.get("iscrowd", 0):
                crowd[gs["category"]] = g
                continue
            self.fn[gs["category"]] += 1
        for p, ps in pred_segs.items():
            if p in pred_matched or pred_area[p] == 0:
                continue
            ignored = inter.get((0, p), 0)
            if ps["category"] in crowd:
                ignored += inter.get((crowd[ps["category"]], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self.fp[ps["category"]] += 1

    def compute(self) -> dict:
        tp, fp, fn, iou = self.tp, self.fp, self.fn, self.iou
        denom = tp + 0.5 * fp + 0.5 * fn
        counted = (tp + fp + fn) > 0
        pq = torch.where(counted, iou / denom.clamp_min(1e-12), torch.zeros_like(iou))
        sq = torch.where(tp > 0, iou / tp.clamp_min(1), torch.zeros_like(iou))
        rq = torch.where(counted, tp / denom.clamp_min(1e-12), torch.zeros_like(iou))
        thing = torch.tensor(self.is_thing, dtype=torch.bool)

        def avg(x: Tensor, sel: Tensor) -> float | None:
            s = counted & sel
            return _pct(float(x[s].mean())) if s.any() else None

        everything = torch.ones_like(thing)
        return {"PQ": avg(pq, everything), "SQ": avg(sq, everything), "RQ": avg(rq, everything),
                "PQ_th": avg(pq, thing), "PQ_st": avg(pq, ~thing),
                "per_class": [_pct(float(pq[c])) if counted[c] else None
                              for c in range(len(self.is_thing))]}


class SegmentationEvaluator:
    """mIoU, AP50 and PQ of a model's outputs on ground-truth scenes."""

    def __init__(self, class_names: list[str], is_thing: list[bool]):
        self.class_names, self.is_thing = list(class_names), list(is_thing)
        self.miou = MeanIoU(len(class_names))
        self.ap = InstanceAP50(len(class_names))
        self.pq = PanopticQuality(is_thing)

    def update(self, outputs, scenes: list) -> None:
        masks = outputs.mask_logits.detach()
        classes = outputs.class_logits.detach()
        for i, scene in enumerate(scenes):
            h, w = scene.semantic.shape
            m = upsample(masks[i:i + 1].float(), (h, w))[0]
            c = classes[i].float()
            target = torch.as_tensor(np.asarray(scene.semantic, dtype=np.int64))
            self.miou.update(semantic_inference(m, c).cpu(), target)
            self.ap.update(instance_inference(m, c, self.is_thing), scene)
            seg, segs = panoptic_inference(m, c, self.is_thing)
            self.pq.update(seg, segs, scene)

    def compute(self) -> dict:
        miou, ap, pq = self.miou.compute(), self.ap.compute(), self.pq.compute()
        per_class = {name: {"IoU": miou["per_class"][c], "AP50": ap["per_class"][c],
                            "PQ": pq["per_class"][c], "isthing": self.is_thing[c]}
                     for c, name in enumerate(self.class_names)}
        return {"mIoU": miou["mIoU"], "AP50": ap["AP50"], "PQ": pq["PQ"], "SQ": pq["SQ"],
                "RQ": pq["RQ"], "PQ_th": pq["PQ_th"], "PQ_st": pq["PQ_st"],
                "per_class": per_class}

    def reset(self) -> None:
        for m in (self.miou, self.ap, self.pq):
            m.reset()
