"""The paper's testing protocols (1 crop, 1 full, 10-view, multi-view on feature maps) and metrics."""
from spp_jax.evaluate.protocols import (ONE_PASS, PROTOCOL_TITLES, PROTOCOLS, ProtocolResult, evaluate, full_view_by_side,
    topk_errors)
from spp_jax.evaluate.scoring import Scorer
from spp_jax.evaluate.views import MULTIVIEW_SCALES, nine_windows

__all__ = ["MULTIVIEW_SCALES", "ONE_PASS", "PROTOCOLS", "PROTOCOL_TITLES", "ProtocolResult", "Scorer",
           "evaluate", "full_view_by_side", "nine_windows", "topk_errors"]
