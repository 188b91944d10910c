"""Segmentation metrics as ``torchmetrics.Metric`` subclasses; every result is in percent.

- ``MeanIoU``: torchmetrics' ``MulticlassConfusionMatrix`` (its ``confmat`` state, ignore index
  and sync), reduced as detectron2's ``SemSegEvaluator`` does: a class's IoU is defined only when
  the class has ground-truth pixels, and mIoU is the mean over those classes. A class that is
  predicted but absent from the ground truth gets ``None`` (its false positives still lower the
  IoU of the classes whose pixels it took).
- ``InstanceAP50``: COCO's ``COCOeval(iouType="segm")`` on RLE masks; AP at IoU 0.50, area
  "all", 100 detections per image (pycocotools' ``stats[1]``), and per class; computed by
  hotcoco, whose precision values equal pycocotools' on the study's detections and on a crowd
  fixture (a test keeps pycocotools as the reference). Masks are kept as the bytes of
  their compressed COCO RLE in tensor states, so torchmetrics gathers them across ranks. With no
  (non-crowd) ground-truth instance at all AP50 is undefined and reported as ``None``. The
  ground truth is a scene's ``annotations`` where it has them (COCO instances data: each
  annotation's own mask, overlaps and fully hidden instances included, so AP50 equals
  pycocotools on the user's JSON), else the thing segments of its ``instance`` map.
- ``PanopticQuality``: COCO's PQ exactly as cocodataset/panopticapi ``pq_compute`` defines it:
  a ground-truth and a predicted segment of the same category match when IoU > 0.5, where the
  predicted segment's overlap with void ground truth is taken out of the union; ground-truth
  crowd segments are never matched and never false negatives; an unmatched predicted segment is
  no false positive when more than half of it lies on void or on a crowd region of its own
  category; PQ, SQ and RQ average over categories with TP + FP + FN > 0.

  torchmetrics' ``detection.PanopticQuality`` (1.9) is not used, because it deviates from
  panopticapi in ways that cannot be undone from outside (tests/evaluation/test_metrics.py shows each):

  1. IoU: it also subtracts the part of the *ground-truth* segment predicted as void from the
     union (panopticapi subtracts only the predicted segment's overlap with ground-truth void);
  2. false negatives: an unmatched ground-truth segment mostly predicted as void is not counted
     (panopticapi counts every unmatched non-crowd ground-truth segment);
  3. crowd: it has no notion of crowd regions;
  4. stuff: it drops instance ids of stuff classes, merging all predicted (and ground-truth)
     segments of one stuff class into one.

  Where none of these applies (no void, no crowd, one segment per stuff class) both agree; a test
  checks that too. The per-category TP / FP / FN / IoU sums are ``add_state`` sum tensors.

mIoU and PQ always score against a scene's flattened ``semantic`` / ``instance`` maps (on COCO
instances data a panoptic view of the annotations: overlaps painted larger objects first).

**Things-only data** (no class is stuff, e.g. COCO instances annotations): the pixels no
annotation covers are background, not void, and "nothing" is scored as a class of its own in
mIoU (as PASCAL VOC's background): ground-truth void pixels are "nothing", and so are the
predicted pixels no kept segment covers (panoptic id 0, or a semantic value outside the
classes: ``Prediction.semantic`` -1, 255 / 65535 in a semantic PNG). mIoU is the mean over the
classes with ground truth and "nothing" (``nothing_IoU`` in the result). Without this,
void background is never scored, and predicting a thing everywhere costs nothing (mIoU 100
with AP50 0). Data with a stuff class (every embedded scene task) is scored as before.

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

from ..data.scenes import VOID  # one name for void, defined with the labels
from .records import APRecords, PerImage

METRICS = ("mIoU", "AP50", "PQ")  # the three tasks' headline metrics, in this order everywhere


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
    target are left out. ``update(pred, target)`` takes (H, W) or (B, H, W) class maps and adds
    to torchmetrics' ``confmat`` state with one ``bincount`` (no input checks or formatting;
    numpy's, single-threaded: small per-image ops pay more for threads than they gain)."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = VOID, **kw) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index,
                         validate_args=False, **kw)

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Adds the confusion matrix of these pixels; it stays in ``last`` (C, C), rows target
        (torchmetrics' update wrapper drops return values)."""
        c = self.num_classes
        pred = torch.as_tensor(pred).detach().cpu().numpy().reshape(-1).astype(np.int64)
        target = torch.as_tensor(target).cpu().numpy().reshape(-1).astype(np.int64)
        scored = target != self.ignore_index
        counts = np.bincount(target[scored] * c + pred[scored], minlength=c * c).reshape(c, c)
        self.confmat += torch.from_numpy(counts).to(self.confmat)
        self.last = counts

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
@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off for a block that builds many acyclic containers
    (the COCO annotation dicts; reference counting frees them): otherwise each burst of
    allocations sets off full collections that scan every live object of the process."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _rle_counts(masks: np.ndarray) -> list[bytes]:
    """Compressed COCO RLE ``counts`` of bool masks (K, H, W), encoded in one call."""
    from pycocotools import mask as mask_util

    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0), dtype=bool).view(np.uint8)
    return [r["counts"] for r in mask_util.encode(fortran)]


class InstanceAP50(Metric):
    """COCO mask AP at IoU 0.5 of thing instances. ``update(instances, gt)``: ``instances`` a
    ``postprocess.Instances`` (or a list of {"mask", "category", "score"}), ``gt`` a Scene: its
    ``annotations`` when not None (the dataset's own, possibly overlapping, instance masks),
    else its thing segments; ``iscrowd`` honoured either way."""

    full_state_update = False
    # per image: (height, width, #gt, #dt); per gt: (category, iscrowd, #rle bytes);
    # per dt: (category, #rle bytes) and score; RLE bytes of gt and dt masks, in order.
    _IMG, _GT, _DT = 4, 3, 2

    def __init__(self, num_classes: int, max_dets: int = 100, **kw) -> None:
        super().__init__(**kw)
        self.num_classes, self.max_dets = num_classes, max_dets
        for name in ("images", "gt_meta", "dt_meta", "dt_score", "gt_rle", "dt_rle"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, instances, gt) -> None:
        if isinstance(instances, list):
            instances = _as_instances(instances, gt.instance.shape)
        originals = getattr(gt, "annotations", None)
        if originals is not None:  # the dataset's own masks (COCO instances: may overlap)
            things = originals
            gt_rle = [bytes(a["counts"]) for a in originals]
        else:                      # the thing segments of the flattened map
            things = [s for s in gt.segments if s["isthing"]]
            ids = np.array([s["id"] for s in things], dtype=np.int64)
            gt_rle = _rle_counts(np.asarray(gt.instance)[None] == ids[:, None, None])
        gt_meta = [v for s, b in zip(things, gt_rle)
                   for v in (int(s["category"]), int(s.get("iscrowd", 0) or 0), len(b))]
        dt_rle = _rle_counts(instances.masks.detach().cpu().numpy())
        dt_meta = [v for c, b in zip(instances.categories.tolist(), dt_rle) for v in (c, len(b))]
        dev = self.device

        def as_bytes(chunks: list[bytes]) -> Tensor:
            buf = bytearray(b"".join(chunks))
            if not buf:
                return torch.zeros(0, dtype=torch.uint8, device=dev)
            return torch.frombuffer(buf, dtype=torch.uint8).clone().to(dev)

        h, w = gt.instance.shape
        self.images.append(torch.tensor([h, w, len(gt_rle), len(dt_rle)], dtype=torch.long,
                                        device=dev))
        self.gt_meta.append(torch.tensor(gt_meta, dtype=torch.long, device=dev))
        self.dt_meta.append(torch.tensor(dt_meta, dtype=torch.long, device=dev))
        self.dt_score.append(instances.scores.detach().to(dev, torch.float64).reshape(-1))
        self.gt_rle.append(as_bytes(gt_rle))
        self.dt_rle.append(as_bytes(dt_rle))

    def _coco(self) -> tuple[list[dict], list[dict], list[dict]]:
        """Images, ground-truth and detection annotations in COCO format, from the states."""
        from pycocotools import mask as mask_util

        # numpy's tolist: the same Python ints and floats as torch's, ~70x faster on the
        # ~20,000 detections of a 200-image split
        images = _cat(self.images, torch.long).cpu().view(-1, self._IMG).numpy().tolist()
        gt_meta = _cat(self.gt_meta, torch.long).cpu().view(-1, self._GT).numpy().tolist()
        dt_meta = _cat(self.dt_meta, torch.long).cpu().view(-1, self._DT).numpy().tolist()
        dt_score = _cat(self.dt_score, torch.float64).cpu().numpy().tolist()
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

    def compute(self, records: bool = False) -> dict:
        """{"AP50": percent | None, "per_class": [percent | None]} (None: no GT instance); with
        ``records``, also "records": COCO's per-image matching (``APRecords``), from which
        ``ssprompt.evaluation.bootstrap`` recomputes AP50 on resampled image sets."""
        with _gc_paused():  # ~20,000 short-lived dicts: no cycles among them to collect
            return self._compute(records)

    def _compute(self, records: bool) -> dict:
        images, gts, dts = self._coco()
        has_gt = [False] * self.num_classes
        for g in gts:
            if not g["iscrowd"]:
                has_gt[g["category_id"] - 1] = True
        if not any(has_gt) or not dts:
            out = {"AP50": None, "per_class": [None] * self.num_classes} if not any(has_gt) \
                else {"AP50": 0.0, "per_class": [0.0 if h else None for h in has_gt]}
            if records:
                out["records"] = APRecords.empty(len(images), self.num_classes, gts)
            return out
        ap50, per_class, rec = coco_ap50(images, gts, dts, self.num_classes, self.max_dets,
                                         records=True)
        out = {"AP50": _pct(ap50) if ap50 >= 0 else None,
               "per_class": [None if a is None else _pct(a) for a in per_class]}
        if records:
            out["records"] = rec
        return out


def _as_instances(preds: list[dict], hw: tuple[int, int]):
    """A list of {"mask", "category", "score"} as one ``Instances``."""
    from .postprocess import Instances

    if not preds:
        return Instances(torch.zeros(0, *hw, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                         torch.zeros(0))
    return Instances(torch.stack([torch.as_tensor(p["mask"]).bool() for p in preds]),
                     torch.tensor([int(p["category"]) for p in preds]),
                     torch.tensor([float(p["score"]) for p in preds], dtype=torch.float64))


AP_LIBRARY = "hotcoco"  # equal to pycocotools to the last bit on the study's detections, ~30x faster


def coco_ap50(images: list[dict], gts: list[dict], dts: list[dict], num_classes: int,
              max_dets: int = 100, library: str = AP_LIBRARY, records: bool = False):
    """COCO mask AP (``COCOeval(iouType="segm")``) at IoU 0.5, area "all", ``max_dets``
    detections (pycocotools' ``stats[1]``; -1 when undefined), and per class (None: no ground
    truth). Only that one (IoU, area, max-dets) setting is evaluated: COCO matches each setting
    on its own, so the others would change nothing but the time. ``library``: "hotcoco" (Rust;
    measured equal to pycocotools on every precision value, bench/eval_speed.py) or
    "pycocotools", the reference. Returns (AP50, per class), plus the ``APRecords`` of the
    per-image matching with ``records`` (image ids must be 1..len(images))."""
    dataset = {"info": {"description": "ssprompt"}, "images": images, "annotations": gts,
               "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        if library == "hotcoco":
            import hotcoco

            coco_gt = hotcoco.COCO(dataset)
            ev = hotcoco.COCOeval(coco_gt, coco_gt.load_res(dts), "segm")
        elif library == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            coco_gt = COCO()
            # "info" too: pycocotools 2.0.10's loadRes copies it and fails without it
            coco_gt.dataset = dataset
            coco_gt.createIndex()
            if dts:
                coco_dt = coco_gt.loadRes(dts)
            else:  # loadRes([]) fails (IndexError): no detections are an empty result set
                coco_dt = COCO()
                coco_dt.dataset = {**dataset, "annotations": []}
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        else:
            raise ValueError(f"unknown AP library {library!r}")
        ev.params.iouThrs = np.array([0.5])
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
    # precision: [IoU thr, recall thr, category, area range, max dets]
    prec = np.asarray(ev.eval["precision"])[0, :, :, 0, -1]
    per_class: list[float | None] = [None] * num_classes
    for k, cat in enumerate(ev.params.catIds):
        col = prec[:, k]
        col = col[col > -1]
        per_class[cat - 1] = float(col.mean()) if col.size else None
    valid = prec[prec > -1]
    ap = (float(np.mean(valid)) if valid.size else -1.0), per_class
    if records:
        return (*ap, APRecords.of(ev.evalImgs, len(images), num_classes, max_dets))
    return ap


# --------------------------------------------------------------------------------------- PQ
class PanopticQuality(Metric):
    """COCO panoptic quality (panopticapi ``pq_compute``). ``update(pred_seg, pred_segments,
    gt)``: a map of predicted segment ids (0 = void), its segments {"id", "category", ...},
    and a Scene whose ``instance`` map (0 = void) and ``segments`` are the ground truth.
    Segments are as large as the maps say; listed segments absent from a map drop out."""

    full_state_update = False

    def __init__(self, is_thing: list[bool], **kw) -> None:
        super().__init__(**kw)
        self.is_thing = [bool(t) for t in is_thing]
        c = len(self.is_thing)
        for name in ("tp", "fp", "fn", "iou"):
            self.add_state(name, default=torch.zeros(c, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, pred_seg: Tensor, pred_segments: list[dict], gt) -> None:
        """Adds one image; its per-category (TP, FP, FN, IoU sum), (C, 4), stay in ``last``."""
        c = len(self.is_thing)
        g = _Segments(gt.segments, np.asarray(gt.instance))
        p = _Segments(pred_segments, torch.as_tensor(pred_seg).detach().cpu().numpy())
        # every (gt id, pred id) pair that overlaps, with its intersection in pixels
        offset = int(p.map.max()) + 1 if p.map.size else 1
        pairs, inter = np.unique(g.map * offset + p.map, return_counts=True)
        gid, pid = pairs // offset, pairs % offset
        gi, pi = g.index(gid), p.index(pid)
        g.area_from(gi, inter)
        p.area_from(pi, inter)
        # a predicted segment's overlap with ground-truth void (id 0): out of the union
        on_void = np.zeros(len(p.ids), np.int64)
        sel = (gid == 0) & (pi >= 0)
        on_void[pi[sel]] = inter[sel]

        # matches: same category, gt not crowd, IoU > 0.5 (so each segment matches at most once)
        cand = (gi >= 0) & (pi >= 0)
        cand[cand] = ((g.cat[gi[cand]] == p.cat[pi[cand]]) & ~g.crowd[gi[cand]]
                      & g.present[gi[cand]] & p.present[pi[cand]])
        mg, mp, n = gi[cand], pi[cand], inter[cand]
        iou = n / (p.area[mp] + g.area[mg] - n - on_void[mp])
        match = iou > 0.5
        mg, mp, iou = mg[match], mp[match], iou[match]
        tp = np.bincount(g.cat[mg], minlength=c)
        iou_sum = np.zeros(c, np.float64)
        np.add.at(iou_sum, g.cat[mg], iou)          # in pair order, as panopticapi sums
        g_free = g.present & ~np.isin(np.arange(len(g.ids)), mg)
        p_free = p.present & ~np.isin(np.arange(len(p.ids)), mp)

        fn = np.bincount(g.cat[g_free & ~g.crowd], minlength=c)
        # an unmatched prediction is no false positive when more than half of it lies on void
        # or on the (last listed) crowd region of its own category
        ignored = on_void.copy()
        crowd_of = dict(zip(g.cat[g_free & g.crowd].tolist(), g.ids[g_free & g.crowd].tolist()))
        if crowd_of:
            overlap = dict(zip(zip(gid.tolist(), pid.tolist()), inter.tolist()))
            for k in np.flatnonzero(p_free):
                crowd = crowd_of.get(int(p.cat[k]))
                if crowd is not None:
                    ignored[k] += overlap.get((crowd, int(p.ids[k])), 0)
        fp_mask = p_free & ~(ignored / np.maximum(p.area, 1) > 0.5)
        fp = np.bincount(p.cat[fp_mask], minlength=c)

        dev = self.tp.device
        stats = np.stack([tp, fp, fn, iou_sum], -1).astype(np.float64)   # (C, 4)
        for k, state in enumerate((self.tp, self.fp, self.fn, self.iou)):
            state += torch.as_tensor(stats[:, k]).to(dev)
        self.last = stats

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


class _Segments:
    """One side of a PQ comparison: listed segments as arrays (id, category, crowd) beside the
    id map; ``area`` / ``present`` come from the map."""

    def __init__(self, segments: list[dict], id_map: np.ndarray) -> None:
        self.map = np.asarray(id_map, dtype=np.int64).reshape(-1)
        self.ids = np.array([s["id"] for s in segments], dtype=np.int64)
        self.cat = np.array([s["category"] for s in segments], dtype=np.int64)
        self.crowd = np.array([bool(s.get("iscrowd", 0)) for s in segments], dtype=bool)
        self._order = np.argsort(self.ids, kind="stable")
        self.area = np.zeros(len(self.ids), np.int64)
        self.present = np.zeros(len(self.ids), bool)

    def index(self, ids: np.ndarray) -> np.ndarray:
        """Position of each id in the segment list; -1 for unlisted ids (and void, 0)."""
        if not len(self.ids):
            return np.full(len(ids), -1)
        pos = np.searchsorted(self.ids, ids, sorter=self._order).clip(0, len(self.ids) - 1)
        found = self._order[pos]
        return np.where((self.ids[found] == ids) & (ids != 0), found, -1)

    def area_from(self, idx: np.ndarray, counts: np.ndarray) -> None:
        sel = idx >= 0
        self.area = np.bincount(idx[sel], weights=counts[sel],
                                minlength=len(self.ids)).astype(np.int64)
        self.present = self.area > 0


# -------------------------------------------------------------------------------- evaluator
class SegmentationEvaluator:
    """mIoU, AP50 and PQ of post-processed predictions on ground-truth scenes (percent, 2
    decimals)."""

    def __init__(self, class_names: list[str], is_thing: list[bool], sync: bool = True,
                 per_image: bool = False) -> None:
        """``sync=False``: never gather states across ranks (each rank scores on its own, as
        in a study whose ranks run different cells). ``per_image``: ``compute`` also returns
        "per_image", the statistics a paired bootstrap over images needs
        (``ssprompt.evaluation.records.PerImage``; this process's images only)."""
        if len(class_names) != len(is_thing):
            raise ValueError("class_names and is_thing differ in length")
        self.class_names, self.is_thing = list(class_names), [bool(t) for t in is_thing]
        kw = {} if sync else {"sync_on_compute": False}
        # things-only data: "nothing" is class C in mIoU (module docstring)
        self.things_only = bool(self.is_thing) and all(self.is_thing)
        self.miou = MeanIoU(len(self.class_names) + self.things_only, **kw)
        self.ap = InstanceAP50(len(self.class_names), **kw)
        self.pq = PanopticQuality(self.is_thing, **kw)
        self.per_image = per_image
        self._iou: list[np.ndarray] = []   # per image (C, 3): intersection, predicted, truth
        self._pq: list[np.ndarray] = []    # per image (C, 4): TP, FP, FN, IoU sum

    def update(self, predictions: list, scenes: list) -> None:
        """``predictions``: ``postprocess.Prediction`` objects aligned with ``scenes``, at the
        scenes' sizes."""
        for pred, scene in zip(predictions, scenes, strict=True):
            if self.things_only:
                self.miou.update(*self._with_nothing(pred, scene))
            else:
                self.miou.update(pred.semantic, scene.semantic)
            self.ap.update(pred.instances, scene)
            self.pq.update(pred.panoptic, pred.segments, scene)
            if self.per_image:
                cm = self.miou.last
                self._iou.append(np.stack([cm.diagonal(), cm.sum(0), cm.sum(1)], -1))
                self._pq.append(self.pq.last)

    def _with_nothing(self, pred, scene) -> tuple[np.ndarray, np.ndarray]:
        """Things-only: (prediction, target) class maps with "nothing" as class C."""
        c = len(self.class_names)
        sem = torch.as_tensor(pred.semantic).detach().cpu().numpy().astype(np.int64)
        pan = torch.as_tensor(pred.panoptic).detach().cpu().numpy()
        sem = np.where((pan == 0) | (sem < 0) | (sem >= c), c, sem)
        target = np.asarray(scene.semantic).astype(np.int64)
        return sem, np.where(target == VOID, c, target)

    def compute(self) -> dict:
        miou, ap, pq = self.miou.compute(), self.ap.compute(records=self.per_image), \
            self.pq.compute()
        per_class = {name: {"IoU": _round(miou["per_class"][c]),
                            "AP50": _round(ap["per_class"][c]),
                            "PQ": _round(pq["per_class"][c]), "isthing": self.is_thing[c]}
                     for c, name in enumerate(self.class_names)}
        out = {"mIoU": _round(miou["mIoU"]), "AP50": _round(ap["AP50"])}
        out.update({k: _round(pq[k]) for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")})
        out["per_class"] = per_class
        if self.things_only:
            out["nothing_IoU"] = _round(miou["per_class"][len(self.class_names)])
        if self.per_image:
            c, ci = len(self.class_names), self.miou.num_classes   # ci: "nothing" included
            out["per_image"] = PerImage(
                np.stack(self._iou) if self._iou else np.zeros((0, ci, 3), np.int64),
                np.stack(self._pq) if self._pq else np.zeros((0, c, 4)), ap["records"])
        return out

    def reset(self) -> None:
        for m in (self.miou, self.ap, self.pq):
            m.reset()
        self._iou, self._pq = [], []
