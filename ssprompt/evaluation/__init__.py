"""The evaluation layer: post-processing of SFM outputs, the metrics (mIoU, AP50, PQ), per-image
records, bootstrap intervals and ``evaluate``."""
