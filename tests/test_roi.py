"""project_boxes and roi_pool against brute-force references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import spp_jax
from spp_jax.roi import roi_pool_cells, sparse_table
from tests.reference import pool_ref, project_ref, roi_pool_ref

ZF = spp_jax.Geometry(stride=16, offset=20, slack=1.5)  # the released ZF-5


def _boxes(rng, n, w, h):
    """Random windows of every kind: inside, partly/fully outside, sub-cell, degenerate, whole image."""
    x1 = rng.uniform(-60, w + 60, n)
    y1 = rng.uniform(-60, h + 60, n)
    bw = rng.choice([0.0, 0.5, 3.0, 10.0, 40.0, 150.0, 400.0], n) * rng.uniform(0.5, 1.0, n)
    bh = rng.choice([0.0, 0.5, 3.0, 10.0, 40.0, 150.0, 400.0], n) * rng.uniform(0.5, 1.0, n)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1)
    boxes[:5] = boxes[:5, [2, 3, 0, 1]]  # degenerate: x2 < x1, y2 < y1
    boxes[5] = [0, 0, w - 1, h - 1]  # the whole image
    boxes[6] = [17, 33, 17, 33]  # a single pixel
    return np.round(boxes * 2) / 2  # include exact .5 and integer coordinates (ties at centres)


@pytest.mark.parametrize("geom", [ZF, spp_jax.Geometry(12, 7, 1.5), spp_jax.Geometry(16, 0, 0.0)])
def test_project_boxes_matches_enumeration(geom):
    rng = np.random.default_rng(0)
    h, w = 11, 17
    boxes = _boxes(rng, 300, w * geom.stride, h * geom.stride)
    want = np.array([project_ref(b, geom.stride, geom.offset, geom.slack, h, w) for b in boxes])
    got = np.asarray(spp_jax.project_boxes(boxes, geom, (h, w)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(spp_jax.project_boxes(boxes, geom, (h, w), xp=np), want)
    assert got.dtype == np.int32
    assert np.all(got[:, :2] <= got[:, 2:]) and np.all(got >= 0)
    assert np.all(got[:, [0, 2]] < w) and np.all(got[:, [1, 3]] < h)


def test_project_boxes_paper_rule_hand_cases():
    # Paper (offset 0, slack 0): left edge -> floor(x/S) + 1, right edge -> ceil(x/S) - 1.
    g = spp_jax.Geometry(16, 0.0, 0.0)
    cells = np.asarray(spp_jax.project_boxes([[40, 40, 200, 120]], g, (100, 100)))
    assert cells.tolist() == [[40 // 16 + 1, 40 // 16 + 1, -(-200 // 16) - 1, -(-120 // 16) - 1]]
    # Released ZF-5 geometry: centres 20, 36, 52, ... A window [21.6, 52] keeps centres 36 and 52
    # (20 lies 1.6 px outside, more than the 1.5 slack); [21.4, 53.4] keeps 20 too.
    assert np.asarray(spp_jax.project_boxes([[21.6, 0, 52, 0]], ZF, (9, 9)))[0, [0, 2]].tolist() == [1, 2]
    assert np.asarray(spp_jax.project_boxes([[21.4, 0, 53.4, 0]], ZF, (9, 9)))[0, [0, 2]].tolist() == [0, 2]
    # [70, 80] lies between centres 68 (cell 3) and 84 (cell 4): start 4 > end 3 collapse to (4+3)//2.
    assert np.asarray(spp_jax.project_boxes([[70, 70, 80, 80]], ZF, (9, 9)))[0].tolist() == [3, 3, 3, 3]


def test_roi_pool_every_window_size_on_a_40x40_map():
    # All (h, w) in 1..40 x 1..40 at random positions: one compiled program, 1600 windows.
    rng = np.random.default_rng(1)
    fmap = rng.standard_normal((40, 40, 3)).astype(np.float32)
    hh, ww = np.meshgrid(np.arange(1, 41), np.arange(1, 41), indexing="ij")
    hh, ww = hh.ravel(), ww.ravel()
    y0 = rng.integers(0, 41 - hh)
    x0 = rng.integers(0, 41 - ww)
    cells = np.stack([x0, y0, x0 + ww - 1, y0 + hh - 1], 1).astype(np.int32)
    levels = (6, 4, 3, 2, 1)
    got = np.asarray(roi_pool_cells(fmap, cells, levels))
    np.testing.assert_array_equal(got, roi_pool_ref(fmap, cells, levels))


@pytest.mark.parametrize("ky, kx", [(0, 0), (3, 1), (2, 4)])
def test_sparse_table_is_the_block_maxima(ky, kx):
    # Every entry whose 2**i x 2**j block fits the (non-square) map is that block's max;
    # entries with blocks past the edge are never read, so they are not checked.
    rng = np.random.default_rng(7)
    fmap = rng.integers(-3, 4, (9, 17, 2)).astype(np.float32)  # small ints: many ties
    table = np.asarray(jax.jit(sparse_table, static_argnums=(1, 2))(fmap, ky, kx))
    assert table.shape == (ky + 1, kx + 1, 9, 17, 2)
    for i in range(ky + 1):
        for j in range(kx + 1):
            for y in range(9 - 2 ** i + 1):
                for x in range(17 - 2 ** j + 1):
                    want = fmap[y:y + 2 ** i, x:x + 2 ** j].max(axis=(0, 1))
                    np.testing.assert_array_equal(table[i, j, y, x], want)


def test_roi_pool_image_windows_match_reference_and_whole_map_pool():
    rng = np.random.default_rng(2)
    h, w, c = 9, 13, 4
    fmap = rng.standard_normal((h, w, c)).astype(np.float32)
    boxes = _boxes(rng, 64, w * 16, h * 16)
    cells = np.array([project_ref(b, 16, 20, 1.5, h, w) for b in boxes])
    got = np.asarray(spp_jax.roi_pool(fmap, boxes, geometry=ZF))
    np.testing.assert_array_equal(got, roi_pool_ref(fmap, cells, (6, 3, 2, 1)))
    # A window holding every cell centre (a 224 image for a 13x13 ZF-5 map: centres 20..212)
    # pools exactly like spp_jax.pool on the whole map.
    whole = np.asarray(spp_jax.roi_pool(fmap, [[0, 0, 20 + 16 * (w - 1), 20 + 16 * (h - 1)]], geometry=ZF))
    np.testing.assert_array_equal(whole[0], np.asarray(spp_jax.pool(fmap[None]))[0])


def test_roi_pool_jit_dynamic_boxes_compile_once():
    rng = np.random.default_rng(3)
    fmap = jnp.asarray(rng.standard_normal((8, 10, 2)), jnp.float32)
    traces = []

    @jax.jit
    def f(m, b):
        traces.append(1)
        return spp_jax.roi_pool(m, b, (2, 1), geometry=ZF)

    for seed in range(3):
        boxes = _boxes(np.random.default_rng(seed), 16, 160, 128).astype(np.float32)
        cells = np.array([project_ref(b, 16, 20, 1.5, 8, 10) for b in boxes])
        np.testing.assert_array_equal(f(fmap, boxes), roi_pool_ref(np.asarray(fmap), cells, (2, 1)))
    assert len(traces) == 1


def test_roi_pool_gradient():
    rng = np.random.default_rng(4)
    fmap = jnp.asarray(rng.permutation(6 * 7 * 2).reshape(6, 7, 2) / 7.0, jnp.float32)  # no ties
    boxes = jnp.asarray([[0, 0, 111, 95], [30, 20, 80, 60], [50, 50, 52, 52]], jnp.float32)
    check_grads(lambda m: spp_jax.roi_pool(m, boxes, (3, 2, 1), geometry=ZF), (fmap,), order=1,
                modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)
    # one bin, one window: gradient one-hot at the arg-max cell inside the window's cells
    g = np.asarray(jax.grad(lambda m: spp_jax.roi_pool(m, boxes[1:2], (1,), geometry=ZF)[0, 0])(fmap))
    x0, y0, x1, y1 = project_ref(np.asarray(boxes[1]), 16, 20, 1.5, 6, 7)
    win = np.asarray(fmap)[y0:y1 + 1, x0:x1 + 1, 0]
    yy, xx = np.unravel_index(win.argmax(), win.shape)
    want = np.zeros((6, 7, 2), np.float32)
    want[y0 + yy, x0 + xx, 0] = 1
    np.testing.assert_array_equal(g, want)


def test_roi_pool_memory_2000_windows_on_1200px_map():
    # Peak temporary memory of the compiled program (XLA's own accounting), not a timing.
    fmap = jax.ShapeDtypeStruct((74, 100, 256), jnp.float32)
    boxes = jax.ShapeDtypeStruct((2000, 4), jnp.float32)
    compiled = jax.jit(lambda m, b: spp_jax.roi_pool(m, b, geometry=ZF)).lower(fmap, boxes).compile()
    mem = compiled.memory_analysis()
    total = mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes
    assert total < 1 * 2**30, f"{total / 2**20:.0f} MiB"
    # a per-window mask over the map would need R*H*W*C*4 bytes (15 GB)
    assert total < 2000 * 74 * 100 * 256 * 4 / 20


@pytest.mark.parametrize("boxes, exc, msg", [
    (np.zeros((3, 5), np.float32), ValueError, r"\(R, 4\)"),
    (np.zeros((0, 4), np.float32), ValueError, "empty"),
    (np.array([[0, 0, np.nan, 5]], np.float32), ValueError, "NaN"),
])
def test_roi_pool_bad_boxes(boxes, exc, msg):
    with pytest.raises(exc, match=msg):
        spp_jax.roi_pool(np.zeros((4, 4, 2), np.float32), boxes, geometry=ZF)


def test_roi_pool_bad_map_and_geometry():
    with pytest.raises(ValueError, match="rank 3"):
        spp_jax.roi_pool(np.zeros((1, 4, 4, 2), np.float32), np.zeros((1, 4)), geometry=ZF)
    with pytest.raises(TypeError, match="Geometry"):
        spp_jax.roi_pool(np.zeros((4, 4, 2), np.float32), np.zeros((1, 4)), geometry=(16, 20))
    with pytest.raises(ValueError, match="stride"):
        spp_jax.Geometry(0, 1)
    with pytest.raises(ValueError, match=r"\(R, 4\)"):
        spp_jax.project_boxes(np.zeros((2, 3)), ZF, (4, 4))


def test_whole_map_pool_agrees_with_pool_ref_under_roi_path_for_small_maps():
    # Maps smaller than the finest level (cells repeat) through the window path.
    rng = np.random.default_rng(5)
    for h, w in [(1, 1), (2, 5), (5, 3)]:
        fmap = rng.standard_normal((h, w, 2)).astype(np.float32)
        cells = np.array([[0, 0, w - 1, h - 1]], np.int32)
        np.testing.assert_array_equal(roi_pool_cells(fmap, cells), pool_ref(fmap[None], (6, 3, 2, 1)))
