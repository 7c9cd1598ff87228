"""Window (RoI) spatial pyramid pooling: ``spp_jax.roi_pool``.

Each image window is projected onto the conv map (:func:`spp_jax.project_boxes`)
and pooled with the same Appendix A bins as :func:`spp_jax.pool`, applied inside
the window's cell range, so a window covering the whole map pools exactly like
``pool`` on that map.

How it is fast without per-window masks over the map:
  * A 2-D sparse table (range-max table) holds, for every cell (y, x) and every
    ky <= Ky, kx <= Kx, the max over the 2**ky x 2**kx block starting there.  Any
    rectangle with sides in [2**ky, 2**(ky+1)) x [2**kx, 2**(kx+1)) is the max of
    four (overlapping) such blocks, so each bin costs four row gathers of C values.
    Ky/Kx only go as high as the largest bin of the finest level needs
    (ceil(a/n) + 1 cells), so the table is a few copies of the map, independent
    of the number of windows.
  * Coarser levels whose n divides a finer level's n are maxima over groups of
    the finer bins (see :func:`spp_jax.bins.derivation_plan`): for (6, 3, 2, 1)
    only the 6x6 bins touch the table.
Memory is O(table + R * bins * C), never O(R * H * W * C).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import bins as B
from spp_jax.errors import InputError
from spp_jax.geometry import Geometry, check_finite_boxes, project_boxes
from spp_jax.pooling import _check_fmap, _coarsen


def _table_depth(a: int, n: int) -> int:
    """Largest k with 2**k <= the widest Appendix A bin of level n on any window of an a-cell axis."""
    widest = min(a, -(-a // n) + 1)
    return int(np.floor(np.log2(widest)))


def _shift_max(t, axis: int, step: int):
    """max(t[i], t[min(i + step, a - 1)]) along ``axis``: doubles each block's extent."""
    a = t.shape[axis]
    idx = np.minimum(np.arange(a) + step, a - 1)
    return jnp.maximum(t, jnp.take(t, idx, axis=axis))


def sparse_table(fmap, ky: int, kx: int):
    """(H, W, C) -> (ky+1, kx+1, H, W, C) with T[i, j, y, x] = max of fmap[y:y+2**i, x:x+2**j].

    Blocks running past the map's edge are truncated (only entries whose block
    fits are ever read by :func:`roi_pool_cells`).  The column doublings run once on
    the stack of all row doublings, so the program has ky + kx shifts rather than
    (ky + 1) * kx + ky: XLA's compile time grows with their number (about 25 ms each
    on CPU; 0.59 -> 0.30 s for a 46x93 map), and the serving path compiles one such
    program per map shape.  (Slices and an edge copy instead of the gather measured
    8-27 % slower.)
    """
    rows = [fmap]
    for i in range(1, ky + 1):
        rows.append(_shift_max(rows[-1], 0, 2 ** (i - 1)))
    cols = [jnp.stack(rows)]  # (ky+1, H, W, C)
    for j in range(1, kx + 1):
        cols.append(_shift_max(cols[-1], 2, 2 ** (j - 1)))
    return jnp.stack(cols, axis=1)


def _floor_log2_table(maxlen: int) -> np.ndarray:
    """lut[L] = floor(log2(L)) for 1 <= L <= maxlen (lut[0] unused), exact integers."""
    lut = np.zeros(maxlen + 1, np.int32)
    for length in range(2, maxlen + 1):
        lut[length] = lut[length // 2] + 1
    return lut


def _level_bins(fmap, cells, n: int, mode: str = "appendix_a"):
    """Bin maxima of level n for every window: (H, W, C), (R, 4) -> (R, n, n, C).

    A window whose cells are not inside the map with start <= end reads a row past the
    table, which the gather fills with NaN: its bins are NaN, never another cell's values.
    """
    h, w, c = fmap.shape
    ky, kx = _table_depth(h, n), _table_depth(w, n)
    flat = sparse_table(fmap, ky, kx).reshape(-1, c)  # ((ky+1)(kx+1)HW, C)
    outside = flat.shape[0]  # a row index past the table: gathers fill it with NaN
    lut = jnp.asarray(_floor_log2_table(max(h, w)))

    def axis_queries(lo, hi):
        # lo, hi: scalar inclusive cell range of one window on one axis.
        start, end = B.bin_edges_array(hi - lo + 1, n, xp=jnp, mode=mode)  # (n,), (n,) relative, [start, end)
        length = end - start  # >= 1 for every bin of a valid window (both bin rules)
        k = lut[length]
        first = lo + start
        second = lo + end - (1 << k)  # last block start; overlaps the first when length isn't 2**k
        return k, first, second

    def one_window(box):
        x0, y0, x1, y1 = box[0], box[1], box[2], box[3]
        valid = (0 <= x0) & (x0 <= x1) & (x1 < w) & (0 <= y0) & (y0 <= y1) & (y1 < h)
        kyi, r0, r1 = axis_queries(y0, y1)  # (n,) each, per bin row
        kxj, c0, c1 = axis_queries(x0, x1)  # (n,) each, per bin column
        plane = (kyi[:, None] * (kx + 1) + kxj[None, :]) * (h * w)  # (n, n)
        out = None
        for r in (r0, r1):
            for cc in (c0, c1):
                idx = jnp.where(valid, plane + r[:, None] * w + cc[None, :], outside)  # (n, n)
                v = jnp.take(flat, idx, axis=0, mode="fill", fill_value=jnp.nan)  # (n, n, C)
                out = v if out is None else jnp.maximum(out, v)
        return out

    return jax.vmap(one_window)(cells)


def check_cells(cells, map_hw) -> None:
    """Raise InputError unless ``cells`` is (R, 4) ints and, when concrete, inside the map.

    Concrete cells (NumPy, lists, or JAX arrays outside a trace) are checked fully and
    the first bad window is named; traced cells only by shape and dtype (the values are
    unknown at trace time; :func:`roi_pool_cells` documents what they give then).
    """
    shape = getattr(cells, "shape", None)
    if shape is None:
        cells = np.asarray(cells)
        shape = cells.shape
    if len(shape) != 2 or shape[-1] != 4:
        raise InputError(f"cells must have shape (R, 4) as (x_start, y_start, x_end, y_end), "
                         f"got {tuple(shape)}")
    if not jnp.issubdtype(cells.dtype, jnp.integer):
        raise InputError(f"cells must be integer map cells, got dtype {cells.dtype}")
    if isinstance(cells, jax.core.Tracer):
        return
    c = np.asarray(cells)
    h, w = int(map_hw[0]), int(map_hw[1])
    bad = ~((0 <= c[:, 0]) & (c[:, 0] <= c[:, 2]) & (c[:, 2] < w)
            & (0 <= c[:, 1]) & (c[:, 1] <= c[:, 3]) & (c[:, 3] < h))
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"cells[{i}] = {c[i].tolist()} is not inside the {h}x{w} map with "
                         f"start <= end ({int(bad.sum())} bad window(s) of {len(c)})")


def roi_pool_cells(fmap, cells, levels: Sequence[int] = B.DEFAULT_LEVELS, mode: str = "appendix_a"):
    """Pyramid-pool windows already given in map cells.

    Args:
      fmap: (H, W, C) floating conv map of one image.
      cells: (R, 4) int (x_start, y_start, x_end, y_end) inclusive cells, inside the
        map with start <= end (as :func:`spp_jax.project_boxes` returns).
      levels: pyramid levels (static).
      mode: static bin rule, "appendix_a" (default) or "released" (:mod:`spp_jax.bins`).
    Returns:
      (R, C * sum(n*n)) in fmap's dtype, laid out as :func:`spp_jax.pool`'s output.

    Contract: concrete cells are checked (:func:`check_cells`: an InputError names the
    first window out of the map or with start > end).  Traced cells (inside a caller's
    ``jax.jit`` / ``vmap``) cannot be checked; a window that breaks the rule then pools
    to NaN in every output value of its row (and passes no gradient to ``fmap``), never
    to the values of some other cell.  Checking costs one host copy of the (R, 4) cells.
    """
    levels = B.normalize_levels(levels)
    _check_fmap(fmap, 3, "fmap")
    check_cells(cells, fmap.shape[:2])
    return _roi_pool_cells(fmap, cells, levels, B.check_mode(mode))


@functools.partial(jax.jit, static_argnames=("levels", "mode"))
def _roi_pool_cells(fmap, cells, levels: tuple[int, ...], mode: str = "appendix_a"):
    r, c = cells.shape[0], fmap.shape[-1]
    plan = B.derivation_plan(levels, mode)
    got = {}
    for n in sorted(plan, reverse=True):
        got[n] = (_level_bins(fmap, cells, n, mode) if plan[n] == n
                  else _coarsen(got[plan[n]], plan[n], n))
    return jnp.concatenate([got[n].reshape(r, n * n * c) for n in levels], axis=-1)


def roi_pool(fmap: jax.Array, boxes, levels: Sequence[int] = B.DEFAULT_LEVELS, *,
             geometry: Geometry, mode: str = "appendix_a") -> jax.Array:
    """Spatial pyramid pooling of image windows on one image's conv map.

    Args:
      fmap: (H, W, C) conv map of one image, any floating dtype.
      boxes: (R, 4) windows (x1, y1, x2, y2) in that image's pixels, 0-based
        inclusive corners; R >= 1 (static under jit), values may be traced.
        Windows outside the image or smaller than a cell still pool at least
        one cell (the projection's collapse-and-clamp rule).  Concrete boxes with a
        NaN or infinite coordinate raise InputError; under ``jax.jit`` such a window
        pools to a row of NaN (see :func:`spp_jax.project_boxes`), never to a cell.
      levels: pyramid levels, default (6, 3, 2, 1).
      geometry: the backbone's :class:`Geometry` (e.g. ``model.geometry``).
      mode: bin rule, "appendix_a" (default) or "released" (:mod:`spp_jax.bins`).
    Returns:
      (R, C * sum(n*n)) in fmap's dtype; the same layout as :func:`spp_jax.pool`.
      Differentiable with respect to ``fmap``.
    """
    levels = B.normalize_levels(levels)
    _check_fmap(fmap, 3, "fmap")
    shape = getattr(boxes, "shape", None)
    if shape is None:
        boxes = np.asarray(boxes, np.float32)
        shape = boxes.shape
    if len(shape) != 2 or shape[-1] != 4:
        raise InputError(f"boxes must have shape (R, 4) as (x1, y1, x2, y2), got {tuple(shape)}")
    if shape[0] == 0:
        raise InputError("boxes is empty (R = 0): there are no windows to pool")
    if not isinstance(boxes, jax.core.Tracer):
        check_finite_boxes(boxes)
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a spp_jax.Geometry, got {type(geometry).__name__}")
    return _roi_pool(fmap, boxes, levels, geometry, B.check_mode(mode))


@functools.partial(jax.jit, static_argnames=("levels", "geometry", "mode"))
def _roi_pool(fmap, boxes, levels, geometry, mode):
    cells = project_boxes(boxes, geometry, fmap.shape[:2])  # traced: bad rows become INVALID_CELLS
    return _roi_pool_cells(fmap, cells, levels, mode)
