"""Detection utilities: box geometry, non-maximum suppression, VOC evaluation.

Boxes everywhere are ``(..., 4)`` arrays of ``(x1, y1, x2, y2)`` in 0-based
inclusive pixel corners (width ``x2 - x1 + 1``); see
:mod:`spp_jax.detection.boxes` for the convention and the VOC converters.
"""

from spp_jax.detection.boxes import (
    apply_deltas,
    bbox_targets,
    box_area,
    clip_boxes,
    flip_boxes_lr,
    internal_to_voc,
    pairwise_iou,
    scale_boxes,
    voc_to_internal,
)
from spp_jax.detection.nms import (
    Detections,
    batched_nms,
    multiclass_nms,
    nms_keep_mask,
    nms_numpy,
    nms_padded,
    top_k_detections,
)
from spp_jax.detection.voc_eval import (
    ClassEval,
    detections_by_class,
    mean_ap,
    voc_ap,
    voc_ap_11point,
    voc_ap_area,
    voc_ap_per_class,
)

__all__ = [
    "apply_deltas",
    "bbox_targets",
    "box_area",
    "clip_boxes",
    "flip_boxes_lr",
    "internal_to_voc",
    "pairwise_iou",
    "scale_boxes",
    "voc_to_internal",
    "Detections",
    "batched_nms",
    "multiclass_nms",
    "nms_keep_mask",
    "nms_numpy",
    "nms_padded",
    "top_k_detections",
    "ClassEval",
    "detections_by_class",
    "mean_ap",
    "voc_ap",
    "voc_ap_11point",
    "voc_ap_area",
    "voc_ap_per_class",
]
