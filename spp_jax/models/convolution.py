"""The backbones' convolution: native CPU kernels where they apply, else XLA's.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature (``nn.Conv`` takes it
as its ``conv_general_dilated``) and :func:`stride1` computes the space-to-depth blocks' conv1.
"""
from __future__ import annotations

import jax
from jax import lax

from spp_jax import native
from spp_jax.native import conv as native_conv

_NHWC = ("NHWC", "HWIO", "NHWC")


def _native_takes(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count) -> bool:
    """Whether a conv_general_dilated call is a plain stride-1 NHWC convolution with explicit
    padding that :func:`spp_jax.native.conv.conv` computes, on one CPU device."""
    strides = tuple(window_strides)
    plain = (len(strides) == 2 and strides[0] == strides[1] and feature_group_count == 1
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and not isinstance(padding, str) and lhs.ndim == 4 and rhs.ndim == 4)
    if not plain or dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return False
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return (native_conv.supported(lhs.shape, rhs.shape, padding, strides[0], lhs.dtype)
            and rhs.dtype == lhs.dtype and jax.device_count() == 1 and native.available())


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """``lax.conv_general_dilated`` for the backbones' ``nn.Conv`` layers: stride-1 NHWC
    convolutions run on the native CPU kernels (:mod:`spp_jax.native.conv`, same values up to
    float rounding, same gradient) when they are built and the program runs on one device;
    every other convolution, and every convolution elsewhere, is XLA's. Why: XLA's CPU
    convolutions bound the train step (README "How it is fast")."""
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


def kernel_grad(x, dy, kernel, stride: int, pad: int):
    """(k, k, C, F): the gradient of the NHWC convolution of ``x`` with ``kernel`` at ``stride``,
    zero-padded by ``pad``, with respect to its kernel, for the output cotangent ``dy``:
    native where :func:`native_conv_takes` says so, else XLA's transpose of its convolution."""
    pads = ((pad, pad), (pad, pad))
    if native_conv_takes(x, kernel, stride, pads):
        return native_conv.kernel_grad(x, dy, kernel.shape[:2], pads, stride)
    f = lambda w: lax.conv_general_dilated(x, w, (stride, stride), pads,  # noqa: E731
                                           dimension_numbers=_NHWC)
    return jax.linear_transpose(f, kernel)(dy)[0]
