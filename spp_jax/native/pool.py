"""Spatial pyramid max pooling on the native CPU kernels (``pool.cc``), differentiable.

``pyramid_max(x, levels)`` pools every level of a pyramid in one call: (B, H, W, C) float32
-> (B, sum(n * m) * C), each level's (n, m, C) bin maxima flattened, levels in the given
order (:mod:`spp_jax.pooling`'s layout). A level is either pooled from the map over static
bins (rows[i] x cols[j] cells, half-open ranges; bins may overlap and repeat cells) or
derived from another level's bins (its rows / cols then count that level's bins), which is
how ``pool`` gets its coarse levels from the finest one.

Values are exact (a max). Gradient: a pooled bin's cotangent reaches its first maximal cell
in row-major order; a derived bin's reaches the first of its source bins in row-major order
holding its max, and that bin's cell; ties are never split; a bin involving a NaN is NaN and
passes none; a cell reached by several bins sums their cotangents (in output order). These
are ``pool``'s documented rules, so the values and gradients equal its XLA formulation's
(:mod:`spp_jax.binmax`) up to the order of those sums.

The forward returns, beside the maxima, each bin's cell (int32, per channel), which the
backward scatters to: the residual is that code, not the map.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Edges = tuple[tuple[int, int], ...]


class Level(NamedTuple):
    """One pyramid level: ``rows`` x ``cols`` bins, pooled from the map (``source`` -1) or
    from the bins of level ``source`` (an index into the same tuple of levels, itself pooled
    from the map)."""

    rows: Edges
    cols: Edges
    source: int = -1


def supported(shape, dtype) -> bool:
    """Whether :func:`pyramid_max` takes a map of this shape and dtype: rank-4 float32 with
    fewer than 2**31 cells per sample (int32 codes)."""
    return dtype == jnp.float32 and len(shape) == 4 and shape[1] * shape[2] < 2 ** 31


def _attrs(levels: tuple[Level, ...]) -> dict:
    """The kernel's ``steps`` (out, src, src_n, n, m, edge start per level; levels pooled from
    the map first) and ``edges`` (each level's rows, then cols)."""
    offsets = np.cumsum([0] + [len(lv.rows) * len(lv.cols) for lv in levels])
    steps, edges = [], []
    for k in sorted(range(len(levels)), key=lambda k: levels[k].source >= 0):
        rows, cols, src = levels[k]
        src_off, src_n = (-1, 0) if src < 0 else (offsets[src], len(levels[src].rows))
        steps += [offsets[k], src_off, src_n, len(rows), len(cols), len(edges)]
        edges += [e for pair in rows + cols for e in pair]
    return {"steps": np.asarray(steps, np.int64), "edges": np.asarray(edges, np.int64)}


def _forward(x, levels: tuple[Level, ...]):
    b, c = x.shape[0], x.shape[3]
    shape = (b, sum(len(lv.rows) * len(lv.cols) for lv in levels), c)
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
    return jax.ffi.ffi_call("spp_pyramid_max", out, vmap_method="sequential")(x, **_attrs(levels))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pyramid_max(x, levels: tuple[Level, ...], hw: tuple[int, int]):
    del hw  # the backward's output shape (the codes do not carry it)
    return _forward(x, levels)[0]


def _fwd(x, levels, hw):
    return _forward(x, levels)


def _bwd(levels, hw, code, g):
    shape = (g.shape[0], *hw, g.shape[2])
    dx = jax.ffi.ffi_call("spp_pyramid_max_grad", jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(g, code, **_attrs(levels))
    return (dx,)


_pyramid_max.defvjp(_fwd, _bwd)


def _check(levels: tuple[Level, ...], h: int, w: int):
    for k, (rows, cols, src) in enumerate(levels):
        if src >= 0 and not (src < len(levels) and levels[src].source < 0
                             and len(levels[src].rows) == len(levels[src].cols)):
            raise ValueError(f"level {k}'s source {src} is not a square level pooled from the map")
        sides = (h, w) if src < 0 else (len(levels[src].rows),) * 2
        for name, edges, a in (("rows", rows, sides[0]), ("cols", cols, sides[1])):
            if not edges or any(not 0 <= s < e <= a for s, e in edges):
                raise ValueError(f"level {k}'s {name} {edges} are not bins of a {a}-cell axis")


def pyramid_max(x, levels) -> jax.Array:
    """(B, H, W, C) float32 -> (B, sum(n * m) * C): every level's bin maxima (module
    docstring); ``levels``: a sequence of :class:`Level` with static edges."""
    levels = tuple(Level(tuple((int(s), int(e)) for s, e in lv[0]),
                         tuple((int(s), int(e)) for s, e in lv[1]), int(lv[2])) for lv in levels)
    _check(levels, x.shape[1], x.shape[2])
    y = _pyramid_max(x, levels, (int(x.shape[1]), int(x.shape[2])))
    return y.reshape(y.shape[0], -1)
