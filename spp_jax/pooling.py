"""Spatial pyramid pooling of whole feature maps: ``spp_jax.pool``.

The pooled vector of a (B, H, W, C) map is laid out as

    [level 0 bins | level 1 bins | ...]   levels in the order given,
    each level: bins row-major (top row first, left to right), channels innermost,

i.e. ``concat([p_n.reshape(B, n*n*C) for n in levels])`` where ``p_n`` is the
(B, n, n, C) array of bin maxima.  (The released Caffe model orders levels
1, 2, 3, 6 and flattens channel-major; :func:`caffe_permutation` maps between
the two.)
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import binmax
from spp_jax import bins as B
from spp_jax import native
from spp_jax.native import pool as native_pool

MODES = ("appendix_a", "window_stride", "released")

def _check_fmap(fmap, rank: int, what: str):
    shape = getattr(fmap, "shape", None)
    if shape is None:
        raise TypeError(f"{what} must be an array, got {type(fmap).__name__}")
    if len(shape) != rank:
        want = "(B, H, W, C)" if rank == 4 else "(H, W, C)"
        raise ValueError(f"{what} must have rank {rank} {want}, got shape {tuple(shape)}")
    if any(d == 0 for d in shape):
        raise ValueError(f"{what} has a zero-size axis: shape {tuple(shape)}")
    if not jnp.issubdtype(fmap.dtype, jnp.floating):
        raise TypeError(f"{what} must have a floating dtype (max pooling of integers is not "
                        f"differentiable and not what SPP-net does), got {fmap.dtype}")

def _coarsen(p, n_from: int, n_to: int):
    """(B, n_from, n_from, C) -> (B, n_to, n_to, C): max over groups of finer bins."""
    m = n_from // n_to
    b, c = p.shape[0], p.shape[-1]
    return p.reshape(b, n_to, m, n_to, m, c).max(axis=(2, 4))

def _check_window_stride(h: int, w: int, levels):
    for n in levels:
        for name, a in (("height", h), ("width", w)):
            d = B.window_stride_bins(a, n)
            if not d.valid:
                raise ValueError(
                    f"mode='window_stride' (Section 2.3: window ceil(a/n), stride floor(a/n)) "
                    f"does not give {n} bins covering the map {name}: {d.describe()}. "
                    f"Use the default mode='appendix_a', which is defined for every size.")

def _edges(a: int, n: int, rule: str) -> binmax.Edges:
    return binmax.as_edges(B.bin_edges(a, n, rule))

def _pyramid(fmap, levels: tuple[int, ...], rule: str) -> dict:
    """{n: (B, n, n, C) bin maxima} of every level.

    A level is pooled from the map separably (:func:`spp_jax.binmax.window_max`: the max
    over each bin's columns, then over its rows) unless its bins are unions of a finer
    level's (the derivation plan: bin (i, j) of level n is the m x m block of bins of
    level n*m starting at (i*m, j*m)); it is then a grouped max of that level's
    (B, n*m, n*m, C) output, a few KB instead of another pass over the map. For the
    default (6, 3, 2, 1) only the 6x6 level touches the map, forward and backward:
    1.4-1.6x faster on 10x10 to 18x18 maps than deriving the coarse levels from the
    per-row column maxima (the previous layout; bench row 1).

    Gradients follow :mod:`spp_jax.binmax`: a directly pooled bin's to its first max cell
    in row-major order; a derived bin's to the first of its finer bins (row-major) holding
    its max, and on to that bin's cell. Ties are never split.
    """
    h, w = fmap.shape[1], fmap.shape[2]
    plan = B.derivation_plan(levels, rule)
    got = {}
    for n in sorted(plan, reverse=True):
        src = plan[n]
        if src == n:
            got[n] = binmax.window_max(fmap, _edges(h, n, rule), _edges(w, n, rule))
        else:
            groups = binmax.tiled_edges(n, src // n)
            got[n] = binmax.window_max(got[src], groups, groups)
    return got

def _native_levels(h: int, w: int, levels: tuple[int, ...], rule: str) -> tuple:
    """:func:`_pyramid`'s plan for the native kernels (:mod:`spp_jax.native.pool`): the
    first occurrence of each directly pooled level from the map, every other level (a
    coarse one, or a repeat) from that occurrence's bins, with the same rules.

    Why native: one call for the whole pyramid, forward and backward, where the XLA
    formulation makes several passes over the map for uneven bins and further ops for the
    coarse levels, their gradients and the concatenation. Against it in one process
    (2026-12-07, 30 alternated pairs): forward+backward 1.5x / 4.4x / 2.3x faster on
    128x13x13x256 / 128x10x10x256 / 32x18x18x512, forward 1.1x / 2.0x / 1.7x."""
    plan = B.derivation_plan(levels, rule)
    first = {n: levels.index(n) for n in levels}
    out = []
    for k, n in enumerate(levels):
        src = plan[n]
        if src == n and first[n] == k:
            out.append(native_pool.Level(_edges(h, n, rule), _edges(w, n, rule)))
        else:
            groups = binmax.tiled_edges(n, src // n)
            out.append(native_pool.Level(groups, groups, first[src]))
    return tuple(out)

@functools.partial(jax.jit, static_argnames=("levels", "mode"))
def _pool(fmap, levels: tuple[int, ...], mode: str):
    _TRACE_COUNT[0] += 1  # lets tests prove a second call with the same shape does not retrace
    # window_stride is only accepted where its windows are exactly the Appendix A bins
    # (checked by pool()), so both modes pool the same bins.
    rule = "released" if mode == "released" else "appendix_a"
    # On a CPU with the native kernels, one native call (same floats, same gradient rules);
    # elsewhere (other backends, several devices, no compiler, SPP_JAX_NATIVE=0) XLA's ops.
    if native_pool.supported(fmap.shape, fmap.dtype) and native.usable():
        h, w = fmap.shape[1], fmap.shape[2]
        return native_pool.pyramid_max(fmap, _native_levels(h, w, levels, rule))
    got = _pyramid(fmap, levels, rule)
    b, c = fmap.shape[0], fmap.shape[-1]
    return jnp.concatenate([got[n].reshape(b, n * n * c) for n in levels], axis=-1)

_TRACE_COUNT = [0]

def pool(fmap: jax.Array, levels: Sequence[int] = B.DEFAULT_LEVELS, *,
         mode: str = "appendix_a") -> jax.Array:
    """Spatial pyramid max pooling of whole feature maps.

    Args:
      fmap: (B, H, W, C) conv feature maps, any floating dtype; any H, W >= 1
        (when H or W is smaller than a level's n, cells repeat: Appendix A).
      levels: bins per side of each pyramid level, default (6, 3, 2, 1).
      mode: ``"appendix_a"`` (default; the paper's Appendix A rule, the faithful
        choice because it is defined for every map size) or ``"window_stride"``
        (Section 2.3's window ceil(a/n) / stride floor(a/n) recipe, for fidelity
        experiments; raises ``ValueError`` where it does not give exactly n bins
        covering the axis, e.g. a = 10, n = 6), or ``"released"`` (the released
        Caffe model's pyramid: its 2x2 level has kernel = stride = ceil(a/2), i.e.
        [0, 7), [7, 13) on a 13-cell map; other levels as Appendix A; see
        :mod:`spp_jax.bins`), to run released weights exactly.

    Returns:
      (B, C * sum(n*n)) array in fmap's dtype; layout in the module docstring.

    Pure and jit-compiled once per (shape, dtype, levels, mode); differentiable
    (a bin's gradient reaches one cell, ties are not split: its first maximal cell in
    row-major order; for a level derived from a finer one, e.g. 3, 2 and 1 from 6, the
    first of its finer bins in row-major order holding the max, then that bin's cell);
    usable under ``jax.vmap`` and inside other jitted functions.
    """
    levels = B.normalize_levels(levels)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    _check_fmap(fmap, 4, "fmap")
    if mode == "window_stride":
        _check_window_stride(fmap.shape[1], fmap.shape[2], levels)
    return _pool(fmap, levels, mode)


def transposed_layout(pooled, channels: int, levels: Sequence[int] = B.DEFAULT_LEVELS):
    """The pooled vectors of transposed maps -> those of the maps themselves: (..., D) -> (..., D).

    Every bin rule pools both axes alike, so bin (i, j) of a map is bin (j, i) of its
    transpose (B, W, H, C): each level's (n, n, C) block swaps its two bin axes. Works on
    NumPy and JAX arrays; its own inverse. (The serving layer pools a tall map as its wide
    transpose, so the two share one compiled program.)
    """
    levels = B.normalize_levels(levels)
    if B.output_dim(channels, levels) != pooled.shape[-1]:
        raise ValueError(f"pooled vectors of length {pooled.shape[-1]} are not {channels} channels "
                         f"x levels {levels} ({B.output_dim(channels, levels)})")
    lead, parts, off = pooled.shape[:-1], [], 0
    for n in levels:
        block = pooled[..., off:off + n * n * channels].reshape(*lead, n, n, channels)
        parts.append(block.swapaxes(-3, -2).reshape(*lead, n * n * channels))
        off += n * n * channels
    xp = np if isinstance(pooled, np.ndarray) else jnp
    return xp.concatenate(parts, axis=-1)


def caffe_permutation(channels: int, levels: Sequence[int] = B.DEFAULT_LEVELS,
                      caffe_order: Sequence[int] = (1, 2, 3, 6)) -> np.ndarray:
    """Index array ``perm`` with ``caffe_vec = ours[..., perm]``.

    The released Caffe model concatenates levels in ``caffe_order`` and flattens
    each level channel-major (C, y, x); ours is levels as given, (y, x, C).
    Useful for loading fc6 weights trained by the released code. Those weights also
    expect the released bins: its 2x2 level pools [0, 7), [7, 13) of the 13x13 map
    (kernel 7, stride 7), not Appendix A's [0, 7), [6, 13); pool with
    ``mode="released"`` (``SPPNet(pool_mode="released")``) to use them exactly.
    """
    levels = B.normalize_levels(levels)
    if sorted(levels) != sorted(caffe_order):
        raise ValueError(f"levels {levels} and caffe_order {tuple(caffe_order)} differ")
    starts, off = {}, 0
    for n in levels:
        starts[n] = off
        off += n * n * channels
    perm = []
    for n in caffe_order:
        yx_c = np.arange(n * n * channels).reshape(n, n, channels)  # our (y, x, C) order
        perm.append(starts[n] + yx_c.transpose(2, 0, 1).reshape(-1))  # read it as (C, y, x)
    return np.concatenate(perm)
