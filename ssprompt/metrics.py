"""Segmentation metrics as ``torchmetrics.Metric`` subclasses; every result is in percent.

- ``MeanIoU``: torchmetrics' ``MulticlassConfusionMatrix`` (its ``confmat`` state, ignore index
  and sync), reduced as detectron2's ``SemSegEvaluator`` does: a class's IoU is defined only when
  the class has ground-truth pixels, and mIoU is the mean over those classes. A class that is
  predicted but absent from the ground truth gets ``None`` (its false positives still lower the
  IoU of the classes whose pixels it took).
- ``InstanceAP50``: pycocotools' ``COCOeval(iouType="segm")`` on RLE masks; AP at IoU 0.50, area
  "all", 100 detections per image (``stats[1]``), and per class. Masks are kept as the bytes of
  their compressed COCO RLE in tensor states, so torchmetrics gathers them across ranks. With no
  (non-crowd) ground-truth instance at all AP50 is undefined and reported as ``None``.
- ``PanopticQuality``: COCO's PQ exactly as cocodataset/panopticapi ``pq_compute`` defines it:
  a ground-truth and a predicted segment of the same category match when IoU > 0.5, where the
  predicted segment's overlap with void ground truth is taken out of the union; ground-truth
  crowd segments are never matched and never false negatives; an unmatched predicted segment is
  no false positive when more than half of it lies on void or on a crowd region of its own
  category; PQ, SQ and RQ average over categories with TP + FP + FN > 0.

  torchmetrics' ``detection.PanopticQuality`` (1.9) is not used, because it deviates from
  panopticapi in ways that cannot be undone from outside (tests/test_metrics.py shows each):

  1. IoU: it also subtracts the part of the *ground-truth* segment predicted as void from the
     union (panopticapi subtracts only the predicted segment's overlap with ground-truth void);
  2. false negatives: an unmatched ground-truth segment mostly predicted as void is not counted
     (panopticapi counts every unmatched non-crowd ground-truth segment);
  3. crowd: it has no notion of crowd regions;
  4. stuff: it drops instance ids of stuff classes, merging all predicted (and ground-truth)
     segments of one stuff class into one.

  Where none of these applies (no void, no crowd, one segment per stuff class) both agree; a test
  checks that too. The per-category TP / FP / FN / IoU sums are ``add_state`` sum tensors.

Undefined results (nothing to average over) are ``None``.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.utilities import dim_zero_cat

from .inference import (MASK2FORMER_OBJECT_THRESHOLD, instance_inference, panoptic_inference,
                        semantic_inference, upsample)

from .data.scenes import VOID  # noqa: E402  (one name for void, defined with the labels)


def _pct(x: float | None) -> float | None:
    """Fraction -> percent; NaN / None -> None."""
    return None if x is None or math.isnan(x) else 100.0 * float(x)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _cat(state: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    """A ``cat`` list state (or its synced, already concatenated tensor) as one 1-D tensor."""
    if isinstance(state, list):
        if not state:
            return torch.zeros(0, dtype=dtype)
        state = dim_zero_cat(state)
    return state.reshape(-1).to(dtype)


# ------------------------------------------------------------------------------------ mIoU
class MeanIoU(MulticlassConfusionMatrix):
    """Mean IoU over classes with ground-truth pixels (detectron2); ``ignore_index`` pixels of the
    target are left out. ``update(pred, target)`` takes (H, W) or (B, H, W) class maps."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = VOID, **kw) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index,
                         validate_args=False, **kw)

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(pred.reshape(-1).long(), target.reshape(-1).long().to(pred.device))

    def compute(self) -> dict:  # type: ignore[override]
        """{"mIoU": percent | None, "per_class": [percent | None]}."""
        cm = self.confmat.double()        # rows: target, columns: prediction
        tp = cm.diag()
        gt = cm.sum(1)
        union = gt + cm.sum(0) - tp
        valid = gt > 0
        iou = tp / union.clamp_min(1)
        miou = float(iou[valid].mean()) if valid.any() else float("nan")
        return {"mIoU": _pct(miou),
                "per_class": [_pct(float(iou[c])) if valid[c] else None
                              for c in range(self.num_classes)]}


# ------------------------------------------------------------------------------------- AP50
class InstanceAP50(Metric):
    """COCO mask AP at IoU 0.5 of thing instances. ``update(preds, gt)``: ``preds`` from
    ``instance_inference``, ``gt`` a Scene (its thing segments, honouring ``iscrowd``)."""

    full_state_update = False
    # per image: (height, width, #gt, #dt); per gt: (category, iscrowd, #rle bytes);
    # per dt: (category, #rle bytes) and score; RLE bytes of gt and dt masks, in order.
    _IMG, _GT, _DT = 4, 3, 2

    def __init__(self, num_classes: int, max_dets: int = 100, **kw) -> None:
        super().__init__(**kw)
        self.num_classes, self.max_dets = num_classes, max_dets
        for name in ("images", "gt_meta", "dt_meta", "dt_score", "gt_rle", "dt_rle"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: list[dict], gt) -> None:
        from pycocotools import mask as mask_util

        def rle_bytes(m: np.ndarray) -> bytes:
            return mask_util.encode(np.asfortranarray(m.astype(np.uint8)))["counts"]

        h, w = gt.instance.shape
        gt_meta, gt_rle = [], []
        for seg in gt.segments:
            if not seg["isthing"]:
                continue
            b = rle_bytes(np.asarray(gt.instance) == seg["id"])
            gt_meta += [int(seg["category"]), int(seg.get("iscrowd", 0) or 0), len(b)]
            gt_rle.append(b)
        dt_meta, dt_score, dt_rle = [], [], []
        for p in preds:
            b = rle_bytes(p["mask"].detach().cpu().numpy().astype(bool))
            dt_meta += [int(p["category"]), len(b)]
            dt_score.append(float(p["score"]))
            dt_rle.append(b)
        dev = self.device

        def as_bytes(chunks: list[bytes]) -> Tensor:
            buf = bytearray(b"".join(chunks))
            if not buf:
                return torch.zeros(0, dtype=torch.uint8, device=dev)
            return torch.frombuffer(buf, dtype=torch.uint8).clone().to(dev)

        self.images.append(torch.tensor([h, w, len(gt_rle), len(dt_rle)], dtype=torch.long,
                                        device=dev))
        self.gt_meta.append(torch.tensor(gt_meta, dtype=torch.long, device=dev))
        self.dt_meta.append(torch.tensor(dt_meta, dtype=torch.long, device=dev))
        self.dt_score.append(torch.tensor(dt_score, dtype=torch.float64, device=dev))
        self.gt_rle.append(as_bytes(gt_rle))
        self.dt_rle.append(as_bytes(dt_rle))

    def _coco(self) -> tuple[list[dict], list[dict], list[dict]]:
        """Images, ground-truth and detection annotations in COCO format, from the states."""
        from pycocotools import mask as mask_util

        images = _cat(self.images, torch.long).cpu().view(-1, self._IMG).tolist()
        gt_meta = _cat(self.gt_meta, torch.long).cpu().view(-1, self._GT).tolist()
        dt_meta = _cat(self.dt_meta, torch.long).cpu().view(-1, self._DT).tolist()
        dt_score = _cat(self.dt_score, torch.float64).cpu().tolist()
        gt_rle = _cat(self.gt_rle, torch.uint8).cpu().numpy().tobytes()
        dt_rle = _cat(self.dt_rle, torch.uint8).cpu().numpy().tobytes()
        out_img, out_gt, out_dt = [], [], []
        ig = idt = og = od = 0
        for i, (h, w, n_gt, n_dt) in enumerate(images, start=1):
            out_img.append({"id": i, "height": h, "width": w})
            for cat, crowd, n in gt_meta[ig:ig + n_gt]:
                rle = {"size": [h, w], "counts": gt_rle[og:og + n]}
                og += n
                out_gt.append({"id": len(out_gt) + 1, "image_id": i, "category_id": cat + 1,
                               "segmentation": rle, "area": float(mask_util.area(rle)),
                               "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": crowd})
            for (cat, n), score in zip(dt_meta[idt:idt + n_dt], dt_score[idt:idt + n_dt]):
                out_dt.append({"image_id": i, "category_id": cat + 1, "score": score,
                               "segmentation": {"size": [h, w], "counts": dt_rle[od:od + n]}})
                od += n
            ig, idt = ig + n_gt, idt + n_dt
        return out_img, out_gt, out_dt

    def compute(self) -> dict:
        """{"AP50": percent | None, "per_class": [percent | None]} (None: no GT instance)."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images, gts, dts = self._coco()
        has_gt = [any(g["category_id"] == c + 1 and not g["iscrowd"] for g in gts)
                  for c in range(self.num_classes)]
        if not any(has_gt):
            return {"AP50": None, "per_class": [None] * self.num_classes}
        if not dts:
            return {"AP50": 0.0, "per_class": [0.0 if h else None for h in has_gt]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            # "info" too: pycocotools 2.0.10's loadRes copies it and fails without it
            coco_gt.dataset = {"info": {"description": "ssprompt"}, "images": images,
                               "annotations": gts,
                               "categories": [{"id": c + 1, "name": str(c)}
                                              for c in range(self.num_classes)]}
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(dts)
            ev = COCOeval(coco_gt, coco_dt, iouType="segm")
            ev.params.maxDets = [1, 10, self.max_dets]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # precision: [IoU thr, recall thr, category, area range, max dets]
        prec = ev.eval["precision"][0, :, :, 0, -1]
        per_class: list[float | None] = [None] * self.num_classes
        for k, cat in enumerate(ev.params.catIds):
            col = prec[:, k]
            col = col[col > -1]
            per_class[cat - 1] = _pct(float(col.mean())) if col.size else None
        ap50 = float(ev.stats[1])
        return {"AP50": _pct(ap50) if ap50 >= 0 else None, "per_class": per_class}


# --------------------------------------------------------------------------------------- PQ
class PanopticQuality(Metric):
    """COCO panoptic quality (panopticapi ``pq_compute``). ``update(pred_seg, pred_segments,
    gt)``: a map of predicted segment ids (0 = void), its segments {"id", "category", ...},
    and a Scene whose ``instance`` map (0 = void) and ``segments`` are the ground truth."""

    full_state_update = False

    def __init__(self, is_thing: list[bool], **kw) -> None:
        super().__init__(**kw)
        self.is_thing = [bool(t) for t in is_thing]
        c = len(self.is_thing)
        for name in ("tp", "fp", "fn", "iou"):
            self.add_state(name, default=torch.zeros(c, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, pred_seg: Tensor, pred_segments: list[dict], gt) -> None:
        gt_map = torch.as_tensor(np.asarray(gt.instance, dtype=np.int64)).flatten()
        pred_map = torch.as_tensor(pred_seg).detach().cpu().long().flatten()
        offset = int(pred_map.max()) + 1 if pred_map.numel() else 1
        pairs, counts = torch.unique(gt_map * offset + pred_map, return_counts=True)
        inter = {(int(p) // offset, int(p) % offset): int(n)
                 for p, n in zip(pairs.tolist(), counts.tolist())}
        gt_area: dict[int, int] = {}
        pred_area: dict[int, int] = {}
        for (g, p), n in inter.items():
            gt_area[g] = gt_area.get(g, 0) + n
            pred_area[p] = pred_area.get(p, 0) + n
        # segments are as large as the maps say (panopticapi); listed but absent ones drop out
        gt_segs = {s["id"]: s for s in gt.segments if gt_area.get(s["id"], 0) > 0}
        pred_segs = {s["id"]: s for s in pred_segments if pred_area.get(s["id"], 0) > 0}
        tp, fp, fn, iou_sum = (torch.zeros_like(self.tp, device="cpu") for _ in range(4))

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
                tp[gs["category"]] += 1
                iou_sum[gs["category"]] += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd: dict[int, int] = {}   # category -> its crowd segment id
        for g, gs in gt_segs.items():
            if g in gt_matched:
                continue
            if gs.get("iscrowd", 0):
                crowd[gs["category"]] = g
                continue
            fn[gs["category"]] += 1
        for p, ps in pred_segs.items():
            if p in pred_matched:
                continue
            ignored = inter.get((0, p), 0)
            if ps["category"] in crowd:
                ignored += inter.get((crowd[ps["category"]], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            fp[ps["category"]] += 1

        dev = self.tp.device
        self.tp += tp.to(dev)
        self.fp += fp.to(dev)
        self.fn += fn.to(dev)
        self.iou += iou_sum.to(dev)

    def compute(self) -> dict:
        """{"PQ","SQ","RQ","PQ_th","PQ_st": percent | None, "per_class": [PQ percent | None]}."""
        tp, fp, fn, iou = (x.double().cpu() for x in (self.tp, self.fp, self.fn, self.iou))
        counted = (tp + fp + fn) > 0
        sq = torch.where(tp > 0, iou / tp.clamp_min(1), torch.zeros_like(iou))
        rq = torch.where(counted, tp / (tp + 0.5 * fp + 0.5 * fn).clamp_min(1e-12),
                         torch.zeros_like(iou))
        pq = sq * rq
        thing = torch.tensor(self.is_thing, dtype=torch.bool)

        def avg(x: Tensor, sel: Tensor) -> float | None:
            s = counted & sel
            return _pct(float(x[s].mean())) if s.any() else None

        every = torch.ones_like(thing)
        return {"PQ": avg(pq, every), "SQ": avg(sq, every), "RQ": avg(rq, every),
                "PQ_th": avg(pq, thing), "PQ_st": avg(pq, ~thing),
                "per_class": [_pct(float(pq[c])) if counted[c] else None
                              for c in range(len(self.is_thing))]}


# -------------------------------------------------------------------------------- evaluator
class SegmentationEvaluator:
    """mIoU, AP50 and PQ of a model's outputs on ground-truth scenes (percent, 2 decimals)."""

    def __init__(self, class_names: list[str], is_thing: list[bool], sync: bool = True,
                 object_mask_threshold: float = MASK2FORMER_OBJECT_THRESHOLD) -> None:
        """``sync=False``: never gather states across ranks (each rank scores on its own, as
        in a study whose ranks run different cells). ``object_mask_threshold``: panoptic
        post-processing's class-confidence cut (Mask2Former's 0.8 unless the SFM says)."""
        if len(class_names) != len(is_thing):
            raise ValueError("class_names and is_thing differ in length")
        self.class_names, self.is_thing = list(class_names), [bool(t) for t in is_thing]
        self.object_mask_threshold = float(object_mask_threshold)
        kw = {} if sync else {"sync_on_compute": False}
        self.miou = MeanIoU(len(self.class_names), **kw)
        self.ap = InstanceAP50(len(self.class_names), **kw)
        self.pq = PanopticQuality(self.is_thing, **kw)

    def update(self, outputs, scenes: list) -> None:
        """``outputs``: an ``Outputs`` batch aligned with ``scenes``; logits are upsampled to
        each scene's size before post-processing."""
        masks = outputs.mask_logits.detach()
        classes = outputs.class_logits.detach()
        for i, scene in enumerate(scenes):
            h, w = scene.semantic.shape
            m = upsample(masks[i:i + 1].float(), (h, w))[0]
            c = classes[i].float()
            target = torch.as_tensor(np.asarray(scene.semantic, dtype=np.int64))
            self.miou.update(semantic_inference(m, c).cpu(), target)
            self.ap.update(instance_inference(m, c, self.is_thing), scene)
            seg, segs = panoptic_inference(m, c, self.is_thing, self.object_mask_threshold)
            self.pq.update(seg, segs, scene)

    def compute(self) -> dict:
        miou, ap, pq = self.miou.compute(), self.ap.compute(), self.pq.compute()
        per_class = {name: {"IoU": _round(miou["per_class"][c]),
                            "AP50": _round(ap["per_class"][c]),
                            "PQ": _round(pq["per_class"][c]), "isthing": self.is_thing[c]}
                     for c, name in enumerate(self.class_names)}
        out = {"mIoU": _round(miou["mIoU"]), "AP50": _round(ap["AP50"])}
        out.update({k: _round(pq[k]) for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")})
        out["per_class"] = per_class
        return out

    def reset(self) -> None:
        for m in (self.miou, self.ap, self.pq):
            m.reset()
