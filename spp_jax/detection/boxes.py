"""Box geometry for detection: areas, IoU, clipping, flips, scaling, regression.

Box convention (the one place the project states it)
----------------------------------------------------
A box is the last axis of an array of shape ``(..., 4)`` holding
``(x1, y1, x2, y2)`` as **0-based, inclusive pixel corners**: the box covers
pixel columns ``x1 .. x2`` and rows ``y1 .. y2``, so its width is
``x2 - x1 + 1`` and its height ``y2 - y1 + 1`` (the Pascal VOC "+1"
convention; a one-pixel box has ``x1 == x2``). ``x`` runs along the image
width (columns), ``y`` along the height (rows). Coordinates are pixels of the
image the boxes refer to; they may be integer or float arrays.

Pascal VOC annotations are 1-based and inclusive; convert them once, at the
dataset boundary, with :func:`voc_to_internal` (and back with
:func:`internal_to_voc` when writing devkit-format result files).

Array namespaces
----------------
Every function accepts NumPy arrays (and array-likes), returning NumPy, or
``jax.Array`` values (including tracers inside ``jax.jit``/``vmap``),
returning ``jax.Array``; shapes never depend on values, so all functions are
jit-compatible. Image sizes are ``(H, W)`` in that order, like array shapes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "voc_to_internal",
    "internal_to_voc",
    "box_area",
    "pairwise_iou",
    "clip_boxes",
    "flip_boxes_lr",
    "scale_boxes",
    "bbox_targets",
    "apply_deltas",
]


def _xp(*values: Any):
    """The array module to compute with: ``jnp`` if any input is a JAX array.

    Looks one level into tuples/lists so ``scale=(sy, sx)`` made of JAX
    scalars is recognised too.
    """
    for v in values:
        items = v if isinstance(v, (tuple, list)) else (v,)
        if any(isinstance(item, jax.Array) for item in items):
            return jnp
    return np


def _as_boxes(boxes: Any, xp, name: str = "boxes", ndim: int | None = None):
    """Convert to an array and check the trailing coordinate axis is 4."""
    arr = xp.asarray(boxes)
    if arr.ndim == 0 or arr.shape[-1] != 4:
        raise ValueError(
            f"{name} must have shape (..., 4) as (x1, y1, x2, y2); got shape {arr.shape}"
        )
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have shape (N, 4); got shape {arr.shape}")
    return arr


def _float_dtype(xp, dtype):
    """Float dtype for derived quantities: keep float inputs, promote ints.

    ``result_type(dtype, float32)`` keeps float32/float64 as they are and maps
    integers to float64 in NumPy (float32 in JAX without x64).
    """
    return xp.result_type(dtype, xp.float32)


def _widths_heights(boxes, xp):
    """(..., 4) boxes -> widths (...,), heights (...,) with the +1 convention."""
    b = boxes.astype(_float_dtype(xp, boxes.dtype))
    return b[..., 2] - b[..., 0] + 1, b[..., 3] - b[..., 1] + 1


def voc_to_internal(boxes: Any) -> Any:
    """VOC 1-based inclusive boxes -> project 0-based inclusive boxes.

    Args:
      boxes: (..., 4) ``(xmin, ymin, xmax, ymax)`` as in VOC XML files.
    Returns:
      (..., 4) same dtype, every coordinate minus 1 (width/height unchanged).
    """
    xp = _xp(boxes)
    b = _as_boxes(boxes, xp)
    return b - 1


def internal_to_voc(boxes: Any) -> Any:
    """Project 0-based inclusive boxes -> VOC 1-based inclusive boxes.

    Args:
      boxes: (..., 4) internal ``(x1, y1, x2, y2)``.
    Returns:
      (..., 4) same dtype, every coordinate plus 1.
    """
    xp = _xp(boxes)
    b = _as_boxes(boxes, xp)
    return b + 1


def box_area(boxes: Any) -> Any:
    """Areas in pixels with the +1 convention.

    Args:
      boxes: (..., 4) internal boxes.
    Returns:
      (...,) float areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``; a degenerate box
      (``x2 < x1`` by more than one pixel, i.e. negative width or height) has
      area 0 rather than a negative or spuriously positive product.
    """
    xp = _xp(boxes)
    b = _as_boxes(boxes, xp)
    w, h = _widths_heights(b, xp)
    return xp.maximum(w, 0) * xp.maximum(h, 0)


def pairwise_iou(a: Any, b: Any) -> Any:
    """Intersection over union of every box in ``a`` with every box in ``b``.

    Uses the +1 convention for areas and intersections (as the VOC devkit and
    R-CNN do). Disjoint boxes give 0; a pair whose union is empty (both
    boxes degenerate) gives 0, so the result is always finite in [0, 1].

    Args:
      a: (N, 4) internal boxes.
      b: (M, 4) internal boxes.
    Returns:
      (N, M) float IoU (float64 for NumPy integer input, else the input's
      float type).
    """
    xp = _xp(a, b)
    a = _as_boxes(a, xp, "a", ndim=2)
    b = _as_boxes(b, xp, "b", ndim=2)
    dtype = xp.result_type(_float_dtype(xp, a.dtype), _float_dtype(xp, b.dtype))
    a = a.astype(dtype)
    b = b.astype(dtype)
    area_a = box_area(a)[:, None]  # (N, 1)
    area_b = box_area(b)[None, :]  # (1, M)
    iw = xp.minimum(a[:, None, 2], b[None, :, 2]) - xp.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = xp.minimum(a[:, None, 3], b[None, :, 3]) - xp.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = xp.maximum(iw, 0) * xp.maximum(ih, 0)  # (N, M)
    union = area_a + area_b - inter
    # inter <= min(area_a, area_b), so union >= 0; guard the 0/0 case.
    positive = union > 0
    return xp.where(positive, inter / xp.where(positive, union, 1), 0).astype(dtype)


def clip_boxes(boxes: Any, image_shape: Sequence[Any]) -> Any:
    """Clip boxes to lie inside an image of size ``(H, W)``.

    Args:
      boxes: (..., 4) internal boxes.
      image_shape: ``(H, W)`` in pixels (ints, or scalars/tracers).
    Returns:
      (..., 4) same dtype; x in [0, W - 1], y in [0, H - 1].
    """
    if len(image_shape) != 2:
        raise ValueError(f"image_shape must be (H, W); got {image_shape!r}")
    height, width = image_shape
    xp = _xp(boxes, height, width)
    b = _as_boxes(boxes, xp)
    upper = xp.stack([xp.asarray(width), xp.asarray(height)] * 2) - 1  # (4,)
    return xp.minimum(xp.maximum(b, 0), upper.astype(b.dtype)).astype(b.dtype)


def flip_boxes_lr(boxes: Any, width: Any) -> Any:
    """Mirror boxes for a left-right flipped image of the given width.

    Column ``x`` maps to ``W - 1 - x``, so ``(x1, x2)`` becomes
    ``(W - 1 - x2, W - 1 - x1)``; y is unchanged. Applying it twice is the
    identity.

    Args:
      boxes: (..., 4) internal boxes.
      width: image width W in pixels.
    Returns:
      (..., 4) same dtype.
    """
    xp = _xp(boxes, width)
    b = _as_boxes(boxes, xp)
    x1 = width - 1 - b[..., 2]
    x2 = width - 1 - b[..., 0]
    return xp.stack([x1, b[..., 1], x2, b[..., 3]], axis=-1).astype(b.dtype)


def scale_boxes(boxes: Any, scale: Any) -> Any:
    """Multiply box coordinates by an image resize factor.

    The resize ``image -> image * s`` maps pixel coordinates by ``x * s``
    (the convention of SPP-net/R-CNN, which scale windows by the image
    scale factor); this is not exact at the +1 pixel level but is what the
    references do.

    Args:
      boxes: (..., 4) internal boxes.
      scale: a scalar, or a pair ``(scale_y, scale_x)`` (ordered like
        ``(H, W)``) for anisotropic resizing.
    Returns:
      (..., 4) float boxes.
    """
    xp = _xp(boxes, scale)
    b = _as_boxes(boxes, xp)
    s = xp.asarray(scale)
    if s.ndim == 1:
        if s.shape[0] != 2:
            raise ValueError(f"scale must be a scalar or (scale_y, scale_x); got shape {s.shape}")
        s = xp.stack([s[1], s[0], s[1], s[0]])  # (sx, sy, sx, sy)
    elif s.ndim != 0:
        raise ValueError(f"scale must be a scalar or (scale_y, scale_x); got shape {s.shape}")
    dtype = xp.result_type(_float_dtype(xp, b.dtype), _float_dtype(xp, s.dtype))
    return b.astype(dtype) * s.astype(dtype)


def _centres_sizes(boxes, xp):
    """(..., 4) -> centre x, centre y, width, height, each (...,) float.

    The centre of an inclusive box is ``x1 + 0.5 * (w - 1)`` = the mean of
    its first and last pixel indices (R-CNN's definition).
    """
    w, h = _widths_heights(boxes, xp)
    b = boxes.astype(w.dtype)
    return b[..., 0] + 0.5 * (w - 1), b[..., 1] + 0.5 * (h - 1), w, h


def bbox_targets(proposals: Any, gt: Any) -> Any:
    """R-CNN bounding-box regression targets from proposals to ground truth.

    With proposal centre/size ``(px, py, pw, ph)`` and ground-truth
    ``(gx, gy, gw, gh)`` (widths with +1, centres ``x1 + 0.5 * (w - 1)``)::

        dx = (gx - px) / pw      dy = (gy - py) / ph
        dw = log(gw / pw)        dh = log(gh / ph)

    Normalising the targets (mean/std) is left to the caller.

    Args:
      proposals: (..., 4) internal boxes with positive width and height.
      gt: (..., 4) matching ground-truth boxes (broadcastable to proposals).
    Returns:
      (..., 4) float ``(dx, dy, dw, dh)``; dimensionless (log-ratio for dw/dh).
    """
    xp = _xp(proposals, gt)
    p = _as_boxes(proposals, xp, "proposals")
    g = _as_boxes(gt, xp, "gt")
    px, py, pw, ph = _centres_sizes(p, xp)
    gx, gy, gw, gh = _centres_sizes(g, xp)
    return xp.stack(
        [(gx - px) / pw, (gy - py) / ph, xp.log(gw / pw), xp.log(gh / ph)], axis=-1
    )


def apply_deltas(boxes: Any, deltas: Any, max_log_scale: float | None = None) -> Any:
    """Inverse of :func:`bbox_targets`: move boxes by regression deltas.

    ``apply_deltas(p, bbox_targets(p, g)) == g`` up to rounding. For
    per-class deltas of shape (N, K, 4) pass ``boxes[:, None, :]``.

    Args:
      boxes: (..., 4) internal boxes (the proposals), positive width/height.
      deltas: (..., 4) ``(dx, dy, dw, dh)`` broadcastable against ``boxes``.
      max_log_scale: if given, ``dw``/``dh`` are clipped to at most this
        value before ``exp`` so wild predictions cannot overflow.
    Returns:
      (..., 4) float boxes (not clipped to the image; see :func:`clip_boxes`).
    """
    xp = _xp(boxes, deltas)
    b = _as_boxes(boxes, xp)
    d = _as_boxes(deltas, xp, "deltas")
    px, py, pw, ph = _centres_sizes(b, xp)
    d = d.astype(xp.result_type(d.dtype, px.dtype, xp.float32))
    dx, dy, dw, dh = d[..., 0], d[..., 1], d[..., 2], d[..., 3]
    if max_log_scale is not None:
        dw = xp.minimum(dw, max_log_scale)
        dh = xp.minimum(dh, max_log_scale)
    cx = px + dx * pw
    cy = py + dy * ph
    w = pw * xp.exp(dw)
    h = ph * xp.exp(dh)
    # Inclusive corners: centre -/+ half of (size - 1).
    return xp.stack(
        [cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)],
        axis=-1,
    )
