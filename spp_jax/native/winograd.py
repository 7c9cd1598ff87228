"""3x3 stride-1 convolutions by Winograd's F(2x2, 3x3) algorithm, differentiable.

``conv(x, kernel, padding)`` computes what ``lax.conv_general_dilated(x, kernel, (1, 1),
padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))`` computes, float32, up to float rounding:
the output is cut into 2x2 tiles; each tile's 4x4 input window and the kernel are transformed
(``B^T d B``, ``G g G^T``), multiplied elementwise, summed over input channels, and transformed
back (``A^T m A``) (Lavin & Gray 2016, "Fast algorithms for convolutional neural networks").
The sum over channels is sixteen matrix products, one per tile position: (T, Ci) x (Ci, Co)
with T = B x tiles, on XLA's dots. Why: they take 16 products per tile where the direct
convolution takes 36 (2.25x fewer); the gradient is the same algorithm's, by autodiff through
the dots and the transforms' adjoints, so both cotangents are again sixteen products each.

The tile transforms and their adjoints are one pass each on the native CPU kernels
(``winograd.cc``); the kernel's transform (and its adjoint, by autodiff) is XLA's.

Shapes: x (B, H, W, Ci), kernel (3, 3, Ci, Co), padding ((top, bottom), (left, right)), each
0..2 -> (B, H + top + bottom - 2, W + left + right - 2, Co).

Rounding: the transforms add and subtract up to 9 inputs (and halve the kernel's), so the
result differs from the direct convolution's by a few float32 ulps of the inputs' scale
(tested against a float64 reference: tests/test_native_winograd.py).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]

# G of F(2x2, 3x3): the kernel's transform, rows of (w0, w1, w2) coefficients.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def supported(x_shape, kernel_shape, padding, stride: int, dtype) -> bool:
    """Whether :func:`conv` takes this convolution: rank-4 float32, a 3x3 kernel at stride 1,
    each padding 0..2, a non-empty output."""
    if dtype != jnp.float32 or len(x_shape) != 4 or tuple(kernel_shape[:2]) != (3, 3):
        return False
    if stride != 1 or len(kernel_shape) != 4 or kernel_shape[2] != x_shape[3]:
        return False
    pads_ok = all(0 <= p <= 2 for pair in padding for p in pair)
    return pads_ok and min(out_hw(x_shape, padding)) >= 1


def out_hw(x_shape, padding: Padding) -> tuple[int, int]:
    """The output's (height, width)."""
    return tuple(n + lo + hi - 2 for n, (lo, hi) in zip(x_shape[1:3], padding))


class Tiling(NamedTuple):
    """A convolution's 2x2 output tiles: the input's (h, w), the output's (oh, ow), and the
    padding above and left of the input (the window of tile (ty, tx) starts at input cell
    (2 ty - top, 2 tx - left))."""

    h: int
    w: int
    oh: int
    ow: int
    top: int
    left: int

    @property
    def th(self) -> int:
        return -(-self.oh // 2)

    @property
    def tw(self) -> int:
        return -(-self.ow // 2)

    @property
    def tiles(self) -> int:
        """Tiles per image."""
        return self.th * self.tw

    def attrs(self, padded: bool) -> dict:
        """The FFI attributes: th, tw, and for the input's pair top, left."""
        a = {"th": self.th, "tw": self.tw}
        if padded:
            a.update(top=self.top, left=self.left)
        return {k: np.int64(v) for k, v in a.items()}


def _tiles_call(name: str, shape, operand, tiling: Tiling, padded: bool):
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(name, out, vmap_method="sequential")(operand, **tiling.attrs(padded))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _input(x, tiling: Tiling):
    """(B, H, W, C) -> (16, B * tiles, C): each tile's B^T d B."""
    shape = (16, x.shape[0] * tiling.tiles, x.shape[3])
    return _tiles_call("spp_winograd_input", shape, x, tiling, True)


def _input_fwd(x, tiling):
    return _input(x, tiling), None


def _input_bwd(tiling, _, dv):
    shape = (dv.shape[1] // tiling.tiles, tiling.h, tiling.w, dv.shape[2])
    return (_tiles_call("spp_winograd_input_grad", shape, dv, tiling, True),)


_input.defvjp(_input_fwd, _input_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _output(m, tiling: Tiling):
    """(16, B * tiles, F) -> (B, OH, OW, F): each tile's A^T m A, cropped to the output."""
    shape = (m.shape[1] // tiling.tiles, tiling.oh, tiling.ow, m.shape[2])
    return _tiles_call("spp_winograd_output", shape, m, tiling, False)


def _output_fwd(m, tiling):
    return _output(m, tiling), None


def _output_bwd(tiling, _, dy):
    shape = (16, dy.shape[0] * tiling.tiles, dy.shape[3])
    return (_tiles_call("spp_winograd_output_grad", shape, dy, tiling, False),)


_output.defvjp(_output_fwd, _output_bwd)


def _kernel(kernel):
    """(3, 3, Ci, Co) -> (16, Ci, Co): G g G^T per channel pair (elementwise: one fusion)."""
    def g_rows(k, axis):  # G applied along ``axis`` of k (size 3 -> 4)
        taps = [lax.index_in_dim(k, i, axis, keepdims=False) for i in range(3)]
        rows = [sum(c * t for c, t in zip(row, taps) if c) for row in _G]
        return jnp.stack(rows, axis)
    return g_rows(g_rows(kernel, 0), 1).reshape(16, *kernel.shape[2:])


def conv(x, kernel, padding: Padding):
    """(B, H, W, Ci) x (3, 3, Ci, Co) -> (B, OH, OW, Co), the zero-padded 3x3 stride-1
    convolution (module docstring), float32."""
    if not supported(x.shape, kernel.shape, padding, 1, x.dtype):
        raise ValueError(f"winograd.conv takes float32 3x3 stride-1 convolutions padded 0..2, "
                         f"not x {x.shape} {x.dtype}, kernel {kernel.shape}, padding {padding}")
    tiling = Tiling(*x.shape[1:3], *out_hw(x.shape, padding), padding[0][0], padding[1][0])
    v = _input(x, tiling)
    m = lax.dot_general(v, _kernel(kernel.astype(jnp.float32)), (((2,), (1,)), ((0,), (0,))))
    return _output(m, tiling)
