"""Convolutions on the native CPU kernels (``conv.cc``), differentiable.

``conv(x, kernel, padding, stride)`` computes what ``lax.conv_general_dilated(x, kernel,
(stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))`` computes, float32, up
to float rounding (the same products, summed in another order); its gradient is that
convolution's: the kernel's is a native correlation of the padded input with the output
cotangent; the input's (computed only where used: XLA drops it for conv1's images) is, at
stride 1, the native stride-1 convolution of the padded cotangent with the flipped,
transposed kernel (XLA's own formulation), at larger strides XLA's transpose.

Shapes: x (B, H, W, Ci), kernel (KH, KW, Ci, Co), padding ((top, bottom), (left, right)) with
0 <= each <= kernel side - 1 -> (B, (H + top + bottom - KH) // s + 1, (W + left + right - KW)
// s + 1, Co). The kernels take output channels in vectors of 16: fewer than 16 are stored in
part, other counts are padded with zero filters and the extra outputs dropped.

Which passes run natively, from alternated-pair timings against XLA's convolution in one
process (2026-12-07, batch 32, the embedded Overfeat-7's layers at 224): the forward (conv1
gray 1 -> 12 7x7 / 2: 1.33x against its space-to-depth blocks; conv2 12 -> 32 5x5 at 36x36:
1.36x; conv4 64 -> 64 3x3 at 18x18: 1.08x; conv3 32 -> 64: 1.00x) and the kernel gradient
(1.8x / 2.2x / 1.4x / 1.3x) always; the input's cotangent only when it has at least
:data:`NATIVE_INPUT_GRAD_CHANNELS` channels (conv4's 64: 1.15x; conv3's 32: 0.92x; all of
them native, conv2's and conv3's too, moved the embedded Overfeat-7 step 1.00x at 224 and 180,
40 pairs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]

NATIVE_INPUT_GRAD_CHANNELS = 64
_LANES = 16
_NHWC = ("NHWC", "HWIO", "NHWC")


def out_size(n: int, k: int, lo: int, hi: int, stride: int) -> int:
    """Output cells along an axis of n cells, padded (lo, hi), for a k-cell kernel."""
    return (n + lo + hi - k) // stride + 1


def supported(x_shape, kernel_shape, padding, stride: int, dtype) -> bool:
    """Whether :func:`conv` takes this convolution: rank-4 float32 operands whose padding
    lies within the kernel and whose output is not empty."""
    if dtype != jnp.float32 or len(x_shape) != 4 or len(kernel_shape) != 4 or stride < 1:
        return False
    if kernel_shape[2] != x_shape[3]:
        return False
    ok = all(0 <= p <= k - 1 for (lo, hi), k in zip(padding, kernel_shape[:2]) for p in (lo, hi))
    out = [out_size(n, k, lo, hi, stride)
           for n, (lo, hi), k in zip(x_shape[1:3], padding, kernel_shape[:2])]
    return ok and min(out) >= 1


def _pad_hw(x, padding: Padding):
    return jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))


def _round_up(n: int) -> int:
    return -(-n // _LANES) * _LANES


def _pad_channels(a, axis: int, to: int):
    """Zero channels along ``axis`` up to ``to``."""
    if a.shape[axis] == to:
        return a
    cfg = [(0, 0)] * a.ndim
    cfg[axis] = (0, to - a.shape[axis])
    return jnp.pad(a, cfg)


def _out_channels(co: int) -> int:
    """Channels of the kernels' output (and cotangent) buffer for co filters: co itself when
    a multiple of 16 or fewer than 16 (stored in part), else padded up to a multiple of 16."""
    return co if co < _LANES or co % _LANES == 0 else _round_up(co)


def _valid(xp, kernel, stride: int = 1):
    """(B, Hp, Wp, Ci) padded input x (KH, KW, Ci, Co) -> (B, (Hp-KH)//s+1, (Wp-KW)//s+1, Co)."""
    co = kernel.shape[3]
    kernel = _pad_channels(kernel, 3, _round_up(co))
    b, h, w, _ = xp.shape
    kh, kw = kernel.shape[:2]
    out = jax.ShapeDtypeStruct((b, (h - kh) // stride + 1, (w - kw) // stride + 1,
                                _out_channels(co)), jnp.float32)
    y = jax.ffi.ffi_call("spp_conv_forward", out, vmap_method="sequential")(
        xp, kernel, stride=np.int64(stride))
    return y[..., :co] if out.shape[3] != co else y


def _kernel_grad(xp, dy, kh: int, kw: int, stride: int = 1):
    """(KH, KW, Ci, Co): sum over the output cells of padded-input patch x output cotangent."""
    co = dy.shape[3]
    dy = _pad_channels(dy, 3, _out_channels(co))
    out = jax.ShapeDtypeStruct((kh, kw, xp.shape[3], _round_up(co)), jnp.float32)
    dk = jax.ffi.ffi_call("spp_conv_kernel_grad", out, vmap_method="sequential")(
        xp, dy, stride=np.int64(stride))
    return dk[..., :co] if out.shape[3] != co else dk


def _input_grad(dy, kernel, padding: Padding, stride: int, x_shape):
    """(B, H, W, Ci). Stride 1: the padded cotangent convolved with the flipped, transposed
    kernel, the padding's cells dropped (offsets k - 1 - pad on each side). Larger strides:
    XLA's transpose of its strided convolution."""
    kh, kw, ci, _ = kernel.shape
    if stride > 1:
        f = lambda a: lax.conv_general_dilated(a, kernel, (stride, stride), padding,  # noqa: E731
                                               dimension_numbers=_NHWC)
        return jax.linear_transpose(f, jax.ShapeDtypeStruct(x_shape, dy.dtype))(dy)[0]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    back = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
            (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    if ci >= NATIVE_INPUT_GRAD_CHANNELS:
        return _valid(_pad_hw(dy, back), flipped)
    return lax.conv_general_dilated(dy, flipped, (1, 1), back, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, padding: Padding, stride: int = 1):
    """(B, H, W, Ci) x (KH, KW, Ci, Co) -> the convolution at ``stride`` (module docstring)."""
    return _valid(_pad_hw(x, padding), kernel, stride)


def _conv_fwd(x, kernel, padding, stride):
    xp = _pad_hw(x, padding)
    return _valid(xp, kernel, stride), (xp, kernel)


def _conv_bwd(padding, stride, res, dy):
    xp, kernel = res
    kh, kw = kernel.shape[:2]
    (t, b), (l, r) = padding
    x_shape = (xp.shape[0], xp.shape[1] - t - b, xp.shape[2] - l - r, xp.shape[3])
    return (_input_grad(dy, kernel, padding, stride, x_shape),
            _kernel_grad(xp, dy, kh, kw, stride))


conv.defvjp(_conv_fwd, _conv_bwd)
