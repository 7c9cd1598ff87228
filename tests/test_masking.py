"""Exact padding: padded batches with valid_hw give the unpadded network's maps, pools and windows."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax.models import MODEL_NAMES, SPPNet, get_model, map_size, random_variables
from spp_jax.models import masking as M
from spp_jax.roi import roi_pool_cells
from reference import roi_pool_ref

RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def _net(arch):
    # Small random biases: a bias is what fills the padded region past the first layer.
    m = get_model(arch, width=0.0625, fc_dim=8, num_classes=3, init_scheme="he")
    return m, random_variables(m, seed=1, bias_std=0.1)


@functools.lru_cache(maxsize=None)
def _jitted(arch):
    m, _ = _net(arch)
    return jax.jit(lambda v, x, hw: m.apply(v, x, valid_hw=hw, features=True))


def _features(arch, x, valid_hw=None):
    return _jitted(arch)(_net(arch)[1], x, valid_hw)


def _case(arch, seed):
    """Two random images (sides 64..400) in one bucket up to 2x larger than the larger."""
    rng = np.random.default_rng(seed)
    hw = rng.integers(64, 401, (2, 2))
    bucket = [int(rng.integers(hw[:, k].max(), 2 * hw[:, k].max() + 1)) for k in (0, 1)]
    imgs = [rng.normal(0, 60, (h, w, 3)).astype(np.float32) for h, w in hw]
    # Garbage (not zeros) in the padding: the model must not depend on what the padding holds.
    batch = rng.normal(0, 60, (2, *bucket, 3)).astype(np.float32)
    for b, im in zip(batch, imgs):
        b[:im.shape[0], :im.shape[1]] = im
    return imgs, batch, hw


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * float(np.abs(want).max()))


@pytest.mark.parametrize("arch", MODEL_NAMES)
def test_padded_maps_pools_and_windows_equal_unpadded(arch):
    m, _ = _net(arch)
    imgs, batch, hw = _case(arch, seed=MODEL_NAMES.index(arch))
    out = _features(arch, jnp.asarray(batch), jnp.asarray(hw, jnp.int32))
    map_hw = np.asarray(out["map_hw"])
    assert map_hw.tolist() == [[map_size(arch, h), map_size(arch, w)] for h, w in hw]
    rng = np.random.default_rng(10 + MODEL_NAMES.index(arch))
    for i, im in enumerate(imgs):
        ref = _features(arch, jnp.asarray(im[None]))
        mh, mw = map_hw[i]
        want = np.asarray(ref["conv"][0])
        assert want.shape[:2] == (mh, mw)
        fmap = np.asarray(out["conv"][i])
        _close(fmap[:mh, :mw], want)                        # every valid cell
        assert not fmap[mh:].any() and not fmap[:, mw:].any()  # the rest is zero
        _close(np.asarray(out["pooled"][i]), np.asarray(ref["pooled"][0]))  # whole-map pyramid
        _close(np.asarray(out["fc7"][i]), np.asarray(ref["fc7"][0]))
        # Windows, half of them touching the image's right and/or bottom edge.
        h, w = im.shape[:2]
        x1, y1 = rng.integers(0, w - 8, 8), rng.integers(0, h - 8, 8)
        x2 = np.where(np.arange(8) % 2 == 0, w - 1, rng.integers(x1 + 4, w))
        y2 = np.where(np.arange(8) % 4 < 2, h - 1, rng.integers(y1 + 4, h))
        boxes = np.stack([x1, y1, x2, y2], 1).astype(np.float32)
        cells = spp_jax.project_boxes(boxes, m.geometry, (mh, mw), xp=np)
        assert (cells[::2, 2] == mw - 1).any() or mw == 1  # some windows reach the last column
        got = roi_pool_cells(out["conv"][i], jnp.asarray(cells), tuple(m.levels))
        _close(np.asarray(got), roi_pool_ref(want, cells, m.levels))  # brute force on the unpadded map


def test_without_valid_hw_the_border_differs():
    # The bug the masking fixes (issue 13's figure): a 256 x 300 image zero-padded to its
    # 256 x 384 bucket, without valid_hw, is not the unpadded net near the right border.
    img = np.random.default_rng(0).normal(0, 60, (256, 300, 3)).astype(np.float32)
    padded = np.zeros((1, 256, 384, 3), np.float32)
    padded[0, :, :300] = img
    want = np.asarray(_features("zf5", jnp.asarray(img[None]))["conv"][0])
    mh, mw = want.shape[:2]
    for hw, far in ((None, True), (np.array([[256, 300]], np.int32), False)):
        got = np.asarray(_features("zf5", jnp.asarray(padded), hw)["conv"][0, :mh, :mw])
        err = np.abs(got - want).max(axis=(0, 2)) / np.abs(want).max()  # per column
        assert (err[-1] > 0.05) == far  # the last column: far off unmasked, exact masked
        assert err[: mw - 6].max() < RTOL  # columns away from the border agree either way


def test_valid_extents_follow_layer_arithmetic():
    # ZF-5 (released): 224 -> conv1 110 -> pool1 55 (ceil) -> conv2 26 -> pool2 13 (ceil) -> 13.
    specs = spp_jax.models.scaled_specs("zf5")
    ext = M.valid_extents(specs, [[224, 180]])
    assert [e[0].tolist() for e in ext] == [[110, 88], [110, 88], [55, 44], [26, 20], [26, 20], [13, 10],
                                           [13, 10], [13, 10], [13, 10]]
    with pytest.raises(ValueError, match="too small"):
        M.valid_extents(specs, [[224, 20]])
    m, v = _net("zf5")
    x = jnp.zeros((2, 96, 96, 3))
    with pytest.raises(ValueError, match=r"valid_hw must be \(B, 2\)"):
        m.apply(v, x, valid_hw=np.array([[64, 64]]))
    with pytest.raises(ValueError, match="integer sizes"):
        m.apply(v, x, valid_hw=np.array([[64, 64], [97, 64]]))
    with pytest.raises(ValueError, match="too small"):
        m.apply(v, x, valid_hw=np.array([[64, 64], [20, 64]]))
    nospp = get_model("zf5", spp=False, width=0.0625, fc_dim=8, num_classes=3)
    with pytest.raises(ValueError, match="needs an SPP net"):
        jax.eval_shape(lambda v: nospp.apply(v, jnp.zeros((1, 224, 224, 3)), valid_hw=np.array([[224, 224]])),
                       random_variables(nospp))
    assert SPPNet.conv_map  # the method the serving layer calls
