"""Bounding-box regression on pool5 features (R-CNN's ridge regressors; SPP_FACTS section 6).

Per class k, a linear map from pool5 features (scaled so their mean L2 norm
is 20, as the SVM features) to R-CNN targets ``(dx, dy, dw, dh)``
(:func:`spp_jax.detection.bbox_targets`), fitted by ridge regression with
lambda = 4000 on the windows whose IoU with a ground-truth box of class k
is > 0.5 (each regresses to that box). Closed form on centred data, so the
bias is not regularised:

    (Xc^T Xc + lambda I) W = Xc^T Tc,      b = mean(T) - mean(X) W

solved in the primal (D x D) or, when there are fewer samples than features,
in the equivalent dual form ``W = Xc^T (Xc Xc^T + lambda I)^-1 Tc``.
At test time it moves the detections kept after NMS; they are then clipped
to the image.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from spp_jax.detection.boxes import apply_deltas, bbox_targets, clip_boxes, pairwise_iou

log = logging.getLogger(__name__)

DEFAULT_LAMBDA = 4000.0
MIN_IOU = 0.5  # strictly greater

__all__ = ["BBoxRegressor", "fit_ridge", "regression_samples", "train_bbox_regressors", "DEFAULT_LAMBDA"]


def fit_ridge(X, T, lam: float = DEFAULT_LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unregularised bias.

    Args:
      X: (N, D) float features; T: (N, M) float targets; lam: lambda >= 0.
    Returns:
      W (D, M) float32, b (M,) float32 with predictions ``X @ W + b``.
    """
    X = np.asarray(X, np.float64)
    T = np.asarray(T, np.float64).reshape(len(X), -1)
    if len(X) == 0:
        raise ValueError("no samples to fit")
    mx, mt = X.mean(0), T.mean(0)
    Xc, Tc = X - mx, T - mt
    n, d = Xc.shape
    if n < d:  # dual: n x n system
        W = Xc.T @ np.linalg.solve(Xc @ Xc.T + lam * np.eye(n), Tc)
    else:
        W = np.linalg.solve(Xc.T @ Xc + lam * np.eye(d), Xc.T @ Tc)
    return W.astype(np.float32), (mt - mx @ W).astype(np.float32)


def regression_samples(boxes, gt_boxes, gt_labels, min_iou: float = MIN_IOU):
    """Windows with IoU > min_iou to a GT box: (rows (M,), classes (M,), targets (M, 4))."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    ious = pairwise_iou(boxes, np.asarray(gt_boxes, np.float32))
    j = ious.argmax(1)
    rows = np.flatnonzero(ious[np.arange(len(boxes)), j] > min_iou)
    t = bbox_targets(boxes[rows], np.asarray(gt_boxes, np.float32)[j[rows]])
    return rows, np.asarray(gt_labels)[j[rows]].astype(np.int64), np.asarray(t, np.float32)


@dataclasses.dataclass
class BBoxRegressor:
    """Per-class box regressors.

    Attributes:
      weights: (K, D, 4) float32; biases: (K, 4) float32; feat_scale: multiplier of pool5
      applied before the linear map; trained: (K,) bool (classes without samples keep boxes).
    """

    weights: np.ndarray
    biases: np.ndarray
    feat_scale: float
    trained: np.ndarray

    def deltas(self, pool5, classes) -> np.ndarray:
        """(N, D) pool5, (N,) classes -> (N, 4) predicted deltas (zeros for untrained classes)."""
        x = np.asarray(pool5, np.float32) * self.feat_scale
        classes = np.asarray(classes, np.int64)
        d = np.einsum("nd,ndm->nm", x, self.weights[classes]) + self.biases[classes]
        return np.where(self.trained[classes][:, None], d, 0).astype(np.float32)

    def refine(self, pool5, boxes, classes, image_hw) -> np.ndarray:
        """Move boxes by the class's regressor and clip to the image -> (N, 4) float32."""
        if len(boxes) == 0:
            return np.zeros((0, 4), np.float32)
        # Cap a predicted size change at 1000/16 x so exp cannot overflow on wild features.
        out = apply_deltas(np.asarray(boxes, np.float32), self.deltas(pool5, classes),
                           max_log_scale=float(np.log(1000 / 16)))
        return np.asarray(clip_boxes(out, tuple(int(v) for v in image_hw)), np.float32)


def train_bbox_regressors(entries, num_classes: int, feat_scale: float, lam: float = DEFAULT_LAMBDA,
                          min_iou: float = MIN_IOU) -> BBoxRegressor:
    """Fit one ridge regressor per class from cached images.

    Args:
      entries: iterable of :class:`~spp_jax.detection.cache.CachedImage` (pool5, boxes, gt_boxes,
        gt_labels are read).
      num_classes: K; feat_scale: pool5 multiplier (the SVM's mean-norm-20 scale).
    """
    xs, cs, ts = [], [], []
    for e in entries:
        rows, cls, t = regression_samples(e.boxes, e.gt_boxes, e.gt_labels, min_iou)
        xs.append(np.asarray(e.pool5, np.float32)[rows])
        cs.append(cls)
        ts.append(t)
    X = np.concatenate(xs) * feat_scale if xs else np.zeros((0, 1), np.float32)
    C = np.concatenate(cs) if cs else np.zeros(0, np.int64)
    T = np.concatenate(ts) if ts else np.zeros((0, 4), np.float32)
    d = X.shape[1]
    W = np.zeros((num_classes, d, 4), np.float32)
    b = np.zeros((num_classes, 4), np.float32)
    trained = np.zeros(num_classes, bool)
    for k in range(num_classes):
        sel = C == k
        if sel.sum() < 2:
            log.info("bbox regression: class %d has %d sample(s), left untrained", k, int(sel.sum()))
            continue
        W[k], b[k] = fit_ridge(X[sel], T[sel], lam)
        trained[k] = True
    return BBoxRegressor(W, b, float(feat_scale), trained)
