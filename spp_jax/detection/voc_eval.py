"""Pascal VOC detection evaluation (average precision), from the devkit's definition.

For one class (``VOCevaldet`` in the VOC 2007 devkit):

1. Sort all detections of the class, over all images, by descending score
   (a stable sort: equal scores keep their input order).
2. For each detection in turn, find the ground-truth box of the same image
   with the highest IoU (+1 pixel convention; the first one on ties),
   *among all of that image's boxes of the class*, including difficult ones
   and ones already matched (the devkit does not skip matched boxes: a
   detection whose best box is already taken is a false positive even if
   a second box would have overlapped it by >= 0.5).
   - IoU >= ``iou_thresh`` (0.5) and the box is difficult: ignored, neither
     TP nor FP (it is dropped from the PR curve).
   - IoU >= 0.5, not difficult, not yet matched: TP; the box is now matched.
   - IoU >= 0.5, not difficult, already matched: FP (a duplicate).
   - otherwise (including images with no box of the class): FP.
3. Cumulative TP/FP give recall = TP / (number of non-difficult boxes) and
   precision = TP / (TP + FP) after each counted detection.
4. AP of that curve: :mod:`spp_jax.voc_ap` (VOC 2007 11-point by default),
   shared with transfer classification.

A class with no non-difficult ground-truth box has undefined recall; its AP
is reported as NaN and it is left out of the mAP (``np.nanmean``). A class
with ground truth but no detections has AP 0.

Boxes are in the project's internal convention (0-based inclusive, see
:mod:`spp_jax.detection.boxes`); IoU is translation invariant, so VOC
1-based boxes give identical results as long as detections and ground truth
use the same convention. Image ids are any hashable values (str, int).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

from spp_jax.detection.boxes import pairwise_iou
from spp_jax.voc_ap import voc_ap, voc_ap_11point, voc_ap_area  # re-exported: the AP of a PR curve

__all__ = [
    "ClassEval",
    "voc_ap_11point",
    "voc_ap_area",
    "voc_ap",
    "voc_ap_per_class",
    "mean_ap",
    "detections_by_class",
]


@dataclass
class ClassEval:
    """Evaluation of one class.

    Attributes:
      ap: average precision in [0, 1]; NaN when ``num_positives == 0``.
      recall: (K,) float64 recall after each counted detection, in score
        order (K = detections that were TP or FP; ignored ones are dropped).
      precision: (K,) float64 precision at the same points.
      is_tp: (D,) int8 per input detection (input order): 1 TP, 0 FP,
        -1 ignored (matched a difficult box).
      num_positives: number of non-difficult ground-truth boxes.
    """

    ap: float
    recall: np.ndarray
    precision: np.ndarray
    is_tp: np.ndarray
    num_positives: int


def _unpack_gt_class(entry: Any) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, difficult) or {"boxes", "difficult"} -> (G, 4) float, (G,) bool."""
    if isinstance(entry, Mapping):
        boxes, difficult = entry["boxes"], entry.get("difficult")
    else:
        boxes, difficult = entry
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if difficult is None:
        difficult = np.zeros(len(boxes), bool)
    difficult = np.asarray(difficult, bool).reshape(-1)
    if difficult.shape != (len(boxes),):
        raise ValueError(f"difficult must have shape ({len(boxes)},); got {difficult.shape}")
    return boxes, difficult


def voc_ap_per_class(
    image_ids: Sequence[Hashable],
    scores: Any,
    boxes: Any,
    gt: Mapping[Hashable, Any],
    iou_thresh: float = 0.5,
    use_07_metric: bool = True,
) -> ClassEval:
    """Evaluate the detections of one class against its ground truth.

    Args:
      image_ids: (D,) image id of each detection.
      scores: (D,) float confidence, higher is more confident.
      boxes: (D, 4) internal boxes.
      gt: image id -> ``(boxes (G, 4), difficult (G,) bool)`` (or a mapping
        with keys "boxes" and "difficult") holding that image's ground truth
        *of this class*. Images missing from ``gt`` have no box of the class
        (their detections are false positives); every image whose boxes
        count as positives must be present. Boxes in the same convention as
        the detections.
      iou_thresh: minimum IoU for a match (> 0; VOC uses 0.5).
      use_07_metric: 11-point AP (VOC 2007) if True, else area AP.
    Returns:
      :class:`ClassEval` (AP NaN if the class has no non-difficult box).
    """
    if not iou_thresh > 0:
        raise ValueError(f"iou_thresh must be > 0; got {iou_thresh}")
    scores = np.asarray(scores, np.float64).reshape(-1)
    boxes = np.asarray(boxes, np.float64)
    num_det = scores.shape[0]
    if num_det == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.shape != (num_det, 4):
        raise ValueError(f"boxes must have shape ({num_det}, 4); got {boxes.shape}")
    image_ids = list(image_ids)
    if len(image_ids) != num_det:
        raise ValueError(f"got {len(image_ids)} image ids for {num_det} scores")

    gt_by_image = {key: _unpack_gt_class(value) for key, value in gt.items()}
    num_pos = int(sum(int((~diff).sum()) for _, diff in gt_by_image.values()))

    order = np.argsort(-scores, kind="stable")  # global visiting order
    is_tp = np.zeros(num_det, np.int8)  # FP unless set below

    # Group detections by image; within an image, matching only depends on
    # the global visiting order restricted to that image.
    by_image: dict[Hashable, list[int]] = {}
    for d in order:
        by_image.setdefault(image_ids[d], []).append(int(d))
    for image_id, dets in by_image.items():
        if image_id not in gt_by_image:
            continue
        gt_boxes, difficult = gt_by_image[image_id]
        if len(gt_boxes) == 0:
            continue
        iou = pairwise_iou(boxes[dets], gt_boxes)  # (n_det, G)
        best = iou.argmax(axis=1)  # first maximum, as the devkit's strict '>'
        best_iou = iou[np.arange(len(dets)), best]
        matched = np.zeros(len(gt_boxes), bool)
        for d, j, ov in zip(dets, best, best_iou):
            if ov < iou_thresh:
                continue  # FP
            if difficult[j]:
                is_tp[d] = -1  # ignored
            elif not matched[j]:
                is_tp[d] = 1
                matched[j] = True
            # else: duplicate of a matched box -> FP

    counted = is_tp[order]
    counted = counted[counted >= 0]
    tp = np.cumsum(counted == 1)
    fp = np.cumsum(counted == 0)
    precision = tp / np.maximum(tp + fp, 1)  # tp + fp >= 1 at every counted point
    if num_pos == 0:
        return ClassEval(float("nan"), np.full(len(tp), np.nan), precision, is_tp, 0)
    recall = tp / num_pos
    return ClassEval(voc_ap(recall, precision, use_07_metric), recall, precision, is_tp, num_pos)


def _unpack_gt_image(entry: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, labels, difficult) or a mapping -> (G, 4), (G,), (G,) bool."""
    if isinstance(entry, Mapping):
        boxes, labels, difficult = entry["boxes"], entry["labels"], entry.get("difficult")
    else:
        boxes, labels, difficult = entry
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool).reshape(-1)
    if labels.shape != (len(boxes),) or difficult.shape != (len(boxes),):
        raise ValueError(
            f"labels/difficult must have shape ({len(boxes)},); got {labels.shape}, {difficult.shape}"
        )
    return boxes, labels, difficult


def mean_ap(
    detections: Mapping[Hashable, Any],
    gt: Mapping[Hashable, Any],
    classes: Iterable[Hashable] | None = None,
    iou_thresh: float = 0.5,
    use_07_metric: bool = True,
) -> tuple[dict[Hashable, float], float]:
    """Per-class AP and mAP over a dataset.

    Args:
      detections: class -> ``(image_ids (D,), scores (D,), boxes (D, 4))``
        (see :func:`detections_by_class`). Missing classes have no
        detections.
      gt: image id -> ``(boxes (G, 4), labels (G,), difficult (G,))`` or a
        mapping with keys "boxes", "labels", "difficult" — every evaluated
        image, including images with no objects. Labels use the same class
        keys as ``detections``.
      classes: classes to evaluate, in report order; default: every class
        seen in ``gt`` labels or ``detections`` (sorted when sortable).
      iou_thresh, use_07_metric: as in :func:`voc_ap_per_class`.
    Returns:
      ``({class: AP}, mAP)``. Classes without non-difficult ground truth get
      AP NaN and are excluded from mAP; mAP is NaN if no class has any.
    """
    parsed = {image_id: _unpack_gt_image(entry) for image_id, entry in gt.items()}
    if classes is None:
        seen: dict[Hashable, None] = {}
        for _, labels, _ in parsed.values():
            for label in labels.tolist():
                seen.setdefault(label, None)
        for label in detections:
            seen.setdefault(label, None)
        classes = list(seen)
        try:
            classes = sorted(classes)
        except TypeError:
            pass  # mixed key types: keep first-seen order
    aps: dict[Hashable, float] = {}
    empty = ([], np.zeros(0), np.zeros((0, 4)))
    for cls in classes:
        gt_cls = {}
        for image_id, (boxes, labels, difficult) in parsed.items():
            # Compare element by element: numpy's vectorised == between,
            # e.g., an int array and a str key is not a clean all-False.
            sel = np.array([label == cls for label in labels.tolist()], bool).reshape(-1)
            gt_cls[image_id] = (boxes[sel], difficult[sel])
        ids, scores, boxes = detections.get(cls, empty)
        aps[cls] = voc_ap_per_class(ids, scores, boxes, gt_cls, iou_thresh, use_07_metric).ap
    values = np.array(list(aps.values()), np.float64)
    finite = values[~np.isnan(values)]
    return aps, float(finite.mean()) if finite.size else float("nan")


def detections_by_class(
    per_image: Mapping[Hashable, Any],
) -> dict[Hashable, tuple[list[Hashable], np.ndarray, np.ndarray]]:
    """Regroup per-image detections into the per-class form of :func:`mean_ap`.

    Args:
      per_image: image id -> ``(boxes (K, 4), scores (K,), labels (K,))``,
        ``(boxes, scores, labels, valid (K,) bool)`` or a
        :class:`spp_jax.detection.nms.Detections` (labels = its ``classes``);
        rows with ``valid`` False are dropped.
    Returns:
      class -> ``(image_ids list (D,), scores (D,) float64, boxes (D, 4)
      float64)``.
    """
    grouped: dict[Hashable, tuple[list, list, list]] = {}
    for image_id, entry in per_image.items():
        if hasattr(entry, "valid") and hasattr(entry, "classes"):  # a Detections tuple
            entry = (entry.boxes, entry.scores, entry.classes, entry.valid)
        boxes, scores, labels = (np.asarray(x) for x in entry[:3])
        boxes = boxes.reshape(-1, 4)
        scores = scores.reshape(-1)
        labels = labels.reshape(-1)
        if len(entry) > 3 and entry[3] is not None:
            keep = np.asarray(entry[3], bool).reshape(-1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        for label in np.unique(labels).tolist():
            sel = labels == label
            ids, sc, bx = grouped.setdefault(label, ([], [], []))
            ids.extend([image_id] * int(sel.sum()))
            sc.append(scores[sel])
            bx.append(boxes[sel])
    return {
        label: (ids, np.concatenate(sc).astype(np.float64), np.concatenate(bx).astype(np.float64).reshape(-1, 4))
        for label, (ids, sc, bx) in grouped.items()
    }
