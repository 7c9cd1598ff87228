"""Max over static bins of one axis, whose gradient reaches exactly one cell per bin.

The one building block of the fast max pools: a bin is a static half-open cell range
``[start, end)`` of one axis; bins may overlap or repeat cells. A rectangular window's
max is the max over its rows of the per-row max over its columns, so 2-D pools are two
of these (:func:`window_max`), columns first.

Why a hand-written gradient: XLA's default backward of a max pool (select-and-scatter)
or of a gathered max (scatter-add) is slow on CPU, and ``jnp.max`` splits the gradient
between tied cells. Here the backward recomputes, from the saved input and output, the
position of each bin's maximum and routes the cotangent there with compares and selects
only (fused element-wise work, no scatter).

Tie rule (documented, tested): a bin's gradient goes to the FIRST cell holding its max,
in index order along the axis; for :func:`window_max` that is the first in row-major
order (smallest row, then smallest column) of the window. Ties are never split. A bin
whose max is NaN passes no gradient. This is also the rule of XLA's default max-pool
gradient, so without NaNs the values equal it.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Edges = tuple[tuple[int, int], ...]  # static (start, end) per bin, half-open


def tiled_edges(count: int, k: int) -> Edges:
    """``count`` consecutive, non-overlapping bins of ``k`` cells from cell 0 (a floor-mode
    k x k / stride k pool's windows along one axis)."""
    return tuple((i * k, i * k + k) for i in range(count))


def _widest(edges: Edges) -> int:
    return max(e - s for s, e in edges)


def _is_tiled(edges: Edges) -> bool:
    k = _widest(edges)
    return all((s, e) == (i * k, i * k + k) for i, (s, e) in enumerate(edges))


def _uniform(edges: Edges) -> tuple[int, int] | None:
    """(k, s) when the bins are windows of k cells at stride s from cell 0 (k > s: they
    overlap), e.g. every level of the paper's 13-cell map; else None."""
    k, n = edges[0][1] - edges[0][0], len(edges)
    st = edges[1][0] - edges[0][0] if n > 1 else 1
    if st < 1 or edges[0][0] != 0 or any((a, b) != (i * st, i * st + k) for i, (a, b) in enumerate(edges)):
        return None
    return k, st


def _strided(x, axis: int, n: int, j: int, st: int):
    """Cell j of each of the n windows at stride st: (..., a, ...) -> (..., n, ...)."""
    return lax.slice_in_dim(x, j, j + st * (n - 1) + 1, stride=st, axis=axis)


def _strided_max(x, axis: int, n: int, k: int, st: int):
    """(..., a, ...) -> (..., n, ...): max over n windows of k cells at stride st from cell 0,
    the element-wise max of k strided slices (XLA fuses it with the op that makes ``x``)."""
    return functools.reduce(jnp.maximum, [_strided(x, axis, n, j, st) for j in range(k)])


def _tiles(x, axis: int, edges: Edges):
    """Tiled bins: (..., a, ...) -> (..., n, k, ...), a crop and a reshape."""
    n, k = len(edges), _widest(edges)
    x = lax.slice_in_dim(x, 0, n * k, axis=axis)
    return x.reshape(x.shape[:axis] + (n, k) + x.shape[axis + 1:])


def _along(v, axis: int, ndim: int):
    """1-D ``v`` shaped to broadcast along ``axis`` of an ``ndim`` array."""
    return jnp.asarray(v).reshape((1,) * axis + (-1,) + (1,) * (ndim - axis - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def axis_bin_max(x, axis: int, edges: Edges):
    """(..., a, ...) -> (..., n, ...): max of ``x`` over each of the n bins of ``axis``.

    ``edges`` is a static tuple of (start, end) with 0 <= start < end <= a.
    Gradient: see the module docstring (first max along the axis, ties not split).
    Tiled bins are a reshape; equal windows at a stride (every level of the paper's 13-cell
    map) a max of k strided slices, 4x faster than a slice per bin on 128x13x13x256; other
    bins (e.g. level 6 of a 10-cell axis) an element-wise max of their one-cell slices, which
    XLA fuses into one pass (a slice and a reduction per bin were 12 passes: 1.8x slower
    forward on 128x10x10x256; XLA's CPU gathers are slower still).
    """
    if _is_tiled(edges):
        return jnp.max(_tiles(x, axis, edges), axis=axis + 1)
    if (ks := _uniform(edges)) is not None:  # overlapping windows: k strided slices, fused max
        return _strided_max(x, axis, len(edges), *ks)
    return jnp.concatenate([functools.reduce(jnp.maximum, _cells(x, axis, s, e)) for s, e in edges],
                           axis=axis)


def _cells(x, axis: int, start: int, end: int) -> list:
    """The one-cell slices ``x[..., i:i+1, ...]`` for i in [start, end)."""
    return [lax.slice_in_dim(x, i, i + 1, axis=axis) for i in range(start, end)]


def _fwd(x, axis, edges):
    y = axis_bin_max(x, axis, edges)
    return y, (x, y)


def _one_hot_first(win, y, g, axis: int):
    """Cotangent of the cells of ``win`` (bins along axis + 1): ``g`` at each bin's first max."""
    w = win.shape[axis + 1]
    k = _along(np.arange(w), axis + 1, win.ndim)
    first = jnp.min(jnp.where(win == jnp.expand_dims(y, axis + 1), k, w), axis=axis + 1,
                    keepdims=True)  # w where no cell matches (a NaN max): no gradient
    return jnp.where(k == first, jnp.expand_dims(g, axis + 1), jnp.zeros((), g.dtype))


def _bwd(axis, edges, res, g):
    x, y = res
    if _is_tiled(edges):
        d = _one_hot_first(_tiles(x, axis, edges), y, g, axis)
        d = d.reshape(d.shape[:axis] + (-1,) + d.shape[axis + 2:])
        pad = [(0, 0)] * d.ndim
        pad[axis] = (0, x.shape[axis] - d.shape[axis])  # cells past the last bin get nothing
        return (jnp.pad(d, pad),)
    if (ks := _uniform(edges)) is not None:
        return (_strided_bwd(x, y, g, axis, len(edges), *ks),)
    # Other bins: each bin's cotangent goes to its first cell equal to its max (a running
    # "taken" mask over its cells, element-wise), then every cell sums the (static, at most
    # a few) bins that hold it.
    zero = jnp.zeros((), g.dtype)
    to_cell: dict[int, list] = {}
    for i, (s, e) in enumerate(edges):
        y_i, g_i = (lax.slice_in_dim(v, i, i + 1, axis=axis) for v in (y, g))
        taken = None
        for cell, x_c in zip(range(s, e), _cells(x, axis, s, e)):
            hit = (x_c == y_i) if taken is None else (x_c == y_i) & ~taken
            taken = hit if taken is None else taken | hit
            to_cell.setdefault(cell, []).append(jnp.where(hit, g_i, zero))
    parts = [functools.reduce(jnp.add, to_cell[cell]) if cell in to_cell else
             jnp.zeros(x.shape[:axis] + (1,) + x.shape[axis + 1:], g.dtype)
             for cell in range(x.shape[axis])]
    return (jnp.concatenate(parts, axis=axis),)


def _strided_bwd(x, y, g, axis: int, n: int, k: int, st: int):
    """Uniform overlapping windows: offset j of every window is a strided slice, so the
    first max is found offset by offset (element-wise). Cell st * i + j receives offset j
    of window i: in phase j % st, shifted by j // st, so each phase is a sum of shifted
    copies and the phases interleave by a stack and a reshape (no scatter)."""
    zero = jnp.zeros((), g.dtype)
    taken = jnp.zeros(y.shape, bool)
    q = -(-x.shape[axis] // st) + 1  # rows of the (q, st) phase layout, enough for any j
    phases = [None] * st
    for j in range(k):
        hit = (_strided(x, axis, n, j, st) == y) & ~taken
        taken = taken | hit
        cfg = [(0, 0)] * x.ndim
        cfg[axis] = (j // st, q - n - j // st)
        part = jnp.pad(jnp.where(hit, g, zero), cfg)
        phases[j % st] = part if phases[j % st] is None else phases[j % st] + part
    shape = list(y.shape)
    shape[axis] = q
    phases = [p if p is not None else jnp.zeros(shape, g.dtype) for p in phases]
    dx = jnp.stack(phases, axis=axis + 1)
    dx = dx.reshape(dx.shape[:axis] + (q * st,) + dx.shape[axis + 2:])
    return lax.slice_in_dim(dx, 0, x.shape[axis], axis=axis)


axis_bin_max.defvjp(_fwd, _bwd)


def window_max(x, rows: Edges, cols: Edges, fused: bool = False):
    """(B, H, W, C) -> (B, len(rows), len(cols), C): max over each rows x cols window.

    Gradient to the first max in row-major order of each window (module docstring):
    the column stage picks each row's first max column, the row stage the first row
    holding the window's max. Windows that tile both axes (kernel = stride pools, the
    tiled pyramid levels) take :func:`tiled_max` (``fused``: see there), and equal windows
    at a stride on both axes :func:`strided_max` (a one-pass backward); same values, same
    rule.
    """
    rows, cols = tuple(rows), tuple(cols)
    if _is_tiled(rows) and _is_tiled(cols):
        return tiled_max(x, (len(rows), _widest(rows)), (len(cols), _widest(cols)), fused)
    if (ur := _uniform(rows)) is not None and (uc := _uniform(cols)) is not None:
        return strided_max(x, (len(rows), *ur), (len(cols), *uc))
    return bin_max(bin_max(x, 2, cols), 1, rows)


Strided = tuple[int, int, int]  # (n windows, k cells each, stride s) along one axis, from cell 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def strided_max(x, rows: Strided, cols: Strided):
    """(B, H, W, C) -> (B, n, m, C): max over the windows of kh x kw cells at strides
    (sh, sw) from cell (0, 0) (``rows = (n, kh, sh)``, ``cols = (m, kw, sw)``): every pyramid
    level of the paper's 13x13 map, ZF-5's 3x3 / 2 pools. The separable forward of
    :func:`window_max`; the backward is one element-wise pass over the map.

    Why: the separable backward (a column stage, then a row stage, each locating its first
    max and placing the cotangents by padded, interleaved copies) makes XLA emit loops with
    per-element branches over the map, twice. Here each window's first max (row-major) is
    located once on the small (B, n, m, C) side as an offset code, and every map cell then
    compares the codes of the few windows that hold it (one select per window shift, no pad
    or concatenation in the map-sized loop). ``pool`` forward+backward on 128x13x13x256 2.0x
    faster (2026-12-06, 30 alternated pairs; bench row 1). (Periodic bins, e.g. level 6 of
    a 10-cell axis, need a select per bin kind in that loop, nine for 10x10: 0.58x, so they
    keep the separable backward.)
    """
    return _strided_max(_strided_max(x, 2, *cols), 1, *rows)


def _strided_fwd(x, rows, cols):
    y = strided_max(x, rows, cols)
    return y, (x, y)


def _first_code(x, y, rows: Strided, cols: Strided):
    """(B, n, m, C) int32: offset code dr * kw + dc of each window's first max cell
    (row-major), -1 where no cell equals the max (a NaN max: no gradient). A chain of
    selects, which XLA fuses into the map-sized consumer: recomputing it there was faster
    than materializing it (as an arg-max reduction: forward+backward 2.1x slower)."""
    (n, kh, sh), (m, kw, sw) = rows, cols
    code = jnp.full(y.shape, -1, jnp.int32)
    for dr in reversed(range(kh)):  # reversed: the first hit in row-major order wins
        for dc in reversed(range(kw)):
            cells = _strided(_strided(x, 1, n, dr, sh), 2, m, dc, sw)  # cell (dr, dc) of each window
            code = jnp.where(cells == y, np.int32(dr * kw + dc), code)
    return code


def _cell_codes(d: tuple[int, int], rows: Strided, cols: Strided):
    """(sh, sw) int32: the code that cell (e, f) of a (sh, sw) phase block has in the window
    starting (dh, dw) strides before the block; -2 (matches nothing) where it is outside."""
    (_, kh, sh), (_, kw, sw) = rows, cols
    dr, dc = d[0] * sh + np.arange(sh), d[1] * sw + np.arange(sw)
    ok = (dr < kh)[:, None] & (dc < kw)[None, :]
    return jnp.asarray(np.where(ok, dr[:, None] * kw + dc[None, :], -2).astype(np.int32))


def _strided_2d_bwd(rows, cols, res, g):
    # The map as (qh, sh, qw, sw) phase blocks: cell (p * sh + e, r * sw + f) is offset
    # (dh * sh + e, dw * sw + f) of window (p - dh, r - dw), for dh < ceil(kh / sh).
    x, y = res
    b, h, w, c = x.shape
    (n, kh, sh), (m, kw, sw) = rows, cols
    oh, ow = (kh - 1) // sh, (kw - 1) // sw  # how many strides a window reaches past its own
    qh, qw = max(n + oh, -(-h // sh)), max(m + ow, -(-w // sw))
    pad = ((0, 0), (oh, qh - n), (ow, qw - m), (0, 0))
    code, g = jnp.pad(_first_code(x, y, rows, cols), pad, constant_values=-1), jnp.pad(g, pad)
    zero, dx = jnp.zeros((), g.dtype), None
    for dh in range(oh + 1):
        for dw in range(ow + 1):
            at = lambda v: lax.slice(v, (0, oh - dh, ow - dw, 0),  # noqa: E731
                                     (b, oh - dh + qh, ow - dw + qw, c))[:, :, None, :, None]
            want = _cell_codes((dh, dw), rows, cols)[None, None, :, None, :, None]
            part = jnp.where(at(code) == want, at(g), zero)
            dx = part if dx is None else dx + part
    return (dx.reshape(b, qh * sh, qw * sw, c)[:, :h, :w],)


strided_max.defvjp(_strided_fwd, _strided_2d_bwd)


def _period(edges: Edges, a: int) -> tuple[int, int] | None:
    """(p, s) when the bins repeat every p bins shifted by s cells, each period's bins lie in
    its own s cells and the periods tile the a-cell axis (s * n / p = a); the shortest such p.
    Appendix A bins do whenever gcd(a, n) > 1: n = 6 bins of a 10-cell axis are twice the 3
    bins [0,2) [1,4) [3,5) of 5 cells. None when there is no shorter period."""
    n = len(edges)
    for p in range(1, n):
        s = edges[p][0] - edges[0][0]
        if n % p or edges[0][0] != 0 or s * (n // p) != a or max(e for _, e in edges[:p]) > s:
            continue
        if all((b0 + s, b1 + s) == edges[i + p] for i, (b0, b1) in enumerate(edges[:n - p])):
            return p, s
    return None


def bin_max(x, axis: int, edges: Edges):
    """:func:`axis_bin_max`, with periodic bins (:func:`_period`) pooled as one period of
    bins over an axis reshaped to (periods, cells per period): same values, same gradient
    (a reshape keeps each bin's cells in order). Why: the uneven bins' slice-per-cell forward
    and backward then take half the (larger) ops on a 10-cell axis; ``pool`` forward+backward
    on 128x10x10x256 and 32x10x10x32 1.11x faster (2026-12-06, alternated pairs)."""
    edges = tuple(edges)
    if (_is_tiled(edges) or _uniform(edges) is not None
            or (ps := _period(edges, x.shape[axis])) is None):
        return axis_bin_max(x, axis, edges)
    p, s = ps
    shape = x.shape[:axis] + (len(edges) // p, s) + x.shape[axis + 1:]
    y = axis_bin_max(x.reshape(shape), axis + 1, edges[:p])
    return y.reshape(x.shape[:axis] + (len(edges),) + x.shape[axis + 1:])


def _tiled_stages(x, rows: tuple[int, int], cols: tuple[int, int], fused: bool):
    """(column maxima (B, H, m, C), window maxima (B, n, m, C)) of tiled windows: strided
    maxima when ``fused``, else :func:`axis_bin_max`'s reshape-and-reduce per axis."""
    (n, kh), (m, kw) = rows, cols
    if fused:
        y_cols = _strided_max(x, 2, m, kw, kw)
        return y_cols, _strided_max(y_cols, 1, n, kh, kh)
    y_cols = axis_bin_max(x, 2, tiled_edges(m, kw))
    return y_cols, axis_bin_max(y_cols, 1, tiled_edges(n, kh))


def _blocks(x, rows: tuple[int, int], cols: tuple[int, int]):
    """(B, H, W, C) -> (B, n, kh, m, kw, C): the tiled windows, a crop and a reshape."""
    (n, kh), (m, kw) = rows, cols
    x = x[:, :n * kh, :m * kw]
    return x.reshape(x.shape[0], n, kh, m, kw, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def tiled_max(x, rows: tuple[int, int], cols: tuple[int, int], fused: bool = False):
    """(B, H, W, C) -> (B, n, m, C): max over the n x m windows of kh x kw cells that tile
    the map from cell (0, 0) (``rows = (n, kh)``, ``cols = (m, kw)``; cells past the last
    window are never read).

    Two formulations, same values and gradient (each window's first max cell in row-major
    order, as :func:`window_max`), because neither is fastest everywhere on CPU:

    - ``fused=False`` (``pool``'s pyramid levels): one reduction over both window axes of a
      reshape; reads the map once and leaves no (B, H, m, C) intermediate: ``pool`` forward on
      32x18x18x512 1.32-1.37x faster than a reduction per axis, and 4-5x faster than the
      strided maxima below (2026-12-06; XLA hands the reduction to its YNN library).
    - ``fused=True`` (the backbones' kernel = stride pools, right after a ReLU): element-wise
      maxima of strided slices, columns then rows, which XLA fuses with the ReLU; as a
      separate YNN reduction (the library's compile options keep YNN's reductions) the pools
      made the embedded Overfeat-7's conv forward 1.34-1.41x slower, full-width 1.13-1.19x.
    """
    if fused:
        return _tiled_stages(x, rows, cols, True)[1]
    return jnp.max(_blocks(x, rows, cols), axis=(2, 4))


def _tiled_fwd(x, rows, cols, fused):
    # The column maxima are kept for the backward, which applies axis_bin_max's tiled rule
    # per axis (a one-pass 2-D backward, first max over both window axes, was 0.85-0.97x as
    # fast forward+backward).
    y_cols, y = _tiled_stages(x, rows, cols, fused)
    return y, (x, y_cols, y)


def _tiled_bwd(rows, cols, fused, res, g):
    x, y_cols, y = res
    row_edges, col_edges = tiled_edges(*rows), tiled_edges(*cols)
    (g_cols,) = _bwd(1, row_edges, (y_cols, y), g)
    return _bwd(2, col_edges, (x, y_cols), g_cols)


tiled_max.defvjp(_tiled_fwd, _tiled_bwd)


def as_edges(pairs: Sequence[Sequence[int]]) -> Edges:
    return tuple((int(s), int(e)) for s, e in pairs)
