"""The paper's testing protocols (1 crop, 1 full, 10-view, multi-view on feature maps) and metrics."""
from spp_jax.evaluate.protocols import PROTOCOL_TITLES, PROTOCOLS, ProtocolResult, evaluate, topk_errors
from spp_jax.evaluate.scoring import Scorer
from spp_jax.evaluate.views import MULTIVIEW_SCALES, bucket_shape, nine_windows, pad_image

__all__ = ["MULTIVIEW_SCALES", "PROTOCOLS", "PROTOCOL_TITLES", "ProtocolResult", "Scorer",
           "bucket_shape", "evaluate", "nine_windows", "pad_image", "topk_errors"]
