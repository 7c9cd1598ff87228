"""4. fc6 + fc7 of 2000 windows: rows saved by de-duplicating projected cells, GFLOP/s vs peak."""
from __future__ import annotations

import jax
import numpy as np

from bench.common import Config, Row, time_pair, torch_device, tsync
from bench.windows import IMAGE_HW, proposals

GOAL = (">=", 0.8)


def dedup_stats(boxes: np.ndarray, image_hw, arch: str = "zf5", scales=(688,)) -> dict:
    """Windows and distinct (scale, cells) rows, as :class:`SPPExtractor` pools them."""
    from spp_jax.detection.boxes import scale_boxes
    from spp_jax.detection.scales import choose_scales
    from spp_jax.geometry import project_boxes
    from spp_jax.models import backbone_geometry, map_size
    from spp_jax.detection.features import resize_for_scale
    geom = backbone_geometry(arch)
    sidx = choose_scales(boxes, image_hw, scales, "area")
    unique, per_scale, cells_1 = 0, [], None
    dummy = np.zeros(tuple(image_hw) + (3,), np.uint8)
    for si, s in enumerate(scales):
        sel = np.flatnonzero(sidx == si)
        if sel.size == 0:
            per_scale.append(0)
            continue
        resized, factors = resize_for_scale(dummy, s)
        valid = (map_size(arch, resized.shape[0]), map_size(arch, resized.shape[1]))
        cells = project_boxes(scale_boxes(boxes[sel], factors), geom, valid, xp=np)
        u = len(np.unique(cells, axis=0))
        per_scale.append(u)
        unique += u
        if len(scales) == 1:
            cells_1 = cells
    return {"windows": len(boxes), "unique": unique, "per_scale": per_scale, "cells": cells_1}


def run(cfg: Config, device, peak: dict) -> list[Row]:
    import torch
    import torch.nn.functional as F
    from spp_jax.models import get_model, init_params
    from spp_jax.serve import fc_call_rows, fc_layers

    def fc_features(head, x, layer):  # what the detector computes: fc6, fc7 through the model's Head
        return fc_layers(head, x, logits=False)[layer]
    image, boxes, prov = proposals(cfg.windows, IMAGE_HW)
    s1 = dedup_stats(boxes, IMAGE_HW, scales=(688,))
    s5 = dedup_stats(boxes, IMAGE_HW, scales=(480, 576, 688, 864, 1200))
    model = get_model("zf5")
    variables = init_params(model, jax.random.key(0))
    head = jax.device_put({k: variables["params"]["classifier"][k] for k in ("fc6", "fc7")}, device)
    d = model.pooled_dim
    rng = np.random.default_rng(4)
    pool_all = np.maximum(rng.standard_normal((s1["windows"], d), dtype=np.float32), 0)
    _, first = np.unique(s1["cells"], axis=0, return_index=True)
    pool_u = pool_all[np.sort(first)]
    w6 = torch.from_numpy(np.array(head["fc6"]["kernel"]).T.copy())
    b6 = torch.from_numpy(np.array(head["fc6"]["bias"]))
    w7 = torch.from_numpy(np.array(head["fc7"]["kernel"]).T.copy())
    b7 = torch.from_numpy(np.array(head["fc7"]["bias"]))

    def torch_fc(x):
        with torch.no_grad():
            out = F.relu(F.linear(F.relu(F.linear(x, w6, b6)), w7, b7))
        tsync(tdev)
        return out

    tdev = torch_device(cfg)
    w6, b6, w7, b7 = (t.to(tdev) for t in (w6, b6, w7, b7))
    per_row = 2.0 * (d * 4096 + 4096 * 4096)
    pk = peak["peak"]
    rows = []
    for label, x in (("dedup rows", pool_u), ("all rows", pool_all)):
        xt = torch.from_numpy(x).to(tdev)
        ref = torch_fc(xt).cpu().numpy()
        got = fc_features(head, x, "fc7")
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * float(np.abs(ref).max()))
        # The correctness check above was both sides' warm-up.
        tj, tt = time_pair(lambda: fc_features(head, x, "fc7"), lambda: torch_fc(xt), 0, cfg.fc_repeats)
        g = per_row * len(x) / tj / 1e9
        rows.append(Row("4 fc6+fc7", f"{len(x)} {label} (of {s1['windows']}), fc_features batch 512",
                        g, per_row * len(x) / tt / 1e9, "GFLOP/s", g / pk, GOAL,
                        f"ratio = spp_jax / matmul peak {pk:.0f} GFLOP/s; times jax {tj * 1e3:.0f} ms, "
                        f"torch {tt * 1e3:.0f} ms (torch/jax {tt / tj:.2f}x)"))
    # The dedup rows in one call (rows padded to a multiple of 128) against fc_features'
    # calls of 512 rows and a tail padded to a multiple of 64.
    fc67 = jax.jit(lambda p, x: jax.nn.relu(jax.nn.relu(x @ p["fc6"]["kernel"] + p["fc6"]["bias"])
                                            @ p["fc7"]["kernel"] + p["fc7"]["bias"]))
    u = len(pool_u)
    pad = np.concatenate([pool_u, np.zeros(((-u) % 128, d), np.float32)])
    xj = jax.device_put(pad, device)
    xt = torch.from_numpy(pool_u).to(tdev)
    got = np.asarray(fc67(head, xj))[:u]
    np.testing.assert_allclose(got, fc_features(head, pool_u, "fc7"), rtol=1e-4, atol=1e-4)
    tj, tt = time_pair(lambda: fc67(head, xj).block_until_ready(), lambda: torch_fc(xt), 0, cfg.fc_repeats)
    g = per_row * u / tj / 1e9
    rows.append(Row("4 fc6+fc7", f"{u} dedup rows, one call padded to a multiple of 128 (bench-only)", g,
                    per_row * u / tt / 1e9, "GFLOP/s", g / pk, GOAL,
                    f"{len(pad)} rows computed; times jax {tj * 1e3:.0f} ms, torch {tt * 1e3:.0f} ms "
                    f"(torch/jax {tt / tj:.2f}x); fc_features computes {sum(fc_call_rows(u))} rows for {u}"))
    saved1 = s1["windows"] - s1["unique"]
    saved5 = s5["windows"] - s5["unique"]
    rows.append(Row("4 fc6+fc7", "rows saved by dedup, 1 scale (688)", saved1, s1["windows"], "rows",
                    saved1 / s1["windows"], None, f"{prov}; unique {s1['unique']}"))
    rows.append(Row("4 fc6+fc7", "rows saved by dedup, 5 scales", saved5, s5["windows"], "rows",
                    saved5 / s5["windows"], None, f"unique per scale {s5['per_scale']}; the library pools unique cells once "
                    "and fc_layers computes equal rows once"))
    return rows
