"""The serving layer: exact padded features (vs the unpadded net and the old padded path), buckets,
programs, the fingerprint, means."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax.data import augment
from spp_jax.models import SPPNet, get_model, random_variables
from spp_jax.serve import Server, bucket_shape, params_fingerprint


@functools.lru_cache(maxsize=None)
def _net():
    m = get_model("zf5", width=0.05, fc_dim=16, num_classes=4, init_scheme="he")
    return m, random_variables(m, 0, bias_std=0.1)


def _unpadded(view):
    """The reference: the model on one unpadded view, with its conv4 map too."""
    m, v = _net()
    out, state = m.apply(v, jnp.asarray(view[None]), features=True, mutable=["intermediates"])
    return out, state["intermediates"]["backbone"]["conv4_out"][0][0]


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()))


def test_windows_equal_the_old_path_inside_and_the_unpadded_net_everywhere():
    m, v = _net()
    sv = Server(m, v, mean=128.0)
    img = np.random.default_rng(0).integers(0, 256, (300, 352, 3), dtype=np.uint8)
    view = sv.prepare(img, 256)  # 256 x 300, in the 256 x 384 bucket
    assert view.shape[:2] == (256, 300) and sv.bucket(256, 300, 256) == (256, 384)
    maps = sv.conv(sv.batch([view], (256, 384)))
    (mh, mw), = maps.hw
    ref, _ = _unpadded(view)
    assert ref["conv"].shape[1:3] == (mh, mw)
    inner = np.array([[0, 0, 150, 200], [40, 30, 170, 120]], np.float32)  # far from the right edge
    edge = np.array([[200, 0, 299, 255], [0, 100, 299, 255]], np.float32)  # touching it
    boxes = np.concatenate([inner, edge])
    got = sv.pool_windows(maps, [sv.cells(boxes, (mh, mw))])[0]
    want = spp_jax.roi_pool(ref["conv"][0], boxes, geometry=m.geometry)
    _close(got, want)  # every window, exact
    # The old path (zero padding, no masking, windows on the valid cells) was right inside only.
    padded = np.zeros((1, 256, 384, 3), np.float32)
    padded[0, :, :300] = view
    old_map = m.apply(v, jnp.asarray(padded), method=SPPNet.conv_map)[0]
    old = spp_jax.roi_pool_cells(old_map, jnp.asarray(sv.cells(boxes, (mh, mw))))
    _close(old[:2], want[:2])
    assert np.abs(np.asarray(old[2:]) - np.asarray(want[2:])).max() > 0.01 * np.abs(want).max()


def test_a_tall_bucket_shares_its_transposes_window_program_and_pools_exactly():
    """Windows on the conv map of a tall image (bucket 384 x 256) and of a wide one (256 x 384):
    one window program (the wide shape), and each equal to roi_pool on its own unpadded map."""
    m, v = _net()
    sv = Server(m, v, mean=128.0)
    rng = np.random.default_rng(3)
    boxes = np.array([[0, 0, 150, 200], [40, 30, 170, 120], [10, 5, 255, 290]], np.float32)
    for hw in ((300, 256), (256, 300)):  # tall first: its program is the one reused
        view = sv.prepare(rng.integers(0, 256, hw + (3,), dtype=np.uint8), 256)
        maps = sv.conv(sv.batch([view], sv.bucket(*view.shape[:2], 256)))
        (mh, mw), = maps.hw
        ref, _ = _unpadded(view)
        b = np.minimum(boxes, [view.shape[1] - 1, view.shape[0] - 1] * 2)
        got = sv.pool_windows(maps, [sv.cells(b, (mh, mw))])[0]
        _close(got, spp_jax.roi_pool(ref["conv"][0], b, geometry=m.geometry))
        _close(sv.pooled(maps)[0], ref["pooled"][0])  # the whole valid map, also via the transpose
    windows = [p for p in sv.programs if p[0] == "windows"]
    assert len(windows) == 1 and windows[0][1][1] < windows[0][1][2], sv.programs  # one, wide


def test_batches_of_mixed_sizes_give_each_image_its_own_features():
    m, v = _net()
    sv = Server(m, v, mean=np.array([120.0, 110.0, 100.0]))
    rng = np.random.default_rng(1)
    views = [sv.prepare(rng.integers(0, 256, hw + (3,), dtype=np.uint8), 96) for hw in ((96, 150), (130, 96))]
    batch = sv.batch(views, (144, 192), size=3)  # the third slot repeats the second view
    assert batch.count == 2 and batch.hw.tolist() == [[96, 150], [130, 96], [130, 96]]
    maps = sv.conv_layers(batch, ("conv4", "conv5"))
    pooled = sv.pooled(maps["conv5"])
    head = sv.head(pooled)
    for i, view in enumerate(views):
        ref, conv4 = _unpadded(view)
        h4, w4 = maps["conv4"].hw[i]
        _close(maps["conv4"].fmap[i, :h4, :w4], conv4)
        _close(pooled[i], ref["pooled"][0])
        for k in ("fc6", "fc7", "logits"):
            _close(head[k][i], ref[k][0])
        grid = sv.pool_whole(maps["conv5"], (13,))[i]  # another pyramid of the same valid map
        _close(grid, spp_jax.pool(ref["conv"], (13,))[0])
    np.testing.assert_array_equal(np.asarray(pooled[1]), np.asarray(pooled[2]))
    assert sorted(p[0] for p in sv.programs) == ["conv", "pool", "pool"]  # one conv program, 2 pyramids


def test_preparation_means_buckets_and_errors():
    m, v = _net()
    img = np.random.default_rng(2).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    mean_img = np.random.default_rng(3).uniform(90, 140, (64, 80, 3)).astype(np.float32)
    view = augment.resize_shorter(img, 96)
    for mean, want in ((None, view), (128.0, view - 128.0), (np.array([1.0, 2.0, 3.0]), view - [1, 2, 3]),
                       (mean_img, view - augment.resize_to(mean_img, view.shape[:2]))):
        np.testing.assert_allclose(Server(m, v, mean).prepare(img, 96), np.asarray(want, np.float32), atol=1e-4)
    np.testing.assert_allclose(Server(m, v, mean_img).mean_colour, mean_img.reshape(-1, 3).mean(0), rtol=1e-6)
    assert Server(m, v, 128.0).mean_colour.tolist() == [128.0] * 3
    crop = Server(m, v).prepare(img, 96, crop=64)
    np.testing.assert_array_equal(crop, view[16:80, 48:112])  # the centre 64 x 64 of 96 x 160
    assert bucket_shape(256, 300, 256) == (256, 384) and bucket_shape(400, 256, 256) == (512, 256)
    sv = Server(m, v)
    with pytest.raises(ValueError, match="does not fit"):
        sv.batch([view], (96, 128))
    with pytest.raises(ValueError, match="too small"):
        sv.conv(sv.batch([np.zeros((96, 20, 3), np.float32)], (96, 96)))
    with pytest.raises(ValueError, match="not conv layers"):
        sv.conv_layers(sv.batch([view]), ("pool2",))
    with pytest.raises(ValueError, match="mean must be"):
        Server(m, v, np.zeros((2, 2)))


def test_one_fingerprint_for_network_parameters_and_mean():
    m, v = _net()
    base = Server(m, v, 128.0).fingerprint
    assert Server(m, jax.tree.map(np.array, v), 128.0).fingerprint == base  # values, not identity
    moved = jax.tree.map(lambda a: a, v)
    moved["params"]["classifier"]["fc7"]["bias"] = v["params"]["classifier"]["fc7"]["bias"] + 1e-3
    assert Server(m, moved, 128.0).fingerprint != base
    assert Server(m, v, 127.0).fingerprint != base
    assert Server(m.clone(pool_mode="released"), v, 128.0).fingerprint != base
    assert Server(m.clone(input_norm="gray_std"), v, 128.0).fingerprint != base
    # A net without input_norm keeps the key it had before the option (old caches stay valid).
    assert "input_norm" not in Server(m, v, 128.0).key()
    assert params_fingerprint(v) != params_fingerprint(moved)
