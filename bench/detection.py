"""5. Detection feature time per image (proposals excluded): SPP-net 1 / 5 scales vs R-CNN mode.

Same ZF-5 (width 1.0), same image (synthetic 688 x 917) and windows.  SPP time is
split into conv (the map(s)), pool (window pyramid pooling, with the extractor's
dedup) and fc (fc6 + fc7 of every window through ``fc_layers``, as the detector runs
them: windows with equal pool5 rows computed once).  R-CNN mode (warp every window to
224^2, whole conv net each) is timed on a subset of windows and extrapolated linearly;
its fc time is ``fc_layers`` on as many distinct rows (each window is its own warped
image, so its pool5 rows do not repeat).
"""
from __future__ import annotations

import jax
import numpy as np

from bench.common import Config, Row, median, time_fn
from bench.windows import IMAGE_HW, proposals

GOAL = (">=", 20.0)


def _spp_times(ext, image, boxes, repeats: int) -> dict:
    ext.pool5(image, boxes)  # warm-up: compiles every conv / pooling program once
    conv, pool = [], []
    for _ in range(repeats):
        c0, p0 = ext.stats["conv_s"], ext.stats["pool_s"]
        pooled, _ = ext.pool5(image, boxes)
        conv.append(ext.stats["conv_s"] - c0)
        pool.append(ext.stats["pool_s"] - p0)
    return {"conv": median(conv), "pool": median(pool), "pool5": pooled}


def _fc_time(head, pool5, repeats: int) -> float:
    from spp_jax.serve import fc_layers
    # One warm-up call compiles the row counts used; fc_layers returns numpy, so it blocks.
    return time_fn(lambda: fc_layers(head, pool5, logits=False), 1, max(2, repeats))


def run(cfg: Config, device) -> list[Row]:
    from spp_jax.detection.features import SPPExtractor
    from spp_jax.detection.rcnn import RCNNExtractor, time_windows
    from spp_jax.serve import Server
    from spp_jax.detection.scales import SCALES_1, SCALES_5
    from spp_jax.models import get_model, init_params
    image, boxes, prov = proposals(cfg.windows, IMAGE_HW)
    model = get_model("zf5")
    variables = jax.device_put(init_params(model, jax.random.key(0)), device)
    head = {k: variables["params"]["classifier"][k] for k in ("fc6", "fc7")}
    r = len(boxes)

    res = {}
    for name, scales in (("1-scale", SCALES_1), ("5-scale", SCALES_5)):
        ext = SPPExtractor(Server(model, variables, mean=128.0), scales=scales)
        res[name] = _spp_times(ext, image, boxes, cfg.det_repeats)
        res[name]["unique"] = ext.stats["unique"] // max(1, ext.stats["images"])
        res[name]["fc"] = _fc_time(head, res[name]["pool5"], cfg.det_repeats)
    distinct = np.random.default_rng(5).uniform(0, 1, res["1-scale"]["pool5"].shape).astype(np.float32)
    fc_rcnn = _fc_time(head, distinct, cfg.det_repeats)

    rc = RCNNExtractor(Server(model, variables, mean=128.0), batch=32)
    tw = time_windows(rc, image, boxes, max_windows=min(r, cfg.rcnn_windows))
    rcnn_net = tw["seconds"]
    warp_frac = rc.stats["warp_s"] / max(1e-9, rc.stats["warp_s"] + rc.stats["conv_s"])
    rcnn_total = rcnn_net + fc_rcnn
    rows = []
    for name in ("1-scale", "5-scale"):
        t = res[name]
        total = t["conv"] + t["pool"] + t["fc"]
        rows.append(Row("5 detection", f"SPP {name} vs R-CNN, ZF-5, {r} windows, per image", total, rcnn_total,
                        "s", rcnn_total / total, GOAL if name == "1-scale" else None,
                        f"SPP conv {t['conv']:.2f} s + pool {t['pool']:.2f} s + fc {t['fc']:.2f} s "
                        f"({t['unique']} unique rows); R-CNN warp+conv+pool {rcnn_net:.1f} s "
                        f"({'extrapolated linearly from ' + str(tw['measured_windows']) + ' windows' if tw['extrapolated'] else 'measured'}; "
                        f"warp {warp_frac:.0%} of it) + fc {fc_rcnn:.2f} s ({r} rows)"))
    t1 = res["1-scale"]
    rows.append(Row("5 detection", "SPP 1-scale vs R-CNN, conv+pool only", t1["conv"] + t1["pool"], rcnn_net, "s",
                    rcnn_net / (t1["conv"] + t1["pool"]), None, "fc excluded"))
    return rows
