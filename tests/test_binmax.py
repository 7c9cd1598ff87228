"""spp_jax.binmax and spp_jax.pool built on it: values and gradients against brute-force numpy
(ties included: the gradient goes to the FIRST max of a window in row-major order; for a
pyramid level derived from a finer one, to the first finer bin holding the max) and against
JAX's default gradients where there are no ties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import spp_jax
from spp_jax import binmax
from spp_jax import bins as B
from tests.reference import released_bins, window_ref


def tied(shape, seed, levels=3):
    """Small integers: many exact ties inside every window."""
    return np.random.default_rng(seed).integers(0, levels, shape).astype(np.float32)


def distinct(shape, seed):
    """All values distinct: no ties anywhere, so every gradient rule agrees."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n).reshape(shape) / n).astype(np.float32)


def check_window(x, rows, cols, seed=0, fused=False):
    g = np.random.default_rng(seed + 1).standard_normal((x.shape[0], len(rows), len(cols), x.shape[3]))
    g = g.astype(np.float32)
    y, vjp = jax.vjp(lambda a: binmax.window_max(a, rows, cols, fused), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    y_ref, dx_ref = window_ref(x, rows, cols, g)
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])  # one 2-D reduction / fused strided maxima
@pytest.mark.parametrize("make", [tied, distinct])
def test_tiled_windows_with_crop(make, fused):
    x = make((2, 11, 8, 3), 0)  # 11 rows -> 3 windows of 3 (2 rows cropped), 8 cols -> 4 of 2
    check_window(x, binmax.tiled_edges(3, 3), binmax.tiled_edges(4, 2), fused=fused)
    # the primal (no vjp) forward as well: jax.vjp above runs the forward rule
    y = binmax.window_max(jnp.asarray(x), binmax.tiled_edges(3, 3), binmax.tiled_edges(4, 2), fused)
    np.testing.assert_array_equal(np.asarray(y), window_ref(x, binmax.tiled_edges(3, 3),
                                                             binmax.tiled_edges(4, 2),
                                                             np.zeros((2, 3, 4, 3), np.float32))[0])


@pytest.mark.parametrize("make", [tied, distinct])
def test_overlapping_uneven_windows(make):
    x = make((2, 7, 13, 2), 1)
    rows = binmax.as_edges(B.bin_edges(7, 3))  # [0,3) [2,5) [4,7): overlap by one
    cols = ((0, 5), (3, 4), (3, 13), (12, 13))  # uneven, nested, repeated cells
    check_window(x, rows, cols)


@pytest.mark.parametrize("make", [tied, distinct])
@pytest.mark.parametrize("k,st,a", [(3, 2, 13), (5, 4, 13), (7, 6, 13), (4, 3, 10), (3, 1, 6), (2, 1, 9)])
def test_strided_overlapping_windows(make, k, st, a):
    """Equal windows at a stride (every level of a 13-cell map) take the strided path;
    the map is one cell wider than the windows reach, so that cell gets no gradient."""
    edges = tuple((i * st, i * st + k) for i in range((a - k) // st + 1))
    assert binmax._uniform(edges) == (k, st)
    check_window(make((2, a, a + 1, 3), 2), edges, edges)


@pytest.mark.parametrize("make", [tied, distinct])
@pytest.mark.parametrize("rows,cols,h,w", [
    ((4, 5, 2), (3, 3, 2), 11, 9),   # windows reaching two strides past their own
    ((3, 2, 3), (5, 3, 1), 10, 8),   # gaps between row windows; a cell past the last column
    ((2, 4, 4), (2, 3, 2), 8, 6),    # rows that tile, columns that overlap
])
def test_strided_max_backward_on_mixed_strides(make, rows, cols, h, w):
    """The one-pass backward of :func:`binmax.strided_max` (window_max's path when both axes
    are equal windows at a stride) against brute force, ties and uncovered cells included."""
    edges = lambda n, k, s: tuple((i * s, i * s + k) for i in range(n))  # noqa: E731
    r, c = edges(*rows), edges(*cols)
    assert binmax._uniform(r) == rows[1:] and binmax._uniform(c) == cols[1:]
    check_window(make((2, h, w, 3), 4), r, c)


def test_strided_max_nan_window_passes_no_gradient():
    x = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
    x[0, 1, 1, 0] = np.nan  # in window (0, 0) only
    edges = ((0, 3), (2, 5))
    g = jax.grad(lambda a: jnp.nansum(binmax.window_max(a, edges, edges)))(jnp.asarray(x))
    want = np.zeros((5, 5))
    want[2, 4] = want[4, 2] = want[4, 4] = 1  # the other windows' first max cells
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], want)


def test_strided_nan_window_passes_no_gradient():
    x = np.arange(7, dtype=np.float32).reshape(1, 1, 7, 1)
    x[0, 0, 1, 0] = np.nan
    edges = ((0, 3), (2, 5), (4, 7))
    g = jax.grad(lambda a: jnp.nansum(binmax.axis_bin_max(a, 2, edges)))(x)
    np.testing.assert_array_equal(np.asarray(g)[0, 0, :, 0], [0, 0, 0, 0, 1, 0, 1])


def test_uneven_nan_bins_pass_no_gradient():
    x = np.arange(5, dtype=np.float32).reshape(1, 1, 5, 1)
    x[0, 0, 1, 0] = np.nan
    edges = ((0, 2), (1, 4), (3, 5))  # neither tiled nor equal windows: the generic path
    y = binmax.axis_bin_max(jnp.asarray(x), 2, edges)
    assert np.isnan(np.asarray(y)[0, 0, :2, 0]).all() and np.asarray(y)[0, 0, 2, 0] == 4
    g = jax.grad(lambda a: jnp.nansum(binmax.axis_bin_max(a, 2, edges)))(x)
    np.testing.assert_array_equal(np.asarray(g)[0, 0, :, 0], [0, 0, 0, 0, 1])


def test_all_equal_window_gives_its_first_cell():
    x = np.zeros((1, 4, 6, 1), np.float32)
    g = jax.grad(lambda a: binmax.window_max(a, binmax.tiled_edges(2, 2), ((0, 3), (2, 6))).sum())(x)
    want = np.zeros((4, 6))
    want[0, 0] = want[0, 2] = want[2, 0] = want[2, 2] = 1
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], want)


def test_nan_window_passes_no_gradient():
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 4, 1)
    x[0, 0, 1, 0] = np.nan
    g = jax.grad(lambda a: jnp.nansum(binmax.window_max(a, ((0, 2),), ((0, 2), (2, 4)))))(x)
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], [[0, 0, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("make", [tied, distinct])
@pytest.mark.parametrize("kernel,size", [(3, 110 // 4), (2, 9), (3, 7)])
def test_tiled_windows_equal_reduce_window_and_its_gradient(make, kernel, size):
    # Kernel = stride, floor mode: XLA's own max-pool gradient also picks the first max in
    # row-major order, so even with ties the gradients are equal.
    x = jnp.asarray(make((2, size, size + 1, 3), 2))
    ref = lambda a: lax.reduce_window(a, -jnp.inf, lax.max, (1, kernel, kernel, 1),
                                      (1, kernel, kernel, 1), "VALID")
    ours = lambda a: binmax.window_max(a, binmax.tiled_edges(size // kernel, kernel),
                                       binmax.tiled_edges((size + 1) // kernel, kernel))
    g = jnp.asarray(np.random.default_rng(3).standard_normal(ref(x).shape).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(ref(x)))
    got = jax.grad(lambda a: jnp.vdot(ours(a), g))(x)
    want = jax.grad(lambda a: jnp.vdot(ref(a), g))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def first_max_cells(x, rows, cols):
    """Brute force per window: its max and the (row, col) of its first max cell in row-major
    order (np.argmax of the row-major flattened window). Each (B, n_rows, n_cols, C)."""
    b, h, w, c = x.shape
    shape = (b, len(rows), len(cols), c)
    y, r, k = np.zeros(shape, np.float32), np.zeros(shape, int), np.zeros(shape, int)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            win = x[:, r0:r1, c0:c1, :]
            y[:, i, j] = win.max(axis=(1, 2))
            dr, dc = np.divmod(win.transpose(0, 3, 1, 2).reshape(b, c, -1).argmax(-1), c1 - c0)
            r[:, i, j], k[:, i, j] = r0 + dr, c0 + dc
    return y, r, k


def pool_ref_with_grad(x, levels, g, bins_of, mode="appendix_a"):
    """Brute-force pyramid values and gradient. A level pooled from the map sends each bin's
    gradient to the bin's first max cell in row-major order; a level derived from a finer one
    (:func:`spp_jax.bins.derivation_plan`: bin (i, j) of level n is the m x m block of level
    n*m's bins at (i*m, j*m)) to the first bin of its block, row-major, holding its max, and
    on to that bin's cell."""
    b, h, w, c = x.shape
    plan, got = B.derivation_plan(levels, mode), {}
    for n in sorted(plan, reverse=True):
        if plan[n] == n:
            got[n] = first_max_cells(x, bins_of(h, n), bins_of(w, n))
            continue
        m = plan[n] // n
        src = [a.reshape(b, n, m, n, m, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n, n, m * m, c)
               for a in got[plan[n]]]  # each bin's block of finer bins, row-major
        first = src[0].argmax(axis=3)[:, :, :, None]  # np.argmax: the first maximal bin
        got[n] = tuple(np.take_along_axis(a, first, axis=3)[:, :, :, 0] for a in src)
    outs, dx, off = [], np.zeros_like(x), 0
    bi, ci = np.meshgrid(np.arange(b), np.arange(c), indexing="ij")
    for n in levels:
        y, r, k = got[n]
        gn = g[:, off:off + n * n * c].reshape(b, n, n, c)
        for i in range(n):
            for j in range(n):
                np.add.at(dx, (bi, r[:, i, j], k[:, i, j], ci), gn[:, i, j])
        outs.append(y.reshape(b, -1))
        off += n * n * c
    return np.concatenate(outs, 1), dx


def test_derived_level_tie_rule_on_a_hand_made_case():
    """Level 3's bin [0, 4) x [0, 4) of a 10x10 map is the 2x2 block of level-6 bins [0, 2) and
    [1, 4) (rows and columns). Its max 1 sits at (0, 3), in bin (0, 1) only, and at (1, 0), in
    bins (0, 0) and (1, 0): the first bin of the block holding the max is (0, 0), so the
    gradient goes to (1, 0), although (0, 3) comes first in row-major order of the window."""
    x = np.zeros((1, 10, 10, 1), np.float32)
    x[0, 0, 3, 0] = x[0, 1, 0, 0] = 1
    g = jax.grad(lambda a: spp_jax.pool(a, (6, 3))[0, 36])(jnp.asarray(x))  # level 3, bin (0, 0)
    want = np.zeros((10, 10))
    want[1, 0] = 1
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], want)


@pytest.mark.parametrize("make", [tied, distinct])
@pytest.mark.parametrize("hw", [(13, 13), (10, 7), (4, 18), (1, 3)])
def test_pyramid_values_and_gradient_with_ties(make, hw):
    levels = (6, 4, 3, 2, 1)  # 3, 2 and 1 are derived from 6 (a grouped max), 4 pooled directly
    x = make((2,) + hw + (3,), 4)
    g = np.random.default_rng(5).standard_normal((2, 3 * B.num_bins(levels))).astype(np.float32)
    y, vjp = jax.vjp(lambda a: spp_jax.pool(a, levels), jnp.asarray(x))
    y_ref, dx_ref = pool_ref_with_grad(x, levels, g, B.bin_edges)
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), dx_ref, rtol=1e-6, atol=1e-6)


def test_released_pyramid_gradient_with_ties():
    levels = (6, 3, 2, 1)
    x = tied((2, 13, 9, 2), 6)
    g = np.random.default_rng(7).standard_normal((2, 2 * 50)).astype(np.float32)
    y, vjp = jax.vjp(lambda a: spp_jax.pool(a, levels, mode="released"), jnp.asarray(x))
    y_ref, dx_ref = pool_ref_with_grad(x, levels, g, released_bins, mode="released")
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), dx_ref, rtol=1e-6, atol=1e-6)


def test_pyramid_gradient_equals_default_autodiff_without_ties():
    # The plain formulation (per-bin slices, jnp.max): JAX's default gradient.
    levels = (6, 3, 2, 1)
    x = jnp.asarray(distinct((3, 13, 11, 4), 8))

    def plain(a):
        h, w = a.shape[1:3]
        return jnp.concatenate([jnp.stack([jnp.stack([a[:, r0:r1, c0:c1].max(axis=(1, 2))
                                                      for c0, c1 in B.bin_edges(w, n)], 1)
                                           for r0, r1 in B.bin_edges(h, n)], 1).reshape(a.shape[0], -1)
                                for n in levels], 1)
    g = jnp.asarray(np.random.default_rng(9).standard_normal((3, 4 * 50)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(spp_jax.pool(x, levels)), np.asarray(plain(x)))
    got = jax.grad(lambda a: jnp.vdot(spp_jax.pool(a, levels), g))(x)
    want = jax.grad(lambda a: jnp.vdot(plain(a), g))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_works_under_vmap_and_jit():
    x = jnp.asarray(tied((3, 2, 9, 9, 2), 10))
    f = jax.jit(jax.vmap(jax.grad(lambda a: spp_jax.pool(a, (3, 1)).sum())))
    want = np.stack([np.asarray(jax.grad(lambda a: spp_jax.pool(a, (3, 1)).sum())(xi)) for xi in x])
    np.testing.assert_array_equal(np.asarray(f(x)), want)


def test_period_of_appendix_a_bins():
    # Hand-checked: bins of a 10-cell axis at n = 6 are the 3 bins of 5 cells, twice.
    e = lambda a, n: binmax.as_edges(B.bin_edges(a, n))  # noqa: E731
    assert binmax._period(e(10, 6), 10) == (3, 5)
    assert binmax._period(e(9, 6), 9) == (2, 3)
    assert binmax._period(e(20, 6), 20) == (3, 10)
    assert binmax._period(e(13, 6), 13) is None  # gcd 1
    assert binmax._period(((0, 2), (1, 4), (5, 7), (6, 9)), 10) == (2, 5)
    assert binmax._period(((0, 2), (1, 4), (5, 7), (7, 9)), 10) is None  # [7,9) is not [1,4) + 5
    assert binmax._period(((0, 2), (1, 4), (5, 7), (6, 9)), 12) is None  # periods must tile the axis
    assert binmax._period(((0, 6), (5, 11)), 10) is None  # a bin reaching past its period


@pytest.mark.parametrize("make", [tied, distinct])
def test_periodic_uneven_windows(make):
    # 10 rows x 9 cols at n = 6: both axes periodic (the reshaped path), against brute force.
    x = make((2, 10, 9, 3), 4)
    check_window(x, binmax.as_edges(B.bin_edges(10, 6)), binmax.as_edges(B.bin_edges(9, 6)))
