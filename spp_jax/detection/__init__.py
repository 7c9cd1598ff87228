"""SPP-net detection, the reusable pieces: boxes, NMS, VOC evaluation, records, proposals, scales,
window features (through :mod:`spp_jax.serve`) and their per-image cache, fine-tuning, SVMs, box
regression, R-CNN mode and the detector; the experiment's config (:mod:`spp_jax.detection.config`,
not imported here). Assembling Tables 9 and 12 is the experiment's job
(``experiments/voc_det.py``).

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

# Detection system (SPP_FACTS section 6): records, proposals, scales, features,
# fine-tuning, box regression, R-CNN mode, and the train/test orchestration.
from spp_jax.detection.records import RecordSource, load_records, tfds_bbox_to_pixels  # noqa: E402
from spp_jax.detection.scales import SCALES_1, SCALES_5, SCALES_5_RELEASED, choose_scales  # noqa: E402
from spp_jax.detection.proposals import (ProposalSettings, compute_proposals,  # noqa: E402
                                         load_proposal_file, selective_search)
from spp_jax.detection.cache import CachedImage, FeatureCache, cache_features  # noqa: E402
from spp_jax.detection.features import SPPExtractor  # noqa: E402
# (the finetune() function is not re-exported: it would shadow the finetune submodule)
from spp_jax.detection.finetune import FinetuneConfig, window_labels  # noqa: E402
from spp_jax.detection.bbox_reg import BBoxRegressor, fit_ridge, train_bbox_regressors  # noqa: E402
from spp_jax.detection.rcnn import RCNNExtractor, time_windows, warp_windows  # noqa: E402
from spp_jax.detection.detector import (LAYERS, Detector, DetectorConfig,  # noqa: E402
                                        test_combined, test_detector, train_detector)

__all__ += [
    "RecordSource", "load_records", "tfds_bbox_to_pixels", "SCALES_1", "SCALES_5", "SCALES_5_RELEASED",
    "choose_scales", "ProposalSettings", "compute_proposals", "load_proposal_file", "selective_search",
    "CachedImage", "FeatureCache", "SPPExtractor", "cache_features", "FinetuneConfig",
    "window_labels", "BBoxRegressor", "fit_ridge", "train_bbox_regressors", "RCNNExtractor",
    "time_windows", "warp_windows", "LAYERS", "Detector", "DetectorConfig", "test_detector", "test_combined",
    "train_detector",
]
