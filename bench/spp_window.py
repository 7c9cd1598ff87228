"""2. Window SPP: ``spp_jax.roi_pool_cells`` vs ``torchvision.ops.roi_pool`` once per level."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import spp_jax
from bench.common import Config, Row, pair_ratio, pair_spread, peak_rss_delta, time_pair, torch_device, tsync
from bench.windows import IMAGE_HW, proposals

LEVELS = (6, 3, 2, 1)
GOAL = (">=", 5.0)


def torchvision_rois(cells: np.ndarray):
    """Inclusive integer cells (x0, y0, x1, y1) -> torchvision's (K, 5) float rois (batch 0)."""
    import torch
    r = np.concatenate([np.zeros((len(cells), 1), np.float32), cells.astype(np.float32)], axis=1)
    return torch.from_numpy(r)


def torch_window_spp(fmap_nchw, rois, levels=LEVELS):
    """(1, C, H, W), rois -> (R, sum n*n*C) in spp_jax's layout (levels as given, (y, x, C))."""
    import torch
    from torchvision.ops import roi_pool
    outs = [roi_pool(fmap_nchw, rois, output_size=n, spatial_scale=1.0) for n in levels]
    return torch.cat([o.permute(0, 2, 3, 1).reshape(o.shape[0], -1) for o in outs], dim=1)


def torchvision_bins_differ(cells: np.ndarray, map_hw, levels=LEVELS) -> np.ndarray:
    """(R,) bool: windows where torchvision's float32 bin edges differ from Appendix A's.

    torchvision computes ``floor(i * float(a) / n)`` and ``ceil((i + 1) * float(a) / n)``
    in float32; (i + 1) * (a / n) can round to just above an integer, making a bin one
    cell wider (clamped only to the map, not to the window).
    """
    bad = np.zeros(len(cells), bool)
    for axis, (lo_i, hi_i, size) in enumerate(((1, 3, map_hw[0]), (0, 2, map_hw[1]))):
        lo, hi = cells[:, lo_i].astype(np.int64), cells[:, hi_i].astype(np.int64)
        a = hi - lo + 1
        for n in levels:
            i = np.arange(n)[None, :]
            bsz = a.astype(np.float32)[:, None] / np.float32(n)
            s_tv = np.floor(i.astype(np.float32) * bsz).astype(np.int64)
            e_tv = np.ceil((i + 1).astype(np.float32) * bsz).astype(np.int64)
            s_tv = np.clip(s_tv + lo[:, None], 0, size)
            e_tv = np.clip(e_tv + lo[:, None], 0, size)
            s = lo[:, None] + (i * a[:, None]) // n
            e = lo[:, None] + -((-(i + 1) * a[:, None]) // n)
            bad |= np.any((s != s_tv) | (e != e_tv), axis=1)
    return bad


def run(cfg: Config, device) -> list[Row]:
    import torch
    from spp_jax.models import backbone_geometry
    h, w, c = cfg.window_map
    image, boxes, prov = proposals(cfg.windows, IMAGE_HW)
    geom = backbone_geometry("zf5")
    cells = np.asarray(spp_jax.project_boxes(boxes, geom, (h, w), xp=np)).astype(np.int32)
    rng = np.random.default_rng(1)
    fmap_np = np.maximum(rng.standard_normal((h, w, c), dtype=np.float32), 0)  # post-ReLU-like
    fmap = jax.device_put(jnp.asarray(fmap_np), device)
    cells_j = jax.device_put(jnp.asarray(cells), device)
    boxes_j = jax.device_put(jnp.asarray(boxes), device)
    fmap_t = torch.from_numpy(np.ascontiguousarray(fmap_np.transpose(2, 0, 1)))[None]  # NCHW
    tdev = torch_device(cfg)
    rois = torchvision_rois(cells).to(tdev)
    fmap_t = fmap_t.to(tdev)

    pool_cells = jax.jit(lambda f, cl: spp_jax.roi_pool_cells(f, cl, LEVELS))
    out_j = np.asarray(pool_cells(fmap, cells_j))
    with torch.no_grad():
        out_t = torch_window_spp(fmap_t, rois).cpu().numpy()
    differ = torchvision_bins_differ(cells, (h, w))
    same = ~differ
    assert np.array_equal(out_j[same], out_t[same]), "window SPP outputs differ where the bins agree"
    n_diff_vals = int(np.sum(np.any(out_j[differ] != out_t[differ], axis=1))) if differ.any() else 0

    def jf():
        pool_cells(fmap, cells_j).block_until_ready()

    def tf():
        with torch.no_grad():
            torch_window_spp(fmap_t, rois)
        tsync(tdev)

    tj, tt = time_pair(jf, tf, cfg.warmup, cfg.repeats, cfg.min_seconds)
    ratio, spread = pair_ratio(), pair_spread()
    # Memory: XLA's own accounting of the compiled program, and RSS growth for both.
    ma = pool_cells.lower(fmap, cells_j).compile().memory_analysis()
    xla_temp = getattr(ma, "temp_size_in_bytes", 0) if ma is not None else 0
    xla_out = getattr(ma, "output_size_in_bytes", 0) if ma is not None else 0
    rss_j = peak_rss_delta(jf)
    rss_t = peak_rss_delta(tf)
    out_mb = out_j.nbytes / 2**20
    note = (f"{prov}; bit-equal on {int(same.sum())}/{len(cells)} windows"
            + (f"; {int(differ.sum())} windows where torchvision's float32 bin edges overhang "
               f"by a cell ({n_diff_vals} of them give different values)" if differ.any() else ""))
    rows = [Row("2 window SPP", f"{len(cells)} windows x levels 1,2,3,6 x {c}ch on {h}x{w}",
                tj * 1e3, tt * 1e3, "ms", ratio, GOAL, note + "; " + spread)]
    rows.append(Row("2 window SPP", "peak memory (XLA temp+out | RSS growth)",
                    (xla_temp + xla_out) / 2**20, rss_t / 2**20, "MiB", None, None,
                    f"spp_jax XLA temp {xla_temp / 2**20:.1f} + output {xla_out / 2**20:.1f} MiB, "
                    f"RSS growth {rss_j / 2**20:.1f} MiB; torch RSS growth {rss_t / 2**20:.1f} MiB; "
                    f"the output alone is {out_mb:.1f} MiB; torchvision also allocates an int32 argmax per "
                    f"output value ({out_mb:.1f} MiB more) and a per-level output before the concat"))
    # The full path from image boxes (projection included), for reference.
    pool_boxes = jax.jit(lambda f, b: spp_jax.roi_pool(f, b, LEVELS, geometry=geom))
    tb, tt = time_pair(lambda: pool_boxes(fmap, boxes_j).block_until_ready(), tf, 1, cfg.repeats,
                       cfg.min_seconds)
    rows.append(Row("2 window SPP", "roi_pool from image boxes (projection incl.)", tb * 1e3, tt * 1e3,
                    "ms", pair_ratio(), GOAL,
                    f"same windows as pixel boxes; torchvision given ready cells; {pair_spread()}"))
    return rows
