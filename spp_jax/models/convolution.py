"""The backbones' convolution: the native CPU kernels where they apply and win, else XLA's.

Narrow layers (:data:`NATIVE_MAX_UNITS`) run on the direct native kernels
(:mod:`spp_jax.native.conv`); wider 3x3 stride-1 layers by Winograd's F(2x2, 3x3)
(:mod:`spp_jax.native.winograd`); the rest (conv1 and conv2 of the full-width nets) on XLA's.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature (``nn.Conv`` takes it
as its ``conv_general_dilated``; conv1 calls it too); :func:`native_conv_takes` tells conv1
whether to use it or its space-to-depth blocks.
"""
from __future__ import annotations

from jax import lax

from spp_jax import native
from spp_jax.native import conv as native_conv
from spp_jax.native import winograd

_NHWC = ("NHWC", "HWIO", "NHWC")

#: The direct native kernels take a layer of at most this many input x output channels; wider
#: 3x3 stride-1 layers go to Winograd. Why: the direct kernels win on narrow layers (the
#: embedded nets', 64 x 64 and below: see spp_jax.native.conv) and lose where XLA's
#: convolutions become large matrix products (batch 8, alternated pairs, 2026-12-07: 512 ->
#: 512 3x3 at 18x18 forward 0.94x, input gradient 0.88x, kernel gradient 0.57x; 96 -> 256 5x5
#: at 36x36 0.99x / 1.13x / 0.72x; 384 -> 384 at 13x13 0.84x / 0.87x / 0.77x). Winograd beats
#: XLA on every wider 3x3 layer measured and loses to the direct kernels on narrow ones
#: (batch 32, forward / forward+backward against the route's alternative, alternated pairs,
#: 2026-12-07: 512 -> 512 at 18x18 1.94x / 1.83x, 256 -> 512 1.82x / 1.85x, 128 -> 128 1.28x /
#: 1.37x, 384 -> 384 at 13x13 1.41x / 1.44x; but 64 -> 64 at 18x18 0.90x / 0.72x and 32 -> 64
#: 1.13x / 0.86x against the direct kernels).
NATIVE_MAX_UNITS = 64 * 64


def _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
           feature_group_count) -> bool:
    """Whether a conv_general_dilated call is a plain NHWC x HWIO convolution: equal strides,
    no dilation or groups, explicit padding, operands of one dtype."""
    strides = tuple(window_strides)
    plain = (len(strides) == 2 and strides[0] == strides[1] and feature_group_count == 1
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and not isinstance(padding, str) and lhs.ndim == 4 and rhs.ndim == 4
             and rhs.dtype == lhs.dtype)
    return plain and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def _route(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
           feature_group_count) -> str:
    """Which implementation computes a conv_general_dilated call: "native" (a narrow plain
    layer, :data:`NATIVE_MAX_UNITS`, that :func:`spp_jax.native.conv.conv` takes),
    "winograd" (a wider plain 3x3 stride-1 layer, padded 0..2), or "xla"; the native
    ones only on one CPU device with the kernels built."""
    if not _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count):
        return "xla"
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    stride = int(window_strides[0])
    if rhs.shape[2] * rhs.shape[3] <= NATIVE_MAX_UNITS:
        ok = native_conv.supported(lhs.shape, rhs.shape, padding, stride, lhs.dtype)
        route = "native"
    else:
        ok = winograd.supported(lhs.shape, rhs.shape, padding, stride, lhs.dtype)
        route = "winograd"
    return route if ok and native.usable() else "xla"


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """``lax.conv_general_dilated`` for the backbones' convolutions: the narrow plain ones run
    on the direct native CPU kernels (:mod:`spp_jax.native.conv`), the wider plain 3x3
    stride-1 ones by Winograd's algorithm (:mod:`spp_jax.native.winograd`), when the kernels
    are built and the program runs on one device (:func:`_route`); every other convolution is
    XLA's. Same values up to float rounding, same gradients. Why: XLA's CPU convolutions
    bound the train steps (README "How it is fast")."""
    if dimension_numbers is not None and not isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        dimension_numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    route = "xla" if kw else _route(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count)
    if route == "xla":
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kw)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if route == "winograd":
        return winograd.conv(lhs, rhs, padding)
    return native_conv.conv(lhs, rhs, padding, int(window_strides[0]))


def native_conv_takes(x, kernel, stride: int, padding) -> bool:
    """Whether an NHWC x HWIO convolution of ``x`` at ``stride`` runs natively."""
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC)
    return _route(x, kernel, (stride, stride), padding, None, None, dn, 1) != "xla"

