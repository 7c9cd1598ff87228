"""Where conv-map cells sit in the input image, and image windows -> map cells.

Receptive-field arithmetic from layer specs (SPP_FACTS section 2): for a stack
of conv/pool layers, each with kernel k, stride s, left/top padding p, the
centre of output cell j of the stack is at input pixel ``offset + stride * j``
(0-based pixel coordinates, pixel centres at integers), where

    stride = prod(s_l)
    offset = sum_l ((k_l - 1) / 2 - p_l) * prod_{m < l} s_m .

Right/bottom padding (e.g. Caffe's ceil-mode pooling) does not move centres.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Placement of a backbone's output cells in its input image.

    Attributes:
      stride: pixels between neighbouring cells' receptive-field centres (16 for ZF-5).
      offset: input pixel (0-based) of cell 0's receptive-field centre (20.0 for the
        released ZF-5).
      slack: pixels a centre may lie outside a window and still count as inside
        (1.5 in the released detection code).
    """

    stride: float
    offset: float
    slack: float = 1.5

    def __post_init__(self):
        for name in ("stride", "offset", "slack"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise InputError(f"Geometry.{name} must be a finite number, got {v!r}")
        if not self.stride > 0:
            raise InputError(f"Geometry.stride must be > 0, got {self.stride}")
        if self.slack < 0:
            raise InputError(f"Geometry.slack must be >= 0, got {self.slack}")

    def centre(self, j):
        """Input-pixel centre of cell(s) j."""
        return self.offset + self.stride * j

    def replace(self, **kw) -> "Geometry":
        return dataclasses.replace(self, **kw)


def geometry_from_layers(layers: Iterable[tuple[int, int, int]], slack: float = 1.5) -> Geometry:
    """Geometry of a stack of (kernel, stride, left_pad) layers, in order from the input."""
    stride, offset = 1, 0.0
    for k, s, p in layers:
        offset += ((k - 1) / 2 - p) * stride
        stride *= s
    return Geometry(stride=float(stride), offset=float(offset), slack=slack)


# Projected cell indices are clipped to this magnitude before the int32 cast, so absurd
# (but finite) coordinates cannot overflow; any real map is far smaller.
_CELL_LIMIT = 2 ** 29
# The cells of a non-finite box under jit: outside every map, so roi_pool_cells gives NaN.
INVALID_CELLS = (-1, -1, -1, -1)


def _as_boxes(boxes, xp):
    boxes = xp.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise InputError(f"boxes must have shape (R, 4) as (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    return boxes


def check_finite_boxes(boxes) -> None:
    """Raise InputError naming the first (R, 4) box with a NaN or infinite coordinate."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    bad = ~np.isfinite(b).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"boxes contain NaN or infinite coordinates: boxes[{i}] = {b[i].tolist()} "
                         f"({int(bad.sum())} of {len(b)})")


def project_boxes(boxes, geometry: Geometry, map_hw: Sequence[int], xp=jnp):
    """Image-pixel windows -> inclusive feature-map cell windows (released-code rule).

    Args:
      boxes: (R, 4) windows (x1, y1, x2, y2), 0-based inclusive pixel corners, in
        the pixel frame of the image the map was computed from (any float or
        int dtype; values may lie outside the image, or be degenerate).
      geometry: the backbone's :class:`Geometry`.
      map_hw: (H, W) of the feature map, static ints >= 1.
      xp: ``jax.numpy`` (default, jit-compatible with dynamic box values) or ``numpy``.

    Returns:
      (R, 4) int32 (x_start, y_start, x_end, y_end), inclusive cells, each within
      the map and start <= end, so every window keeps at least one cell.  A box with
      a NaN or infinite coordinate raises InputError when the boxes are concrete; under
      ``jax.jit`` its row is ``INVALID_CELLS`` (-1, -1, -1, -1), outside every map, which
      :func:`spp_jax.roi_pool_cells` pools to NaN.

    Rule: with centres c_j = offset + stride * j, start is the smallest j with
    c_j > x1 - slack and end the largest j with c_j < x2 + slack, i.e. the cells
    whose centres lie strictly inside the window widened by ``slack``.  If that
    leaves no cell (start > end) both collapse to (start + end) // 2; then both
    are clamped to [0, W - 1] (y likewise with H).  With offset 0 and slack 0 this
    is the paper's floor(x/S) + 1 / ceil(x/S) - 1 rule.
    """
    h, w = int(map_hw[0]), int(map_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"map_hw must be positive, got {tuple(map_hw)}")
    boxes = _as_boxes(boxes, xp).astype(xp.float32)
    if not isinstance(boxes, jax.core.Tracer):
        check_finite_boxes(boxes)
    s, o, sl = geometry.stride, geometry.offset, geometry.slack
    lo = boxes[:, :2]  # (R, 2) x1, y1
    hi = boxes[:, 2:]  # (R, 2) x2, y2
    start = xp.floor((lo - sl - o) / s) + 1  # smallest j with o + s*j > lo - sl
    end = xp.ceil((hi + sl - o) / s) - 1  # largest j with o + s*j < hi + sl
    start = xp.clip(start, -_CELL_LIMIT, _CELL_LIMIT).astype(xp.int32)
    end = xp.clip(end, -_CELL_LIMIT, _CELL_LIMIT).astype(xp.int32)
    mid = (start + end) // 2  # floor division, as the rule states
    empty = start > end
    start = xp.where(empty, mid, start)
    end = xp.where(empty, mid, end)
    limit = xp.asarray([w - 1, h - 1], dtype=xp.int32)
    start = xp.clip(start, 0, limit)
    end = xp.clip(end, 0, limit)
    cells = xp.concatenate([start, end], axis=1)
    finite = xp.isfinite(boxes).all(axis=1, keepdims=True)  # only ever false under jit
    return xp.where(finite, cells, xp.asarray(INVALID_CELLS, dtype=xp.int32))

