"""Pyramid bin edges: the one rule every pooling path in spp_jax shares.

SPP-net's Appendix A (SPP_FACTS section 1): along an axis of ``a`` cells, bin
``i`` (0-based) of a level with ``n`` bins covers the half-open cell range

    [ floor(i * a / n) , ceil((i + 1) * a / n) )

Always exactly ``n`` bins, the whole axis covered, neighbours overlapping by at
most one cell, and no empty bin even when ``a < n`` (cells then repeat). This is
the rule PyTorch's adaptive max pooling and Fast R-CNN's RoI pooling use too.

Section 2.3 of the paper describes the same pooling as a sliding window with
``win = ceil(a / n)`` and ``stride = floor(a / n)``.  That recipe only produces
the same bins when ``a >= n`` and ``a mod n`` is 0 or 1; :func:`window_stride_bins`
reports what it produces everywhere so callers can refuse the other cases.

The released Caffe model (SPP_FACTS section 3) pools its 13x13 conv5 map with four
Caffe ceil-mode pools; three of them give exactly these bins, but its 2x2 level uses
kernel 7 *stride 7*: bins [0, 7), [7, 13) where Appendix A has [0, 7), [6, 13).
``mode="released"`` reproduces that level for every axis length: level 2's bins are
[0, c), [c, a) with c = ceil(a / 2) (kernel = stride = c, the last window clipped by
ceil mode), the second bin being the last cell when a = 1; every other level keeps
Appendix A (equal to the released pools at 13). Use it to run released weights exactly.

Everything here is plain integer arithmetic on Python ints or integer arrays
(numpy or jax.numpy), so it serves both the static whole-map case and the
dynamic per-window case.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

DEFAULT_LEVELS: tuple[int, ...] = (6, 3, 2, 1)  # 50 bins, the paper's classification pyramid
MODES: tuple[str, ...] = ("appendix_a", "released")  # bin rules (see the module doc)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown bin rule {mode!r}; valid: {', '.join(MODES)}")
    return mode


def _released_half(mode: str, n: int) -> bool:
    return mode == "released" and n == 2


def bin_edges(a: int, n: int, mode: str = "appendix_a") -> list[tuple[int, int]]:
    """Bins of an axis of ``a`` cells split into ``n`` bins (Appendix A, or ``mode="released"``).

    Returns ``n`` (start, end) pairs, half-open cell ranges ``[start, end)``.
    Pure integer arithmetic (no float rounding): ``floor(i*a/n) = (i*a)//n``
    and ``ceil(m/n) = -((-m)//n)``.
    """
    if a < 1 or n < 1:
        raise ValueError(f"bin_edges needs a >= 1 and n >= 1, got a={a}, n={n}")
    if _released_half(check_mode(mode), n):
        c = -(-a // 2)
        return [(0, c), (min(c, a - 1), a)]
    return [((i * a) // n, -((-(i + 1) * a) // n)) for i in range(n)]


def bin_edges_array(a, n: int, xp=np, mode: str = "appendix_a"):
    """Vectorised :func:`bin_edges` for (possibly traced) axis lengths.

    Args:
      a: integer array (...,) of axis lengths in cells, each >= 1.
      n: static number of bins.
      xp: ``numpy`` or ``jax.numpy``.
      mode: static bin rule, "appendix_a" or "released".
    Returns:
      (start, end): integer arrays (..., n); bin i covers ``[start_i, end_i)``
      relative to the axis origin.
    """
    a = xp.asarray(a)[..., None]
    if _released_half(check_mode(mode), n):
        c = -(-a // 2)
        start = xp.concatenate([xp.zeros_like(a), xp.minimum(c, a - 1)], axis=-1)
        return start, xp.concatenate([c, a], axis=-1)
    i = xp.arange(n)
    start = (i * a) // n
    end = -((-(i + 1) * a) // n)
    return start, end


class WindowStrideBins(NamedTuple):
    """What Section 2.3's sliding-window recipe produces on one axis."""

    a: int
    n: int
    window: int | None  # ceil(a/n)
    stride: int | None  # floor(a/n); None when 0 (a < n): the recipe is undefined
    count: int  # number of windows the recipe yields (0 when undefined)
    covered: int  # cells [0, covered) touched by some window

    @property
    def valid(self) -> bool:
        """True when the recipe gives exactly n windows covering all a cells."""
        return self.stride is not None and self.count == self.n and self.covered == self.a

    def describe(self) -> str:
        if self.stride is None:
            return (f"axis length a={self.a} < n={self.n} bins: stride floor(a/n)=0, "
                    f"the window/stride recipe is undefined")
        return (f"axis length a={self.a}, n={self.n}: window {self.window}, stride {self.stride} "
                f"gives {self.count} bins covering cells [0, {self.covered}) of {self.a}")


def window_stride_bins(a: int, n: int) -> WindowStrideBins:
    """Diagnose Section 2.3's recipe (window ceil(a/n), stride floor(a/n), no padding)."""
    window, stride = math.ceil(a / n), a // n
    if stride == 0:
        return WindowStrideBins(a, n, window, None, 0, 0)
    count = (a - window) // stride + 1
    covered = (count - 1) * stride + window
    return WindowStrideBins(a, n, window, stride, count, covered)


def normalize_levels(levels: Sequence[int] | int) -> tuple[int, ...]:
    """Check a pyramid specification and return it as a tuple of ints.

    Raises ``ValueError`` / ``TypeError`` naming the problem: empty, non-integer
    (floats and bools are refused even when integral) or non-positive levels.
    """
    if isinstance(levels, (int, np.integer)) and not isinstance(levels, bool):
        levels = (int(levels),)
    try:
        levels = tuple(levels)
    except TypeError:
        raise TypeError(f"levels must be a sequence of positive ints, got {levels!r}") from None
    if not levels:
        raise ValueError("levels is empty: give at least one pyramid level, e.g. (6, 3, 2, 1)")
    for n in levels:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"pyramid levels must be ints, got {n!r} in {levels!r}")
        if n < 1:
            raise ValueError(f"pyramid levels must be >= 1, got {n} in {levels!r}")
    return tuple(int(n) for n in levels)


def num_bins(levels: Sequence[int]) -> int:
    """Bins in a pyramid: sum of n*n (50 for (6, 3, 2, 1))."""
    return sum(n * n for n in normalize_levels(levels))


def output_dim(channels: int, levels: Sequence[int] = DEFAULT_LEVELS) -> int:
    """Length of a pooled vector: channels * sum(n*n) (12,800 for 256 channels and (6,3,2,1))."""
    return int(channels) * num_bins(levels)


def derivation_plan(levels: tuple[int, ...], mode: str = "appendix_a") -> dict[int, int]:
    """For each level, the level its bins are computed from.

    With integer Appendix A edges, bin i of level n is exactly the union of bins
    ``i*m .. (i+1)*m - 1`` of level ``n*m`` (the unions' edges are
    ``floor(i*m*a/(n*m))`` and ``ceil((i+1)*m*a/(n*m))``).  So a coarse level whose
    bin count divides a finer one's is a cheap max over groups of the finer
    level's bins, instead of another pass over the map.  Returns
    ``{level: source}`` with ``source == level`` for levels pooled directly.
    Under ``mode="released"`` level 2 is not such a union, so it is pooled
    directly (level 1, the union of its two halves, may still come from it).
    """
    plan: dict[int, int] = {}
    for n in sorted(set(levels), reverse=True):
        finer = [] if _released_half(mode, n) else [
            m for m in plan if plan[m] == m and m % n == 0 and m != n]
        plan[n] = min(finer) if finer else n
    return plan
