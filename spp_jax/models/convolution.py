"""The backbones' convolution: the native CPU kernels where they apply and win, else XLA's.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature (``nn.Conv`` takes it
as its ``conv_general_dilated``; conv1 calls it too); :func:`native_conv_takes` tells conv1
whether to use it or its space-to-depth blocks.
"""
from __future__ import annotations

from jax import lax

from spp_jax import native
from spp_jax.native import conv as native_conv

_NHWC = ("NHWC", "HWIO", "NHWC")

#: The native kernels take a layer of at most this many input x output channels. Why: they
#: win on narrow layers (the embedded nets', 64 x 64 and below: see spp_jax.native.conv) and
#: lose where XLA's convolutions become large matrix products (batch 8, alternated pairs,
#: 2026-12-07: 512 -> 512 3x3 at 18x18 forward 0.94x, input gradient 0.88x, kernel gradient
#: 0.57x; 96 -> 256 5x5 at 36x36 0.99x / 1.13x / 0.72x; 384 -> 384 at 13x13 0.84x / 0.87x /
#: 0.77x; the full-width ZF-5 and Overfeat-7 SGD steps 0.96x / 0.91x with every layer native).
NATIVE_MAX_UNITS = 64 * 64


def _native_takes(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count) -> bool:
    """Whether a conv_general_dilated call is a plain NHWC convolution (equal strides, no
    dilation or groups, explicit padding within the kernel) of a narrow layer
    (:data:`NATIVE_MAX_UNITS`) that :func:`spp_jax.native.conv.conv` computes, on one CPU
    device."""
    strides = tuple(window_strides)
    plain = (len(strides) == 2 and strides[0] == strides[1] and feature_group_count == 1
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and not isinstance(padding, str) and lhs.ndim == 4 and rhs.ndim == 4)
    if not plain or dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return False
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return (rhs.shape[2] * rhs.shape[3] <= NATIVE_MAX_UNITS and rhs.dtype == lhs.dtype
            and native_conv.supported(lhs.shape, rhs.shape, padding, strides[0], lhs.dtype)
            and native.usable())


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """``lax.conv_general_dilated`` for the backbones' convolutions: the narrow plain ones
    (:func:`_native_takes`) run on the native CPU kernels (:mod:`spp_jax.native.conv`, same
    values up to float rounding, same gradient) when they are built and the program runs on
    one device; every other convolution is XLA's. Why: XLA's CPU convolutions bound the
    embedded train step (README "How it is fast")."""
    if dimension_numbers is not None and not isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        dimension_numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if not kw and _native_takes(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count):
        return native_conv.conv(lhs, rhs, tuple((int(lo), int(hi)) for lo, hi in padding),
                                int(window_strides[0]))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    **kw)


def native_conv_takes(x, kernel, stride: int, padding) -> bool:
    """Whether an NHWC x HWIO convolution of ``x`` at ``stride`` runs natively."""
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC)
    return _native_takes(x, kernel, (stride, stride), padding, None, None, dn, 1)

