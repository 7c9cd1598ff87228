"""spp_jax.pool and the Appendix A bins, against brute-force references and the paper."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import spp_jax
from spp_jax import bins as B
from spp_jax import pooling
from tests.reference import appendix_a_bins, caffe_pool_windows, pool_ref, released_bins, roi_pool_ref

LEVELS = (6, 4, 3, 2, 1)  # the paper's pyramids use these; 4 exercises a level not derived from 6


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_bin_edges_every_axis_length(n):
    for a in range(1, 65):
        edges = B.bin_edges(a, n)
        assert edges == appendix_a_bins(a, n)
        assert len(edges) == n and edges[0][0] == 0 and edges[-1][1] == a
        for (s0, e0), (s1, e1) in zip(edges, edges[1:]):
            assert e0 - s0 >= 1  # never empty, even when a < n
            assert s1 <= e0 and e0 - s1 <= 1  # contiguous, overlap by at most one cell
        start, end = B.bin_edges_array(np.array([a]), n)
        assert [tuple(p) for p in zip(start[0], end[0])] == edges


def test_window_stride_recipe_fails_exactly_where_the_facts_say():
    # SPP_FACTS section 1: exact n bins covering the axis iff a >= n and a mod n in {0, 1};
    # then the windows equal Appendix A's.
    for n in (1, 2, 3, 4, 6):
        for a in range(1, 65):
            d = B.window_stride_bins(a, n)
            assert d.valid == (a >= n and a % n in (0, 1)), (a, n)
            if d.valid:
                assert [(i * d.stride, i * d.stride + d.window) for i in range(n)] == B.bin_edges(a, n)


def test_window_stride_paper_config_at_13():
    # cuda-convnet config of the paper for a 13x13 conv5: 3x3 level = window 5 stride 4, 2x2 =
    # window 7 stride 6, 1x1 = window 13 stride 13, 6x6 = window 3 stride 2.
    got = {n: (B.window_stride_bins(13, n).window, B.window_stride_bins(13, n).stride) for n in (6, 3, 2, 1)}
    assert got == {6: (3, 2), 3: (5, 4), 2: (7, 6), 1: (13, 13)}
    # and the failures the facts name for a 180 input (a = 10)
    assert B.window_stride_bins(10, 6).count == 9
    assert B.window_stride_bins(10, 4).covered == 9


SHAPES = [(k, 41 - k) for k in range(1, 41)] + [(k, k) for k in (1, 2, 5, 6, 7, 10, 13, 18, 40)]


def test_pool_matches_brute_force_every_side_1_to_40():
    # Every H and every W in 1..40 occurs (non-square: H + W = 41), plus squares.
    rng = np.random.default_rng(0)
    for h, w in SHAPES:
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(spp_jax.pool(x, LEVELS)), pool_ref(x, LEVELS), err_msg=f"{h}x{w}")


def test_pool_13x13_equals_paper_max_pools():
    # The paper's sliding-window pools at 13x13, written with lax.reduce_window directly.
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 13, 13, 4)), jnp.float32)
    parts = []
    for n, (win, stride) in ((6, (3, 2)), (3, (5, 4)), (2, (7, 6)), (1, (13, 13))):
        p = lax.reduce_window(x, -jnp.inf, lax.max, (1, win, win, 1), (1, stride, stride, 1), "VALID")
        assert p.shape == (2, n, n, 4)
        parts.append(p.reshape(2, -1))
    want = jnp.concatenate(parts, axis=1)
    np.testing.assert_array_equal(spp_jax.pool(x), want)
    np.testing.assert_array_equal(spp_jax.pool(x, mode="window_stride"), want)


def test_released_mode_at_13_is_the_released_caffe_pyramid():
    # Zeiler_conv5.prototxt: four Caffe ceil-mode pools on the 13x13 conv5 map, 6x6 kernel 3
    # stride 2, 3x3 kernel 5 stride 4, 2x2 kernel 7 stride 7, 1x1 kernel 13 (SPP_FACTS section 3).
    x = np.random.default_rng(3).standard_normal((2, 13, 13, 4)).astype(np.float32)
    parts = []
    for n, k, s in ((6, 3, 2), (3, 5, 4), (2, 7, 7), (1, 13, 13)):
        win = caffe_pool_windows(13, k, s)
        assert len(win) == n
        parts.append(np.stack([np.stack([x[:, y0:y1, x0:x1].max(axis=(1, 2)) for x0, x1 in win], 1)
                               for y0, y1 in win], 1).reshape(2, -1))
    want = np.concatenate(parts, axis=1)
    np.testing.assert_array_equal(spp_jax.pool(x, mode="released"), want)
    assert B.bin_edges(13, 2, "released") == [(0, 7), (7, 13)] != B.bin_edges(13, 2)
    assert not np.array_equal(spp_jax.pool(x), want)  # Appendix A's 2x2 level differs there


def test_released_mode_every_axis_length_pool_and_windows():
    rng = np.random.default_rng(4)
    for a in range(1, 65):
        for n in (1, 2, 3, 4, 6):
            edges = B.bin_edges(a, n, "released")
            assert edges == released_bins(a, n), (a, n)
            start, end = B.bin_edges_array(np.array([a]), n, mode="released")
            assert [tuple(p) for p in zip(start[0], end[0])] == edges
    for h, w in SHAPES[::6]:  # a few maps (each compiles); the bins above cover every length
        x = rng.standard_normal((1, h, w, 2)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(spp_jax.pool(x, LEVELS, mode="released")),
                                      pool_ref(x, LEVELS, released_bins), err_msg=f"{h}x{w}")
    fmap = rng.standard_normal((23, 17, 3)).astype(np.float32)
    x0, y0 = rng.integers(0, 17, 40), rng.integers(0, 23, 40)
    cells = np.stack([x0, y0, rng.integers(x0, 17), rng.integers(y0, 23)], 1).astype(np.int32)
    got = spp_jax.roi_pool_cells(jnp.asarray(fmap), jnp.asarray(cells), (6, 3, 2, 1), mode="released")
    np.testing.assert_array_equal(np.asarray(got), roi_pool_ref(fmap, cells, (6, 3, 2, 1), released_bins))


def test_window_stride_mode_equals_default_where_valid_and_raises_elsewhere():
    rng = np.random.default_rng(2)
    for h, w in [(13, 13), (12, 19), (6, 7), (25, 13)]:  # valid for (6, 3, 2, 1) on both axes
        x = rng.standard_normal((1, h, w, 2)).astype(np.float32)
        np.testing.assert_array_equal(spp_jax.pool(x, mode="window_stride"), spp_jax.pool(x))
    with pytest.raises(ValueError, match=r"a=10, n=6: window 2, stride 1 gives 9 bins"):
        spp_jax.pool(np.zeros((1, 10, 10, 1), np.float32), mode="window_stride")
    with pytest.raises(ValueError, match=r"a=10, n=4: .*covering cells \[0, 9\) of 10"):
        spp_jax.pool(np.zeros((1, 10, 13, 1), np.float32), (4,), mode="window_stride")
    with pytest.raises(ValueError, match=r"a=3 < n=6"):
        spp_jax.pool(np.zeros((1, 13, 3, 1), np.float32), mode="window_stride")


def test_output_layout_levels_rowmajor_channels_innermost():
    # Hand-computed: a 2x2 map whose cells hold distinct values per channel.
    x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)  # x[0, y, x_, c] = 6y + 3x + c
    out = np.asarray(spp_jax.pool(x, (2, 1)))[0]
    np.testing.assert_array_equal(out[:12], x.reshape(-1))  # level 2: cells row-major, C innermost
    np.testing.assert_array_equal(out[12:], [9, 10, 11])  # level 1: max per channel
    assert spp_jax.output_dim(256) == 12800 and spp_jax.output_dim(512) == 25600  # paper's fc6 inputs
    assert spp_jax.output_dim(256, (4, 3, 2, 1)) == 256 * 30


def test_caffe_permutation_hand_case():
    x = np.arange(2 * 2 * 2, dtype=np.float32).reshape(1, 2, 2, 2)
    ours = np.asarray(spp_jax.pool(x, (2, 1)))[0]
    perm = spp_jax.caffe_permutation(2, (2, 1), caffe_order=(1, 2))
    # Caffe: level 1 first, then level 2 flattened (C, y, x).
    want = np.concatenate([x[0].max(axis=(0, 1)), x[0].transpose(2, 0, 1).reshape(-1)])
    np.testing.assert_array_equal(ours[perm], want)


def test_dtypes_preserved():
    for dt in (jnp.float16, jnp.bfloat16, jnp.float32):
        x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 5, 7, 2)), dt)
        out = spp_jax.pool(x, (2, 1))
        assert out.dtype == dt
        np.testing.assert_array_equal(np.asarray(out, np.float32),
                                      pool_ref(np.asarray(x, np.float32), (2, 1)))


def test_second_call_same_shape_does_not_retrace():
    x = np.random.default_rng(4).standard_normal((3, 9, 11, 2)).astype(np.float32)
    spp_jax.pool(x)
    before = pooling._TRACE_COUNT[0]
    spp_jax.pool(x + 1.0)
    spp_jax.pool(jnp.asarray(x) * 2.0)
    assert pooling._TRACE_COUNT[0] == before
    spp_jax.pool(x[:, :8])  # a new shape does compile a new program
    assert pooling._TRACE_COUNT[0] == before + 1


def test_vmap_and_jit_compose():
    x = np.random.default_rng(5).standard_normal((4, 2, 7, 6, 3)).astype(np.float32)
    got = jax.jit(jax.vmap(lambda m: spp_jax.pool(m, (3, 1))))(x)
    np.testing.assert_array_equal(got, np.stack([pool_ref(m, (3, 1)) for m in x]))


def test_gradient_finite_differences_and_argmax_routing():
    # Distinct values (no ties) so max pooling is differentiable around x.
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.permutation(2 * 5 * 7 * 2).reshape(2, 5, 7, 2) / 10.0, jnp.float32)
    check_grads(lambda m: spp_jax.pool(m, (3, 2, 1)), (x,), order=1, modes=("rev",), eps=1e-3,
                atol=1e-2, rtol=1e-2)
    # A single 1x1 bin: the gradient is one-hot at each channel's arg-max cell.
    g = jax.grad(lambda m: spp_jax.pool(m, (1,)).sum())(x)
    flat = np.asarray(x).reshape(2, -1, 2)
    want = np.zeros_like(flat)
    for b in range(2):
        for c in range(2):
            want[b, flat[b, :, c].argmax(), c] = 1.0
    np.testing.assert_array_equal(np.asarray(g).reshape(2, -1, 2), want)


@pytest.mark.parametrize("bad, exc, msg", [
    (np.zeros((5, 5, 3), np.float32), ValueError, "rank 4"),
    (np.zeros((1, 0, 5, 3), np.float32), ValueError, "zero-size"),
    (np.zeros((1, 5, 5, 3), np.int32), TypeError, "floating dtype"),
    ([[1.0]], TypeError, "must be an array"),
])
def test_bad_maps(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        spp_jax.pool(bad)


@pytest.mark.parametrize("levels, exc, msg", [
    ((), ValueError, "empty"),
    ((6, 0), ValueError, ">= 1"),
    ((6, -2), ValueError, ">= 1"),
    ((6, 2.0), TypeError, "ints"),
    ((True,), TypeError, "ints"),
    (None, TypeError, "sequence"),
])
def test_bad_levels(levels, exc, msg):
    with pytest.raises(exc, match=msg):
        spp_jax.pool(np.zeros((1, 4, 4, 1), np.float32), levels)


def test_bad_mode():
    with pytest.raises(ValueError, match="window_stride"):
        spp_jax.pool(np.zeros((1, 4, 4, 1), np.float32), mode="avg")


def test_derivation_plan_is_exact_union():
    # The coarse-from-fine shortcut relies on bin i of n being the union of bins i*m..(i+1)*m-1 of n*m.
    for a in range(1, 65):
        for n, m in ((3, 2), (2, 3), (1, 6), (2, 2)):
            fine = B.bin_edges(a, n * m)
            for i, (s, e) in enumerate(B.bin_edges(a, n)):
                group = fine[i * m:(i + 1) * m]
                assert (group[0][0], group[-1][1]) == (s, e)
                assert all(g1[0] <= g0[1] for g0, g1 in zip(group, group[1:]))
    assert B.derivation_plan((6, 3, 2, 1)) == {6: 6, 3: 6, 2: 6, 1: 6}
    assert B.derivation_plan((4, 3, 2, 1))[3] == 3 and B.derivation_plan((4, 3, 2, 1))[2] == 4
    assert B.derivation_plan((6, 3, 2, 1), "released") == {6: 6, 3: 6, 2: 2, 1: 2}  # released 2x2: direct
    assert math.isclose(B.num_bins((6, 3, 2, 1)), 50)


def test_transposed_layout_maps_the_transposes_pyramid_to_the_maps():
    """pool of a map == transposed_layout(pool of its transpose), on non-square maps whose
    bins overlap differently along the two axes; and the layout swap is its own inverse."""
    from spp_jax.pooling import transposed_layout

    rng = np.random.default_rng(0)
    for h, w in ((7, 13), (10, 4), (1, 5)):
        x = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
        direct = np.asarray(spp_jax.pool(x, (6, 3, 2, 1)))
        via_t = transposed_layout(np.asarray(spp_jax.pool(jnp.swapaxes(x, 1, 2), (6, 3, 2, 1))), 3, (6, 3, 2, 1))
        np.testing.assert_array_equal(via_t, direct)
        np.testing.assert_array_equal(transposed_layout(transposed_layout(direct, 3), 3), direct)
    with pytest.raises(ValueError, match="not 3 channels"):
        transposed_layout(np.zeros((1, 10)), 3)
