"""Gradients through window pooling: roi_pool against finite differences and a brute-force
masked-max reference (each bin's gradient on that bin's argmax), the tie rule, and the gradient
through a padded batch's conv maps + project_boxes + roi_pool."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import spp_jax
from spp_jax.models import SPPNet, get_model, random_variables
from spp_jax.roi import roi_pool_cells
from tests.reference import appendix_a_bins, roi_pool_ref

LEVELS = (6, 3, 2, 1)


def _cells(rng, n, h, w):
    """Random inclusive windows, plus the whole map and a single cell; some overlap."""
    x0, y0 = rng.integers(0, w, n), rng.integers(0, h, n)
    x1, y1 = rng.integers(x0, w), rng.integers(y0, h)
    cells = np.stack([x0, y0, x1, y1], 1)
    cells[0] = [0, 0, w - 1, h - 1]
    cells[1] = [2, 1, 2, 1]
    return cells.astype(np.int32)


def _bins(cell, n):
    """(y0, y1, x0, x1) absolute half-open bin ranges of level n on one window, row-major."""
    x0, y0, x1, y1 = (int(v) for v in cell)
    return [(y0 + a, y0 + b, x0 + c, x0 + d) for a, b in appendix_a_bins(y1 - y0 + 1, n)
            for c, d in appendix_a_bins(x1 - x0 + 1, n)]


def masked_max_grad_ref(fmap, cells, levels, cot):
    """Brute force: each output value is the max of fmap under a mask of its bin; its cotangent
    ``cot[r, k]`` goes to the argmax cell of that masked map (tie-free input assumed)."""
    h, w, c = fmap.shape
    grad = np.zeros_like(fmap, dtype=np.float64)
    for r, cell in enumerate(cells):
        k = 0
        for n in levels:
            for y0, y1, x0, x1 in _bins(cell, n):
                mask = np.zeros((h, w), bool)
                mask[y0:y1, x0:x1] = True
                for ch in range(c):
                    masked = np.where(mask, fmap[:, :, ch], -np.inf)
                    yy, xx = np.unravel_index(np.argmax(masked), (h, w))
                    grad[yy, xx, ch] += cot[r, k + ch]
                k += c
    return grad


def _tie_free(rng, h, w, c):
    """Distinct integers 0..h*w*c-1 in random places: every gap is 1, so no bin has a tie."""
    return (rng.permutation(h * w * c).reshape(h, w, c)).astype(np.float32)


def test_grad_matches_central_finite_differences_on_a_tie_free_map():
    rng = np.random.default_rng(0)
    h, w, c = 5, 7, 2
    fmap = _tie_free(rng, h, w, c)
    cells = _cells(rng, 6, h, w)
    cot = rng.standard_normal((len(cells), c * 50)).astype(np.float32)
    loss = jax.jit(lambda m: jnp.sum(roi_pool_cells(m, cells, LEVELS) * cot))
    g = np.asarray(jax.grad(loss)(jnp.asarray(fmap)))
    # Max pooling is piecewise linear; with gaps of 1 a step of 0.25 never changes an argmax,
    # so the central difference is the exact derivative (up to float32 rounding of the sums).
    eps = 0.25
    fd = np.zeros_like(fmap)
    for idx in np.ndindex(fmap.shape):
        d = np.zeros_like(fmap)
        d[idx] = eps
        fd[idx] = (float(loss(fmap + d)) - float(loss(fmap - d))) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())
    assert np.count_nonzero(g) > 0.3 * g.size  # the windows cover much of the map


def test_grad_equals_masked_max_reference_on_a_tie_free_map():
    rng = np.random.default_rng(1)
    h, w, c = 9, 8, 3
    fmap = _tie_free(rng, h, w, c)
    cells = _cells(rng, 12, h, w)
    np.testing.assert_array_equal(roi_pool_cells(fmap, cells, LEVELS), roi_pool_ref(fmap, cells, LEVELS))
    cot = rng.standard_normal((len(cells), c * 50)).astype(np.float32)
    _, vjp = jax.vjp(lambda m: roi_pool_cells(m, cells, LEVELS), jnp.asarray(fmap))
    got = np.asarray(vjp(jnp.asarray(cot))[0])
    np.testing.assert_allclose(got, masked_max_grad_ref(fmap, cells, LEVELS, cot), rtol=1e-5, atol=1e-5)


def _bin_cotangents(cells, levels, c):
    """Every (window, level, bin, channel) output, as (row, column, window cell, bin range, channel)."""
    out = []
    for r, cell in enumerate(cells):
        k = 0
        for n in levels:
            for b in _bins(cell, n):
                for ch in range(c):
                    out.append((r, k + ch, b, ch))
                k += c
    return out


def test_ties_the_gradient_is_split_over_every_tied_argmax_and_sums_to_the_cotangent():
    # The tie rule jax follows (documented in README "Detection"): lax.max passes half of the
    # cotangent to each of two equal operands and reduce_max splits it equally over equal
    # elements. roi_pool takes each bin's max as a tree of such maxima (sparse-table blocks,
    # then coarser levels from finer bins), so a bin's cotangent is split over ALL its tied
    # maximal cells, in shares that depend on that tree (not equal shares, not Caffe's "all to
    # the first argmax"), and the shares sum to the cotangent: the gradient's total is exact.
    rng = np.random.default_rng(2)
    h, w, c = 6, 7, 2
    fmap = rng.integers(0, 3, (h, w, c)).astype(np.float32)  # many exact ties
    cells = _cells(rng, 5, h, w)
    levels = (3, 2, 1)
    f = jax.jit(lambda m: roi_pool_cells(m, cells, levels))
    _, vjp = jax.vjp(f, jnp.asarray(fmap))
    vjp = jax.jit(vjp)
    n_tied = 0
    for r, k, (y0, y1, x0, x1), ch in _bin_cotangents(cells, levels, c):
        cot = np.zeros((len(cells), c * 14), np.float32)
        cot[r, k] = 1.0
        g = np.asarray(vjp(jnp.asarray(cot))[0])
        binv = fmap[y0:y1, x0:x1, ch]
        argmax = np.zeros((h, w, c), bool)
        argmax[y0:y1, x0:x1, ch] = binv == binv.max()
        assert np.all((g > 0) == argmax), (r, k)  # every tied argmax gets a share, nothing else
        assert abs(g.sum() - 1.0) < 1e-6
        n_tied += argmax.sum() > 1
    assert n_tied > 20  # the input really has ties


def test_tie_shares_hand_case():
    # One 4x4 window, one bin, four cells tied at 1 (the rest 0): the shares follow the table's
    # max tree. These exact numbers document the rule; a change to roi_pool's internals may move
    # them (then update the README's sentence), never their support or their sum.
    fmap = np.zeros((4, 4, 1), np.float32)
    fmap[0, 0] = fmap[0, 1] = fmap[1, 0] = fmap[3, 3] = 1.0
    g = np.asarray(jax.grad(lambda m: roi_pool_cells(m, np.array([[0, 0, 3, 3]], np.int32), (1,)).sum())(
        jnp.asarray(fmap)))[..., 0]
    want = np.zeros((4, 4))
    want[0, 0], want[0, 1], want[1, 0], want[3, 3] = 0.125, 0.25, 0.125, 0.5
    np.testing.assert_array_equal(g, want)


@functools.lru_cache(maxsize=None)
def _net():
    m = get_model("zf5", width=0.05, fc_dim=16, num_classes=4, init_scheme="he")
    return m, random_variables(m, 0, bias_std=0.1)


def _pooled_loss(model, boxes, cot, levels=(2, 1)):
    """Scalar of conv5 params: padded batch -> conv maps -> project_boxes -> roi_pool (traced boxes)."""
    def loss(conv5, variables, pixels, hw):
        params = {**variables["params"], "backbone": {**variables["params"]["backbone"], "conv5": conv5}}
        fmap, map_hw = model.apply({"params": params}, pixels, valid_hw=hw, method=SPPNet.conv_map)
        total = 0.0
        for i in range(pixels.shape[0]):
            h, w = int(map_hw_host[i][0]), int(map_hw_host[i][1])  # static per image (host side)
            cells = spp_jax.project_boxes(boxes[i], model.geometry, (h, w))
            total = total + jnp.sum(roi_pool_cells(fmap[i, :h, :w], cells, levels) * cot[i])
        return total
    map_hw_host: list = []
    return loss, map_hw_host


def test_grad_through_conv_maps_project_boxes_and_roi_pool():
    m, v = _net()
    rng = np.random.default_rng(3)
    views = [rng.normal(0, 1, (64, 80, 3)).astype(np.float32), rng.normal(0, 1, (72, 64, 3)).astype(np.float32)]
    pixels = np.zeros((2, 72, 80, 3), np.float32)
    for i, x in enumerate(views):
        pixels[i, :x.shape[0], :x.shape[1]] = x
    hw = np.array([x.shape[:2] for x in views], np.int32)
    from spp_jax.serve import Server
    map_hw = Server(m, v).map_hw(hw)
    boxes = jnp.asarray([[[0, 0, 79, 63], [10, 5, 50, 40]], [[0, 0, 63, 71], [20, 30, 60, 70]]], jnp.float32)
    c = m.channels
    cot = jnp.asarray(rng.standard_normal((2, 2, c * 5)), jnp.float32)
    loss, host = _pooled_loss(m, boxes, cot)
    host.extend(map_hw.tolist())
    conv5 = v["params"]["backbone"]["conv5"]
    f = jax.jit(functools.partial(loss, variables=v, pixels=jnp.asarray(pixels), hw=jnp.asarray(hw)))
    # Central differences along random directions. ReLU and max are kinked: a step of 1e-3
    # already crosses kinks (10 % off here, 1 % even without window pooling), 1e-4 does not.
    g = f_grad = jax.jit(jax.grad(f))(conv5)
    for seed in range(3):
        d = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(seed).normal(0, 1, a.shape), a.dtype), conv5)
        step = lambda s: jax.tree.map(lambda a, b: a + s * b, conv5, d)  # noqa: E731
        fd = (float(f(step(1e-4))) - float(f(step(-1e-4)))) / 2e-4
        exact = sum(float(jnp.vdot(f_grad[k], d[k])) for k in d)
        assert abs(fd - exact) <= 0.03 * abs(exact) + 1e-3, (seed, fd, exact)
    # Exact padding holds backwards too: the padded batch's gradient is the sum of each image's
    # gradient computed alone and unpadded.
    alone = []
    for i, x in enumerate(views):
        li, hi = _pooled_loss(m, boxes[i:i + 1], cot[i:i + 1])
        hi.append(map_hw[i].tolist())
        alone.append(jax.jit(jax.grad(li))(conv5, v, jnp.asarray(x[None]), jnp.asarray(hw[i:i + 1])))
    want = jax.tree.map(lambda a, b: a + b, *alone)
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(want[k]), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(want[k]).max()))
