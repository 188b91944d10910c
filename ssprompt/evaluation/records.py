"""Per-image evaluation records: what one evaluation leaves behind so that its metrics can be
recomputed on any resample of the test images (used by ``bootstrap``, written by ``metrics``)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass
class APRecords:
    """COCO's per-image matching at IoU 0.5 (what ``COCOeval.evaluate`` leaves in
    ``evalImgs``), enough to recompute AP50 on any multiset of the images: per detection (the
    top ``max_dets`` of each image and category) its image, category, score and whether it is a
    true positive or a false positive (a detection matched to a crowd region is neither); per
    image and category, the number of ground-truth instances that count (non-crowd)."""

    det_image: np.ndarray   # int64 (D,)
    det_cat: np.ndarray     # int64 (D,)
    det_score: np.ndarray   # float64 (D,)
    det_tp: np.ndarray      # bool (D,)
    det_fp: np.ndarray      # bool (D,)
    gt_count: np.ndarray    # int64 (images, C)

    @staticmethod
    def empty(n_images: int, num_classes: int, gts: list[dict]) -> "APRecords":
        count = np.zeros((n_images, num_classes), np.int64)
        for g in gts:
            if not g["iscrowd"]:
                count[g["image_id"] - 1, g["category_id"] - 1] += 1
        z = np.zeros(0)
        return APRecords(z.astype(np.int64), z.astype(np.int64), z, z.astype(bool),
                         z.astype(bool), count)

    @staticmethod
    def of(eval_imgs: list, n_images: int, num_classes: int, max_dets: int) -> "APRecords":
        """From hotcoco's or pycocotools' ``evalImgs`` (one IoU threshold, one area range)."""
        img, cat, score, tp, fp = [], [], [], [], []
        count = np.zeros((n_images, num_classes), np.int64)
        for e in eval_imgs:
            if not e:
                continue
            i, c = int(e["image_id"]) - 1, int(e["category_id"]) - 1
            scores = np.asarray(e["dtScores"], np.float64)[:max_dets]
            matched = np.asarray(e["dtMatched"][0] if "dtMatched" in e
                                 else np.asarray(e["dtMatches"])[0] > 0, bool)[:max_dets]
            ignored = np.asarray(e["dtIgnore"][0], bool)[:max_dets]
            count[i, c] += int(np.count_nonzero(~np.asarray(e["gtIgnore"], bool)))
            img.append(np.full(len(scores), i))
            cat.append(np.full(len(scores), c))
            score.append(scores)
            tp.append(matched & ~ignored)
            fp.append(~matched & ~ignored)

        def cat_(xs, dtype):
            return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)

        return APRecords(cat_(img, np.int64), cat_(cat, np.int64), cat_(score, np.float64),
                         cat_(tp, bool), cat_(fp, bool), count)


@dataclass
class PerImage:
    """Per-image statistics of one evaluation (images in evaluation order)."""

    iou: np.ndarray        # (n, C, 3) int: intersection, predicted, true pixels per class
    pq: np.ndarray         # (n, C, 4) float: TP, FP, FN, IoU sum per class
    ap: APRecords

    def __len__(self) -> int:
        return int(self.iou.shape[0])

    def to_bytes(self) -> bytes:
        """Compressed, each array in the smallest dtype of its kind that holds it exactly
        (``from_bytes`` gives the canonical dtypes back: the same values bit for bit)."""
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: _compact(v) for k, v in self._arrays().items()})
        return buf.getvalue()

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"iou": self.iou, "pq": self.pq, **{f"ap_{k}": v for k, v in vars(self.ap).items()}}

    @staticmethod
    def from_bytes(data: bytes) -> "PerImage":
        z = np.load(io.BytesIO(data))
        ap = APRecords(**{k[3:]: z[k].astype(_CANONICAL[k]) for k in z.files
                          if k.startswith("ap_")})
        return PerImage(z["iou"].astype(np.int64), z["pq"].astype(np.float64), ap)


_CANONICAL = {"ap_det_image": np.int64, "ap_det_cat": np.int64, "ap_det_score": np.float64,
              "ap_det_tp": bool, "ap_det_fp": bool, "ap_gt_count": np.int64}


def _compact(a: np.ndarray) -> np.ndarray:
    """``a`` in the narrowest dtype of its kind (int16/int32, float32) that round-trips it
    exactly; bool and already narrow arrays as they are."""
    for dtype in {"i": (np.int16, np.int32), "f": (np.float32,)}.get(a.dtype.kind, ()):
        if np.dtype(dtype).itemsize >= a.dtype.itemsize:
            break
        b = a.astype(dtype)
        if np.array_equal(b.astype(a.dtype), a):
            return b
    return a
