"""Average precision of a precision/recall curve, as Pascal VOC defines it.

Used by detection (:mod:`spp_jax.detection.voc_eval`, per class over matched
detections) and by transfer classification (:mod:`spp_jax.transfer.classify`, per
class over ranked images), so neither imports the other.

* VOC 2007 (``use_07_metric=True``, the paper's): 11-point interpolation, the mean
  over t in {0, 0.1, ..., 1} of the highest precision at recall >= t (0 if recall
  never reaches t). The thresholds are computed as ``k / 10`` so a recall of exactly
  0.3 counts for t = 0.3 (``np.arange(0, 1.1, 0.1)`` would give 0.30000000000000004
  and miss it).
* VOC 2010+ (``use_07_metric=False``): area under the PR curve made monotone
  (precision at recall r replaced by the highest precision at any recall >= r).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["voc_ap", "voc_ap_11point", "voc_ap_area"]


def voc_ap_11point(recall: Any, precision: Any) -> float:
    """VOC 2007 11-point interpolated AP.

    Args:
      recall: (K,) float, the recall after each counted detection (any order).
      precision: (K,) float, the matching precision.
    Returns:
      Mean over t = 0, 0.1, ..., 1 of max(precision[recall >= t]) (0 where
      the set is empty); 0.0 for empty input.
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    total = 0.0
    for k in range(11):
        reached = recall >= k / 10.0
        total += float(precision[reached].max()) if reached.any() else 0.0
    return total / 11.0


def voc_ap_area(recall: Any, precision: Any) -> float:
    """VOC 2010+ AP: area under the monotone (interpolated) PR curve.

    Args:
      recall: (K,) float, non-decreasing (detections in score order).
      precision: (K,) float.
    Returns:
      sum over recall steps of (step width) * (max precision at recall >= the
      step's end); 0.0 for empty input.
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    # Envelope: precision at each point = best precision at any later point.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_ap(recall: Any, precision: Any, use_07_metric: bool = True) -> float:
    """AP from a PR curve: 11-point (VOC 2007, default) or area (VOC 2010+)."""
    return voc_ap_11point(recall, precision) if use_07_metric else voc_ap_area(recall, precision)
