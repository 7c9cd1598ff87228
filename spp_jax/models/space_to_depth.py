"""A strided convolution as a stride-1 convolution of space-to-depth blocks.

Why: XLA's CPU convolution is slow for conv1's shapes, few input channels at stride 2 with
few filters. The embedded Overfeat-7's conv1 (gray input: 1 channel, 12 filters, 7x7 / 2,
batch 32 at 224) took 19.5 ms forward where the same convolution on 2x2 blocks (4 channels,
a 4x4 kernel at stride 1) takes 11.5 ms; the embedded train steps of Overfeat-7 and ZF-5
1.08-1.15x faster (2026-12-06, alternated pairs; bench rows "3 conv1"). At full width with
colour input (3 channels x 96 filters) the blocks were 0.92x forward, so
:func:`spp_jax.models.layers.input_conv` uses them only for small layers.

How: cell (s*Y + p, s*X + q, c) of the padded input is channel (p*s + q)*C + c of block
(Y, X); tap (s*KY + p, s*KX + q) of the kernel is tap (KY, KX) of the block kernel on the
same channel, zero where s*KY + p is past the kernel. Each output cell then sums exactly the
products the strided convolution sums (plus products with zero taps), so only float
rounding differs. A one-channel input with few filters takes blocks two outputs wide (s x 2s
cells, each block position computing output columns 2X and 2X + 1 as 2F filters,
:func:`group_columns`): the same sums again, on a wider product that XLA runs faster.

The gradient is the strided convolution's own (the transposes of :func:`strided_conv`): its
weight gradient was faster than the blocks' autodiff (colour input 0.86-0.98x for the
blocks', gray equal; same measurements). The input's cotangent is computed only when the
input is differentiated (``symbolic_zeros``), never for conv1's images in training.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def strided_conv(x, kernel, stride: int, pad: int):
    """(B, H, W, C) x (k, k, C, F) kernel -> (B, H', W', F), H' = (H + 2 pad - k) // stride + 1:
    XLA's convolution, zero-padded by ``pad`` on every side."""
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def group_columns(channels: int, features: int) -> int:
    """Output columns computed per block position: 2 for a one-channel input with at most 24
    filters, else 1. Why: such a layer's stride-1 block convolution has only s*s input channels
    and few filters, too narrow a product for XLA's CPU convolution; two output columns per
    block double both (2 s*s channels, 2F outputs, a few zero taps more). The gray conv1 of
    the embedded Overfeat-7 (1 channel x 12 filters, batch 32) 1.25x faster forward at 224 and
    180 px, 1 x 24 1.13x, the embedded Overfeat-7 train step 1.02x / 1.02x; 3 x 12 was 0.90x,
    1 x 48 and 1 x 96 0.96-0.97x (2026-12-07, alternated pairs)."""
    return 2 if channels == 1 and features <= 24 else 1


def _blocks(x, stride: int, pad: int, nb: tuple[int, int], gw: int):
    """(B, H, W, C) -> (B, nb[0], nb[1], s*s*gw*C): the input padded by ``pad`` (and cropped or
    zero-extended at the bottom/right to the whole blocks that the output reads) cut into
    blocks of s rows x s*gw columns, each block's cells row-major, channels innermost."""
    b, h, w, c = x.shape
    s, (hb, wb) = stride, nb
    # lax.pad takes negative high padding as a crop: rows no output reads are dropped.
    x = lax.pad(x, jnp.zeros((), x.dtype),
                [(0, 0, 0), (pad, s * hb - h - pad, 0), (pad, s * gw * wb - w - pad, 0), (0, 0, 0)])
    x = x.reshape(b, hb, s, wb, s * gw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hb, wb, s * s * gw * c)


def _kernel_blocks(kernel, stride: int, kb: tuple[int, int], gw: int):
    """(k, k, C, F) -> (kb[0], kb[1], s*s*gw*C, gw*F): taps in the channel order of
    :func:`_blocks`; output v * F + o is filter o at output column v of the block, whose taps
    sit s * v cells to the right; zeros past the kernel."""
    k, _, c, f = kernel.shape
    s, (kh, kw) = stride, kb
    parts = []
    for v in range(gw):
        kv = jnp.pad(kernel, ((0, kh * s - k), (s * v, kw * s * gw - k - s * v), (0, 0), (0, 0)))
        kv = kv.reshape(kh, s, kw, s * gw, c, f).transpose(0, 2, 1, 3, 4, 5)
        parts.append(kv.reshape(kh, kw, s * s * gw * c, f))
    return jnp.stack(parts, axis=-2).reshape(kh, kw, s * s * gw * c, gw * f)


def _block_conv(x, kernel, stride: int, pad: int):
    """:func:`strided_conv`'s values as a stride-1 convolution of blocks (module docstring)."""
    k, c, f = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    s, gw = stride, group_columns(c, f)
    oh, ow = ((a + 2 * pad - k) // s + 1 for a in x.shape[1:3])
    kb = (-(-k // s), -(-(k + s * (gw - 1)) // (s * gw)))  # block taps: rows, columns
    owb = -(-ow // gw)
    xb = _blocks(x, s, pad, (oh + kb[0] - 1, owb + kb[1] - 1), gw)
    y = strided_conv(xb, _kernel_blocks(kernel, s, kb, gw), 1, 0)
    return y.reshape(x.shape[0], oh, owb * gw, f)[:, :, :ow]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, stride: int, pad: int):
    """:func:`strided_conv` computed on space-to-depth blocks (module docstring): same shapes,
    same values up to float rounding, the strided convolution's gradient."""
    return _block_conv(x, kernel, stride, pad)


def _fwd(x, kernel, stride, pad):
    # symbolic_zeros: the primals arrive with ``perturbed``, whether they are differentiated.
    # conv1's input is the image, never differentiated in training, and its cotangent would
    # be a whole transposed convolution; the residuals' length carries the flag.
    y = _block_conv(x.value, kernel.value, stride, pad)
    return y, (x.value, kernel.value) + ((None,) if x.perturbed else ())


def _bwd(stride, pad, res, g):
    # The strided convolution's transposes (linear in each argument; no primal recomputed).
    x, kernel = res[:2]
    d_kernel = jax.linear_transpose(lambda w: strided_conv(x, w, stride, pad), kernel)(g)[0]
    if len(res) == 2:
        return None, d_kernel
    d_x = jax.linear_transpose(lambda a: strided_conv(a, kernel, stride, pad), x)(g)[0]
    return d_x, d_kernel


conv.defvjp(_fwd, _bwd, symbolic_zeros=True)
