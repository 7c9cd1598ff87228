"""Layer specs and the small layers the Table-1 backbones are built from.

A backbone is a tuple of specs (:class:`Conv`, :class:`Pool`, :class:`LRN`);
the Flax module and the receptive-field geometry are both derived from the same
tuple, so they cannot disagree.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from spp_jax import binmax
from spp_jax.models import convolution, space_to_depth


@dataclasses.dataclass(frozen=True)
class Conv:
    """k x k convolution, ``features`` outputs, stride, symmetric zero padding, then ReLU."""

    name: str
    features: int
    kernel: int
    stride: int = 1
    pad: int = 0


@dataclasses.dataclass(frozen=True)
class Pool:
    """k x k max pooling.

    ceil_mode=True is Caffe's rule (output ceil((in - k) / s) + 1; the last window
    may hang over the right/bottom edge, where it sees only real cells), which the
    released ZF-5 uses to get 55 and 13; False is the usual floor rule.
    """

    name: str
    kernel: int
    stride: int
    ceil_mode: bool = False


@dataclasses.dataclass(frozen=True)
class LRN:
    """Local response normalisation.

    within_channel (Caffe WITHIN_CHANNEL, the released ZF-5: size 3, alpha 5e-5,
    beta 0.75): x / (1 + alpha * mean_{size x size window} x^2) ** beta, the window
    zero-padded so the mean always divides by size*size (as Caffe's AVE pooling
    over the padded map does).
    across_channels (AlexNet / cuda-convnet, size 5, alpha 1e-4, beta 0.75):
    x / (k + alpha / size * sum_{size neighbouring channels} x^2) ** beta.
    """

    name: str
    size: int = 3
    alpha: float = 5e-5
    beta: float = 0.75
    within_channel: bool = True
    k: float = 1.0


def conv_out(size: int, spec: Conv) -> int:
    return (size + 2 * spec.pad - spec.kernel) // spec.stride + 1


def pool_out(size: int, spec: Pool) -> int:
    if spec.ceil_mode:
        return -(-(size - spec.kernel) // spec.stride) + 1
    return (size - spec.kernel) // spec.stride + 1


def spec_out_size(size: int, spec) -> int:
    """Output side length of one layer for an input side length (ints)."""
    if isinstance(spec, Conv):
        out = conv_out(size, spec)
    elif isinstance(spec, Pool):
        out = pool_out(size, spec)
    else:
        out = size
    if out < 1:
        raise ValueError(f"input side {size} is too small for layer {spec.name} "
                         f"(kernel {getattr(spec, 'kernel', '?')}): output side {out}")
    return out


def max_pool(x, spec: Pool):
    """(B, H, W, C) -> max pooled (B, H', W', C) with Caffe ceil mode if asked.

    Gradient: to each window's first max cell in row-major order (XLA's own rule; ties
    are not split). On CPU XLA's select-and-scatter backward is slow, so pools go through
    :func:`spp_jax.binmax.window_max` (a compare-and-select backward), same values and
    gradients, ties included:

    - windows that tile the map (kernel = stride, none past the edge: Overfeat's pool1 and
      pool2): strided maxima that fuse with the ReLU before them; 3-12x faster per op, the
      embedded Overfeat-7 train step 1.2x (bench rows "3 pools", 2026-12-05);
    - overlapping windows (kernel > stride: ZF-5's 3x3 / 2 ceil-mode pools): equal windows
      at a stride over the map padded with -inf where a ceil-mode window hangs over the
      edge (padding never gets a gradient: a window's first cell is real, comes first in
      row-major order and is never below -inf); the embedded ZF-5 train step 1.18-1.24x
      faster (bench rows "3 pools", 2026-12-06).

    Other pools (kernel < stride): :func:`reduce_window_pool`.
    """
    h, w = x.shape[1], x.shape[2]
    oh, ow = spec_out_size(h, spec), spec_out_size(w, spec)
    k, s = spec.kernel, spec.stride
    if k == s and oh * k <= h and ow * k <= w:
        return binmax.window_max(x, binmax.tiled_edges(oh, k), binmax.tiled_edges(ow, k), fused=True)
    if k > s:
        ph, pw = _overhang(h, oh, spec), _overhang(w, ow, spec)
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=-jnp.inf)
        windows = lambda n: tuple((i * s, i * s + k) for i in range(n))  # noqa: E731
        return binmax.window_max(x, windows(oh), windows(ow))
    return reduce_window_pool(x, spec)


def _overhang(size: int, out: int, spec: Pool) -> int:
    """Cells the last ceil-mode window reaches past the edge of a ``size``-cell axis."""
    return max(0, (out - 1) * spec.stride + spec.kernel - size)


def reduce_window_pool(x, spec: Pool):
    """:func:`max_pool` as one ``lax.reduce_window`` for any pool (XLA's own backward)."""
    h, w = x.shape[1], x.shape[2]
    oh, ow = spec_out_size(h, spec), spec_out_size(w, spec)
    # Extra right/bottom padding with -inf so the ceil-mode last window sees only real cells.
    ph, pw = _overhang(h, oh, spec), _overhang(w, ow, spec)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, spec.kernel, spec.kernel, 1),
                             (1, spec.stride, spec.stride, 1),
                             ((0, 0), (0, ph), (0, pw), (0, 0)))


def _pow_neg_beta(s, beta: float):
    # s ** -0.75 as rsqrt(s) * sqrt(rsqrt(s)): avoids a general pow (exp/log), which
    # costs a large share of ZF-5's forward time on CPU.
    if beta == 0.75:
        r = lax.rsqrt(s)
        return r * jnp.sqrt(r)
    return s ** (-beta)


def box_sum(v, size: int):
    """(B, H, W, C) -> (B, H, W, C): each cell's sum over the ``size`` x ``size`` window
    centred on it (``size`` odd), zero beyond the map.

    Two 1-D passes of shifted adds (rows, then columns) that XLA fuses into element-wise
    loops; a 2-D ``reduce_window`` sum runs as a slow generic loop on CPU. The sum is
    self-adjoint (a centred window with zero padding), which :func:`lrn`'s backward uses.
    """
    if size % 2 != 1:
        raise ValueError(f"LRN window size must be odd, got {size}")
    p, (h, w) = size // 2, v.shape[1:3]
    rows = jnp.pad(v, ((0, 0), (p, p), (0, 0), (0, 0)))
    v = sum(rows[:, i:i + h] for i in range(size))
    cols = jnp.pad(v, ((0, 0), (0, 0), (p, p), (0, 0)))
    return sum(cols[:, :, j:j + w] for j in range(size))


def _within_scale(x, spec: LRN):
    """k + alpha * (zero-padded size x size mean of x^2), per cell."""
    return spec.k + (spec.alpha / (spec.size * spec.size)) * box_sum(jnp.square(x), spec.size)


def _within_fwd(x, spec: LRN):
    """(LRN output, residuals (x, s)) with s the per-cell scale."""
    s = _within_scale(x, spec)
    return x * _pow_neg_beta(s, spec.beta), (x, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _within_channel_lrn(x, spec: LRN):
    return _within_fwd(x, spec)[0]


def _within_bwd(spec: LRN, res, g):
    # y = x s^-b with s = k + a box(x^2), a = alpha / size^2; box is self-adjoint, so
    # dx = g s^-b - 2 a b x box(g x s^(-b-1)): one more box sum, no reduce_window transpose.
    # Closed form, 1.07-1.13x on the embedded ZF-5 train step (autodiff of the same forward:
    # 0.96-0.97x; "How it is fast", bench rows "3 LRN").
    x, s = res
    q = _pow_neg_beta(s, spec.beta)
    a = spec.alpha / (spec.size * spec.size)
    return (g * q - (2.0 * a * spec.beta) * x * box_sum(g * x * q / s, spec.size),)


_within_channel_lrn.defvjp(_within_fwd, _within_bwd)


def lrn(x, spec: LRN):
    """Local response normalisation of (B, H, W, C) maps (see :class:`LRN`).

    Within-channel LRN (ZF-5's, Overfeat's) has a hand-written gradient
    (:func:`_within_bwd`); across channels it is XLA's autodiff of a ``reduce_window`` sum
    (:func:`reduce_window_lrn`).
    """
    if spec.within_channel:
        return _within_channel_lrn(x, spec)
    return reduce_window_lrn(x, spec)


def reduce_window_lrn(x, spec: LRN):
    """:func:`lrn` as autodiff of a ``reduce_window`` sum, within or across channels (the
    library's within-channel LRN until 2026-12-06): the reference of tests and of bench rows
    "3 LRN"."""
    sq = jnp.square(x)
    p = spec.size // 2
    if spec.within_channel:
        total = lax.reduce_window(sq, 0.0, lax.add, (1, spec.size, spec.size, 1), (1, 1, 1, 1),
                                  ((0, 0), (p, p), (p, p), (0, 0)))
        scale = spec.k + spec.alpha * total / (spec.size * spec.size)
    else:
        total = lax.reduce_window(sq, 0.0, lax.add, (1, 1, 1, spec.size), (1, 1, 1, 1),
                                  ((0, 0), (0, 0), (0, 0), (p, p)))
        scale = spec.k + spec.alpha / spec.size * total
    return x * _pow_neg_beta(scale, spec.beta)


# Why conv1 is convolved on blocks only when in_channels x filters is at most this: the
# blocks' forward was 1.06-1.69x faster for 1 channel x 12-96 filters and 3 x 12-24, but
# 1.03x for 3 x 48 and 0.92x for 3 x 96 (full-width colour conv1, batch 8 @224; 2026-12-06).
BLOCK_CONV_MAX_UNITS = 96


def input_conv(x, kernel, stride: int, pad: int):
    """conv1 of the backbones: (B, H, W, C) x (k, k, C, F) -> (B, H', W', F), zero-padded by
    ``pad``. On the native CPU kernels where they take it (:mod:`spp_jax.models.convolution`);
    otherwise small strided layers (C x F <= :data:`BLOCK_CONV_MAX_UNITS`) run on space-to-depth
    blocks (:mod:`spp_jax.models.space_to_depth`), others as XLA's strided convolution; same
    values up to float rounding, same gradient."""
    pads = ((pad, pad), (pad, pad))
    if (stride > 1 and kernel.shape[2] * kernel.shape[3] <= BLOCK_CONV_MAX_UNITS
            and not convolution.native_conv_takes(x, kernel, stride, pads)):
        return space_to_depth.conv(x, kernel, stride, pad)
    return convolution.conv_general_dilated(x, kernel, (stride, stride), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def receptive_layers(specs):
    """(kernel, stride, left_pad) of every layer that moves cell centres, in order."""
    out = []
    for s in specs:
        if isinstance(s, Conv):
            out.append((s.kernel, s.stride, s.pad))
        elif isinstance(s, Pool):
            out.append((s.kernel, s.stride, 0))
    return out


def total_stride(specs) -> int:
    return math.prod(k[1] for k in receptive_layers(specs))
