"""End-to-end detection fine-tuning (spp_jax.detection.finetune_conv) on tiny data: the loss falls,
frozen layers stay bit-identical, masked windows add exactly zero, no gradient below the chosen
layer, and the fine-tuned network gets new feature caches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.detection import finetune_conv as FC
from spp_jax.detection.cache import FeatureCache
from spp_jax.detection.features import SPPExtractor
from spp_jax.detection.finetune import sample_batch
from spp_jax.errors import ConfigError
from spp_jax.models import Head, get_model, random_variables
from spp_jax.serve import Server

K = 3  # object classes; fc8 is K + 1 wide
SIDE = 64  # every test image is 64 x 80: one bucket shape (64 x 96), one compiled step


@functools.lru_cache(maxsize=None)
def _net():
    m = get_model("zf5", width=0.05, fc_dim=16, num_classes=5, init_scheme="he", input_scale=1 / 58,
                  levels=(2, 1))  # a small pyramid: quicker to compile
    return m, random_variables(m, 0, bias_std=0.1)


@functools.lru_cache(maxsize=None)
def _data():
    """Three 64 x 80 images with one or two objects each, and jittered proposals around them."""
    rng = np.random.default_rng(0)
    records, props = [], {}
    for i in range(3):
        image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
        gt = np.array([[8, 6, 40, 50], [30, 20, 70, 60]][:1 + i % 2], np.float32)
        image[6:50, 8:40] = 200 + 20 * i  # something to learn
        records.append({"image_id": f"im{i}", "image": image, "boxes": gt,
                        "labels": np.arange(len(gt)) % K, "difficult": np.zeros(len(gt), bool)})
        jit = gt[None] + rng.normal(0, 6, (8, len(gt), 4))
        props[f"im{i}"] = np.concatenate([jit.reshape(-1, 4), [[0, 0, 79, 63], [45, 2, 78, 30]]]).astype(np.float32)
    return records, props


def _config(**kw):
    base = dict(from_layer="conv4", scales=(SIDE,), windows_per_image=16, iters=(2, 1), lrs=(1e-2, 1e-3),
                log_every=1, seed=0)
    return FC.ConvFinetuneConfig(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def _finetuned():
    m, v = _net()
    records, props = _data()
    return FC.finetune_conv(Server(m, v, 128.0), records, props, K + 1, _config())


def _batch(config, seed=0):
    m, v = _net()
    records, props = _data()
    items = FC.image_windows(records, props)
    return FC.make_batch(Server(m, v, 128.0), records, items[:2], SIDE, np.random.default_rng(seed), config)


def _loss_fn(dropout=0.0):
    m, v = _net()
    return FC.make_loss(m, Head(K + 1, 16, dropout))


def _split(from_layer):
    m, v = _net()
    trained = FC.trained_layers(Server(m, v).convs, from_layer)
    head = FC.new_head_params(v["params"]["classifier"], K + 1, 0)
    return FC.split_params(v, trained, head)


def test_default_iterations_follow_fast_rcnn_scaled_to_the_images():
    assert FC.default_conv_iters(5011) == (30_000, 10_000)
    assert FC.default_conv_iters(500, 0.5) == (1497, 499) and FC.default_conv_iters(1, 0.01) == (2, 1)


def test_sampling_without_replacement_pads_with_masked_slots():
    rng = np.random.default_rng(0)
    idx = sample_batch(rng, np.arange(3), np.arange(3, 8), 16, 0.25, replace=False)
    assert sorted(idx.tolist()) == list(range(8))  # every window once, no more
    idx = sample_batch(rng, np.arange(20), np.arange(20, 100), 16, 0.25, replace=False)
    assert len(set(idx.tolist())) == 16 and (idx < 20).sum() == 4
    wb = _batch(_config(windows_per_image=32))
    assert wb.cells.shape == (2, 32, 4) and wb.mask.shape == (2, 32)
    assert 0 < wb.mask.sum() < wb.mask.size  # the images have fewer than 32 usable windows
    assert (wb.labels[wb.mask == 0] == 0).all()
    assert wb.batch.pixels.shape == (2, 64, 96, 3) and wb.batch.hw.tolist() == [[64, 80], [64, 80]]
    again = _batch(_config(windows_per_image=32))  # the same seed, the same batch
    np.testing.assert_array_equal(again.cells, wb.cells)
    np.testing.assert_array_equal(again.batch.pixels, wb.batch.pixels)


def test_flip_mirrors_images_and_their_windows():
    plain = _batch(_config())
    flipped = 0
    for seed in range(4):
        wb = _batch(_config(flip=True), seed)
        for i in range(2):
            same = np.array_equal(wb.batch.pixels[i], plain.batch.pixels[i])
            mirror = np.array_equal(wb.batch.pixels[i, :, :80], plain.batch.pixels[i, :, 79::-1])
            assert same or mirror
            flipped += mirror
            if mirror and i == 0:  # image 0's object is on the left (x 8..40): mirrored, on the right
                assert wb.cells[i][wb.labels[i] > 0][:, 0].min() > plain.cells[i][plain.labels[i] > 0][:, 2].max() - 1
    assert 0 < flipped < 8


def test_masked_windows_add_exactly_zero_to_loss_and_gradient():
    wb = _batch(_config(windows_per_image=32))
    train, frozen = _split("conv4")
    args = FC.batch_arrays(wb)
    vg = jax.jit(jax.value_and_grad(_loss_fn(0.5), has_aux=True))
    key = jax.random.PRNGKey(1)
    (loss, (_, count)), g = vg(train, frozen, *args, key)
    assert int(count) == int(wb.mask.sum())
    # Other windows and labels in the masked slots: the same loss and gradient, bit for bit.
    cells, labels = np.array(wb.cells), np.array(wb.labels)
    off = wb.mask == 0
    cells[off] = [0, 0, 0, 0]
    labels[off] = K
    (loss2, _), g2 = vg(train, frozen, args[0], args[1], jnp.asarray(cells), jnp.asarray(labels), args[4], key)
    assert float(loss) == float(loss2)
    jax.tree.map(np.testing.assert_array_equal, g, g2)
    # Nothing unmasked: loss 0 and every gradient exactly 0.
    (loss0, _), g0 = vg(train, frozen, *args[:4], jnp.zeros_like(args[4]), key)
    assert float(loss0) == 0.0
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(g0))


def test_a_step_decreases_the_loss_on_a_fixed_batch():
    config = _config(dropout=0.0)
    wb = _batch(config)
    train, frozen = _split("conv4")
    tx, _ = FC._optimizer(config, config.iters)
    loss_fn = _loss_fn(0.0)
    step = FC.make_step(loss_fn, tx)
    args = FC.batch_arrays(wb)
    loss = jax.jit(loss_fn)
    losses = [float(loss(train, frozen, *args, None)[0])]
    opt = tx.init(train)
    for _ in range(3):
        train, opt, *_ = step(train, opt, frozen, *args, jax.random.PRNGKey(0))
        losses.append(float(loss(train, frozen, *args, None)[0]))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # every step


def _conv_ops(from_layer) -> int:
    train, frozen = _split(from_layer)
    wb = _batch(_config())
    jaxpr = jax.make_jaxpr(jax.grad(lambda t: _loss_fn()(t, frozen, *FC.batch_arrays(wb), None)[0]))(train)
    return str(jaxpr).count("conv_general_dilated")


def _compiled_conv_ops(from_layer) -> tuple[int, int]:
    """(convolutions, kernel gradients) in the compiled gradient program: XLA's convolutions
    and native forward calls, and native kernel-gradient calls (after XLA's dead-code
    elimination, which drops a native layer's unused input gradient)."""
    train, frozen = _split(from_layer)
    wb = _batch(_config())
    txt = jax.jit(jax.grad(lambda t: _loss_fn()(t, frozen, *FC.batch_arrays(wb), None)[0])).lower(
        train).compile().as_text()
    calls = lambda name: txt.count(f'custom_call_target="{name}"')  # noqa: E731
    return txt.count(" convolution(") + calls("spp_conv_forward"), calls("spp_conv_kernel_grad")


def test_no_gradient_is_computed_below_the_chosen_layer(monkeypatch):
    # ZF-5 has 5 convs. Backward from conv3: kernel gradients of conv3-5 (3) and input
    # gradients of conv4-5 (2); conv3's input gradient, and anything for conv1-2, is not computed.
    # XLA's convolutions (the jaxpr counts them); the native kernels below.
    monkeypatch.setenv("SPP_JAX_NATIVE", "0")
    assert _conv_ops("fc6") == 5
    assert _conv_ops("conv3") == 5 + 3 + 2
    assert _conv_ops("conv1") == 5 + 5 + 4


def test_no_gradient_is_computed_below_the_chosen_layer_native():
    # The same on the native kernels, counted in the compiled program: each layer's kernel
    # gradient is a native call, each input gradient a convolution (native or XLA's).
    from spp_jax import native
    if not native.available():
        pytest.skip("native kernels unavailable (no C++ compiler)")
    assert _compiled_conv_ops("fc6") == (5, 0)
    assert _compiled_conv_ops("conv3") == (5 + 2, 3)
    assert _compiled_conv_ops("conv1") == (5 + 4, 5)


def test_frozen_layers_stay_bit_identical_and_the_others_change():
    m, v = _net()
    res = _finetuned()
    assert res.trained == ("conv4", "conv5")
    bb0, bb = v["params"]["backbone"], res.variables["params"]["backbone"]
    for layer in ("conv1", "conv2", "conv3"):
        jax.tree.map(np.testing.assert_array_equal, bb[layer], bb0[layer])
    for layer in ("conv4", "conv5"):
        assert not np.array_equal(bb[layer]["kernel"], bb0[layer]["kernel"])
    head0 = v["params"]["classifier"]
    for layer in ("fc6", "fc7"):
        assert not np.array_equal(res.head[layer]["kernel"], head0[layer]["kernel"])
    assert res.head["fc8"]["kernel"].shape == (16, K + 1) and res.model.num_classes == K + 1
    assert [h["iter"] for h in res.history] == [1, 2, 3] and res.shapes == [(2, 64, 96)]
    assert res.history[-1]["lr"] == pytest.approx(1e-3)


def test_the_fine_tuned_network_gets_new_feature_caches(tmp_path):
    m, v = _net()
    res = _finetuned()
    old, new = Server(m, v, 128.0), Server(res.model, res.variables, 128.0)
    assert old.fingerprint != new.fingerprint
    keys = [SPPExtractor(s, (SIDE,)).key() for s in (old, new)]
    assert keys[0] != keys[1]
    assert FeatureCache(str(tmp_path), keys[0]).dir != FeatureCache(str(tmp_path), keys[1]).dir
    # The same network again finds the same cache.
    assert SPPExtractor(Server(res.model, res.variables, 128.0), (SIDE,)).key() == keys[1]


@pytest.mark.parametrize("kw, msg", [({"from_layer": "pool2"}, "from_layer"), ({"iters": (0, 0)}, "iters"),
                                     ({"lrs": (1e-3, 0)}, "lrs"), ({"windows_per_image": 0}, "windows")])
def test_bad_settings_fail_before_any_work(kw, msg):
    m, v = _net()
    records, props = _data()
    with pytest.raises(ConfigError, match=msg):
        FC.finetune_conv(Server(m, v), records, props, K + 1, _config(**kw))


def test_mesh_sharded_variables_compile_one_step_per_bucket_shape(caplog):
    # Variables restored from a training run carry its mesh's sharding (the new fc8 does not):
    # the step must still compile once per bucket shape, not again on the shape's second use.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    m, v = _net()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = jax.device_put(v, NamedSharding(mesh, PartitionSpec()))
    records, props = _data()
    with jax.log_compiles(), caplog.at_level("WARNING"):
        res = FC.finetune_conv(Server(m, sharded, 128.0), records, props, K + 1, _config(iters=(3, 0)))
    compiles = [r for r in caplog.records if "Compiling" in r.getMessage() and "jit(step)" in r.getMessage()]
    assert res.shapes == [(2, 64, 96)] and len(compiles) == 1
