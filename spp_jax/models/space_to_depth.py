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
rounding differs.

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


def _blocks(x, stride: int, pad: int, out_hw: tuple[int, int], kb: int):
    """(B, H, W, C) -> (B, oh + kb - 1, ow + kb - 1, s*s*C): the input padded by ``pad`` (and
    cropped or zero-extended at the bottom/right to whole blocks that the output reads) cut
    into s x s blocks, each block's cells row-major, channels innermost."""
    b, h, w, c = x.shape
    s = stride
    hb, wb = out_hw[0] + kb - 1, out_hw[1] + kb - 1
    # lax.pad takes negative high padding as a crop: rows no output reads are dropped.
    x = lax.pad(x, jnp.zeros((), x.dtype),
                [(0, 0, 0), (pad, s * hb - h - pad, 0), (pad, s * wb - w - pad, 0), (0, 0, 0)])
    x = x.reshape(b, hb, s, wb, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hb, wb, s * s * c)


def _kernel_blocks(kernel, stride: int, kb: int):
    """(k, k, C, F) -> (kb, kb, s*s*C, F), kb = ceil(k / s): taps in the channel order of
    :func:`_blocks`, zeros past the kernel."""
    k, _, c, f = kernel.shape
    s = stride
    kernel = jnp.pad(kernel, ((0, kb * s - k), (0, kb * s - k), (0, 0), (0, 0)))
    kernel = kernel.reshape(kb, s, kb, s, c, f).transpose(0, 2, 1, 3, 4, 5)
    return kernel.reshape(kb, kb, s * s * c, f)


def _block_conv(x, kernel, stride: int, pad: int):
    k = kernel.shape[0]
    out_hw = tuple((a + 2 * pad - k) // stride + 1 for a in x.shape[1:3])
    kb = -(-k // stride)
    return strided_conv(_blocks(x, stride, pad, out_hw, kb), _kernel_blocks(kernel, stride, kb), 1, 0)


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
