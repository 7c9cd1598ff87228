"""Transfer features: shapes per layer, bucketed full images, the on-disk cache."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax import models
from spp_jax.roi import roi_pool_cells
from spp_jax.serve import Server
from spp_jax.transfer.features import FeatureExtractor, Setting

KW = dict(num_classes=5, width=0.05, fc_dim=8, init_scheme="he", input_scale=1 / 58)
MEAN = np.full(3, 120.0, np.float32)


def random_variables(model, seed):
    return models.random_variables(model, seed, bias_std=0.1)  # small random biases


@pytest.fixture(scope="module")
def spp_net():
    m = spp_jax.get_model("zf5", **KW)
    return m, random_variables(m, 0)


@pytest.fixture(scope="module")
def nospp_net():
    m = spp_jax.get_model("zf5", spp=False, **KW)
    return m, random_variables(m, 1)


def _reference(model, variables, img):
    """The model's own forward pass (features=True) on one unpadded image, jitted."""
    return jax.jit(lambda v, x: model.apply(v, x, features=True))(variables, jnp.asarray(img[None] - MEAN))


def _images(n, seed=0, hw=((230, 300), (260, 240), (224, 224), (300, 500))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, hw[i % len(hw)] + (3,), dtype=np.uint8) for i in range(n)]


def test_setting_names():
    assert Setting.parse("spp_full392") == Setting(True, "full", 392)
    assert Setting.parse("nospp_crop224").title == "no SPP crop 224"
    assert Setting(True, "crop", 224, resize=256).key == "spp_crop224r256"
    assert Setting.parse("spp_crop224r256") == Setting(True, "crop", 224, resize=256)
    with pytest.raises(ValueError):
        Setting.parse("spp_warp224")
    with pytest.raises(ValueError, match="no-SPP"):
        Setting(False, "full", 224)


def test_feature_shapes_per_layer(spp_net, nospp_net):
    m, v = spp_net
    fx = FeatureExtractor(Server(m, v, MEAN), batch_size=4)
    c5 = m.channels
    c4 = [s for s in spp_jax.models.scaled_specs("zf5", 0.05) if getattr(s, "name", "") == "conv4"][0].features
    f = fx.features(_images(5), Setting.parse("spp_crop224"))
    assert {k: a.shape for k, a in f.items()} == {
        "conv4": (5, 13 * 13 * c4), "conv5": (5, 13 * 13 * c5), "pool5": (5, 36 * c5),
        "spp_pool5": (5, 50 * c5), "fc6": (5, 8), "fc7": (5, 8)}
    # The crop path through the whole net gives the model's own fc7 / pyramid (224 crops, no padding).
    img = _images(1, seed=5, hw=((224, 224),))[0]
    ref = _reference(m, v, img)
    got = fx.features([img], Setting.parse("spp_crop224"))
    np.testing.assert_allclose(got["fc7"], ref["fc7"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["spp_pool5"], ref["pooled"], rtol=1e-4, atol=1e-5)
    # conv5 of a 224 crop is the flattened 13x13 map (the server compiles with
    # spp_jax.xla_options, another CPU convolution than the reference: float rounding only).
    np.testing.assert_allclose(got["conv5"][0], np.asarray(ref["conv"][0]).reshape(-1), rtol=1e-5, atol=1e-5)

    mn, vn = nospp_net
    fn = FeatureExtractor(Server(mn, vn, MEAN), batch_size=4)
    assert "spp_pool5" not in fn.layers
    g = fn.features([img], Setting.parse("nospp_crop224"), layers=("pool5", "fc6", "fc7"))
    refn = _reference(mn, vn, img)
    # float32 convs of one image in two programs: XLA may pick other kernels (seen on an
    # AVX2-only CPU: 1.5e-6 apart on a value of 0.023), so the fc tolerance, not bit-equality.
    np.testing.assert_allclose(g["pool5"], refn["pooled"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["fc7"], refn["fc7"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no-SPP"):
        fn.features([img], Setting.parse("spp_crop224"))
    with pytest.raises(ValueError, match="not available"):
        fn.features([img], Setting.parse("nospp_crop224"), layers=("spp_pool5",))


def test_full_image_buckets_match_unpadded(spp_net):
    m, v = spp_net
    fx = FeatureExtractor(Server(m, v, MEAN), full_batch_size=4)
    s = Setting.parse("spp_full224")
    # 224 x 336 is its own bucket; 224 x 300 is padded into the same 224 x 336 bucket.
    exact, padded = _images(2, seed=2, hw=((224, 336), (224, 300)))
    f = fx.features([padded, exact, exact], s)
    assert fx.programs["spp_full224"] == {((4, 224, 336, 3), tuple(fx.layers))}  # one program
    ref = _reference(m, v, exact)
    for k in ("fc6", "fc7"):
        np.testing.assert_allclose(f[k][1], ref[k][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(f[k][1], f[k][2])
    np.testing.assert_allclose(f["spp_pool5"][1], ref["pooled"][0], rtol=1e-4, atol=1e-5)
    fmap = ref["conv"][0]
    h, w = fmap.shape[:2]
    grid = roi_pool_cells(fmap, jnp.array([[0, 0, w - 1, h - 1]]), levels=(13,))[0]
    # Float rounding differs between a batch of 4 and the one-image reference (conv1 runs on
    # space-to-depth blocks, whose summation order depends on the batch): up to 1.7e-6 on
    # values near 0.005 (2026-12-06), so the absolute tolerance is 1e-5, the relative one kept.
    np.testing.assert_allclose(f["conv5"][1], grid, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f["pool5"][1], ref["pooled"][0][:36 * m.channels], rtol=1e-5, atol=1e-5)
    # The padded image gives exactly what the unpadded network gives for it (masked maps).
    ref_p = _reference(m, v, padded)
    np.testing.assert_allclose(f["spp_pool5"][0], ref_p["pooled"][0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f["fc7"][0], ref_p["fc7"][0], rtol=1e-4, atol=1e-5)


def test_feature_cache_round_trip_and_resume(tmp_path, spp_net):
    m, v = spp_net
    fx = FeatureExtractor(Server(m, v, MEAN), batch_size=4)
    s = Setting.parse("spp_crop224")
    imgs = _images(7, seed=3)
    layers = ("pool5", "fc7")
    want = fx.features(imgs, s, layers=layers)

    class Stop(Exception):
        pass

    def stop_after_1(i):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        fx.extract(imgs, s, layers=layers, cache_dir=str(tmp_path), data_id="rand7", chunk_size=2,
                   progress=False, on_chunk=stop_after_1)
    (d,) = os.listdir(tmp_path)
    assert sorted(f for f in os.listdir(tmp_path / d) if f.endswith(".npz")) == [
        "chunk_0000000_0000002.npz", "chunk_0000002_0000004.npz"]
    assert not [f for f in os.listdir(tmp_path / d) if f.endswith(".tmp")]
    done = []
    got = fx.extract(imgs, s, layers=layers, cache_dir=str(tmp_path), data_id="rand7", chunk_size=2,
                     progress=False, on_chunk=done.append)
    assert done == [2, 3]  # resumed: only the missing chunks were computed
    for k in layers:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    done.clear()
    again = fx.extract(imgs, s, layers=layers, cache_dir=str(tmp_path), data_id="rand7", chunk_size=2,
                       progress=False, on_chunk=done.append)
    assert done == [] and all(np.array_equal(again[k], got[k]) for k in layers)
    # Another collection (or other layers / setting / parameters) gets its own cache entry.
    fx.extract(imgs[:3], s, layers=layers, cache_dir=str(tmp_path), data_id="rand3", chunk_size=2,
               progress=False)
    assert len(os.listdir(tmp_path)) == 2
