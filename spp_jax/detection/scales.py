"""Detection image scales and the per-window scale choice (SPP_FACTS section 6).

An image of size (H, W) is resized so its shorter side is ``s`` for each scale
``s``: the resize factor is ``s / min(H, W)`` and a window's coordinates are
multiplied by it. Every window is pooled at exactly one scale:

* ``"area"`` (the paper, default): the scale whose *scaled* window area
  ``area * (s / min(H, W))**2`` is closest to ``target**2`` (224**2);
* ``"released"`` (the released code): ``expected = round(208 * min(H, W) /
  sqrt(area))`` with MATLAB rounding (half away from zero), and the listed
  scale nearest to ``expected`` wins.

Window areas use the +1 convention ((x2 - x1 + 1) * (y2 - y1 + 1)). Ties go
to the earlier (smaller) scale in the list, as MATLAB's ``min`` does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SCALES_1: tuple[int, ...] = (688,)
SCALES_5: tuple[int, ...] = (480, 576, 688, 864, 1200)
SCALES_5_RELEASED: tuple[int, ...] = (480, 576, 688, 874, 1200)  # the released code's 874 for 864
RULES = ("area", "released")
RELEASED_SIDE = 208  # 13 cells x 16 px, the released rule's reference window side

__all__ = ["SCALES_1", "SCALES_5", "SCALES_5_RELEASED", "RULES", "round_half_away",
           "scale_factors", "choose_scales", "scales_by_name"]


def round_half_away(x) -> np.ndarray:
    """C/MATLAB ``round``: half away from zero (``np.round`` rounds half to even)."""
    x = np.asarray(x, np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def scales_by_name(n: int, use_874: bool = False) -> tuple[int, ...]:
    """1 -> (688,), 5 -> (480, 576, 688, 864, 1200) or with 874 (released)."""
    if n == 1:
        return SCALES_1
    if n == 5:
        return SCALES_5_RELEASED if use_874 else SCALES_5
    raise ValueError(f"scales must be 1 or 5, got {n}")


def scale_factors(image_hw: Sequence[int], scales: Sequence[int]) -> np.ndarray:
    """(S,) float64 resize factors ``s / min(H, W)``."""
    return np.asarray(scales, np.float64) / float(min(image_hw))


def choose_scales(boxes, image_hw: Sequence[int], scales: Sequence[int], rule: str = "area",
                  target: float = 224.0) -> np.ndarray:
    """Index into ``scales`` of the scale each window is pooled at.

    Args:
      boxes: (R, 4) windows in original-image pixels, 0-based inclusive.
      image_hw: original (H, W) in pixels.
      scales: shorter-side lengths in pixels.
      rule: "area" (closest scaled area to ``target**2``) or "released" (208 rule).
      target: reference window side in pixels for "area".
    Returns:
      (R,) int64 indices into ``scales``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown scale rule {rule!r}; valid: {', '.join(RULES)}")
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = np.maximum(b[:, 2] - b[:, 0] + 1, 1) * np.maximum(b[:, 3] - b[:, 1] + 1, 1)  # (R,)
    s = np.asarray(scales, np.float64)
    if len(s) == 1:
        return np.zeros(len(b), np.int64)
    if rule == "area":
        f = scale_factors(image_hw, scales)
        cost = np.abs(area[:, None] * f[None, :] ** 2 - target ** 2)  # (R, S)
    else:
        expected = round_half_away(RELEASED_SIDE * min(image_hw) / np.sqrt(area))  # (R,)
        cost = np.abs(s[None, :] - expected[:, None])
    return np.argmin(cost, axis=1).astype(np.int64)  # argmin returns the first of ties
