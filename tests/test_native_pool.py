"""The native pyramid max (spp_jax.native.pool): values and gradients against brute force
(ties, overlapping and repeated bins, NaN), derived levels against pool's XLA formulation,
under vmap, and as ``pool``'s program."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from reference import pool_ref, window_ref
from spp_jax import native, pooling
from spp_jax.native import pool as npool

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "c++") is None or not native.cpu_supported(),
    reason="no C++ compiler or no AVX-512: pool runs binmax's XLA ops (tests/test_binmax.py)")

# (B, H, W, C): channels in 4-vector blocks (256), single vectors (16, 80 = 64 + 16), a part
# vector (3, 12) and all three (70 = 64 + 6).
SHAPES = [(2, 10, 10, 70), (3, 7, 9, 16), (1, 5, 6, 3), (2, 13, 13, 256), (2, 11, 8, 12),
          (1, 6, 7, 80)]


def window_max(x, rows, cols):
    """One level pooled from the map, as (B, n, m, C)."""
    y = npool.pyramid_max(x, [npool.Level(rows, cols)])
    return y.reshape(x.shape[0], len(rows), len(cols), x.shape[3])


def _windows(h, w):
    """Overlapping, uneven, repeated and whole-axis windows."""
    rows = ((0, 2), (1, 4), (3, 5), (h - 2, h), (0, h), (1, 4))
    cols = ((0, w), (2, 3), (1, 4), (0, 1), (0, 1), (w - 3, w))
    return rows, cols


@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_first_max_gradient_equal_brute_force(shape):
    assert native.available()  # a compiler on an AVX-512 CPU: the kernels must build
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, shape).astype(np.float32)  # few values: ties in most windows
    rows, cols = _windows(*shape[1:3])
    g = rng.standard_normal((shape[0], len(rows), len(cols), shape[3])).astype(np.float32)
    y_ref, dx_ref = window_ref(x, rows, cols, g)
    y, vjp = jax.vjp(lambda a: window_max(a, rows, cols), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    # a cell in several windows sums their cotangents: the same few floats, maybe reordered
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), dx_ref, rtol=1e-6, atol=1e-6)


def test_a_window_holding_nan_is_nan_and_passes_no_gradient():
    x = np.arange(2 * 4 * 4 * 20, dtype=np.float32).reshape(2, 4, 4, 20)
    x[0, 1, 1, 3] = np.nan
    x[1, 0, 0, 17] = np.nan  # the first cell of a window, in the part vector
    rows, cols = ((0, 2), (2, 4)), ((0, 2), (1, 4))
    f = lambda a: window_max(a, rows, cols)  # noqa: E731
    y = np.asarray(f(jnp.asarray(x)))
    dx = np.asarray(jax.grad(lambda a: f(a).sum())(jnp.asarray(x)))
    clean = np.nan_to_num(x, nan=-1.0)
    y_ref, dx_ref = window_ref(clean, rows, cols, np.ones(y.shape, np.float32))
    bad = np.zeros(y.shape, bool)
    bad[0, 0, :, 3] = True          # windows (0, 0) and (0, 1) hold cell (1, 1)
    bad[1, 0, 0, 17] = True
    assert np.isnan(y[bad]).all() and np.array_equal(y[~bad], y_ref[~bad])
    # the NaN windows' cotangents reach nothing; every other window's reach its first max
    _, dx_bad = window_ref(clean, rows, cols, bad.astype(np.float32))
    np.testing.assert_array_equal(dx, dx_ref - dx_bad)


def test_runs_as_ffi_calls_and_under_vmap():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 9, 8, 20)), jnp.float32)
    rows, cols = ((0, 3), (2, 9)), ((0, 5), (4, 8))
    txt = jax.jit(jax.grad(lambda a: window_max(a, rows, cols).sum())).lower(
        x[0]).compile().as_text()
    assert "spp_pyramid_max" in txt and "spp_pyramid_max_grad" in txt
    ys = jax.vmap(lambda a: window_max(a, rows, cols))(x)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(ys[i]), window_ref(np.asarray(x[i]), rows, cols,
                                      np.zeros(ys.shape[1:], np.float32))[0])


@pytest.mark.parametrize("bad", [((0, 0),), ((2, 1),), ((0, 10),), ()])
def test_bins_outside_the_map_are_refused(bad):
    with pytest.raises(ValueError, match="rows .* are not bins of a 9-cell axis"):
        window_max(jnp.ones((1, 9, 9, 4)), bad, ((0, 1),))


def test_a_derived_level_needs_a_square_level_from_the_map():
    lv = npool.Level(((0, 2),), ((0, 2),), 0)
    with pytest.raises(ValueError, match="source 0 is not a square level pooled from the map"):
        npool.pyramid_max(jnp.ones((1, 9, 9, 4)), [lv])


@pytest.mark.parametrize("side,levels", [(10, (6, 3, 2, 1)), (13, (1, 2, 3, 6)), (7, (4, 2, 2, 1)),
                                         (18, (3, 6, 9))])
def test_pool_runs_natively_and_matches_brute_force_and_the_xla_rule(side, levels):
    # pool's whole pyramid is one native call; values exact; gradients those of the XLA
    # formulation (binmax), whose derived levels (3, 2, 1 from 6) route a tie to the first
    # finer bin holding the max: ties come from a few distinct values.
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, (2, side, side, 24)).astype(np.float32)
    assert "spp_pyramid_max" in jax.jit(lambda a: spp_jax.pool(a, levels)).lower(
        jnp.asarray(x)).compile().as_text()
    np.testing.assert_array_equal(np.asarray(spp_jax.pool(jnp.asarray(x), levels)),
                                  pool_ref(x, levels))
    g = rng.standard_normal((2, 24 * sum(n * n for n in levels))).astype(np.float32)
    dx = jax.grad(lambda a: jnp.vdot(spp_jax.pool(a, levels), jnp.asarray(g)))(jnp.asarray(x))
    # the XLA formulation of the same pyramid (binmax), the same rule
    xla = lambda a: jnp.concatenate([  # noqa: E731
        v.reshape(2, -1) for v in _xla_pyramid(a, levels)], -1)
    dx_xla = jax.grad(lambda a: jnp.vdot(xla(a), jnp.asarray(g)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_xla), rtol=1e-6, atol=1e-6)


def _xla_pyramid(a, levels):
    real = native.usable
    native.usable = lambda: False
    try:
        got = pooling._pyramid(a, levels, "appendix_a")
    finally:
        native.usable = real
    return [got[n] for n in levels]
