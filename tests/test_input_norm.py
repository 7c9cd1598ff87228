"""input_norm="gray_std": per-image gray standardisation ahead of conv1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.models import get_model, random_variables
from spp_jax.models import layers as L
from spp_jax.models.input_norm import gray_standardise
from spp_jax.train.config import ConfigError, build_model, get_config


def _ref(img):
    """Brute force on one (H, W, 3) image: gray = channel mean, then z-score over pixels."""
    g = img.astype(np.float64).mean(-1)
    z = (g - g.mean()) / np.sqrt(g.var() + 1e-6)
    return np.repeat(z[..., None], 3, -1)


def test_matches_brute_force_and_handles_a_flat_image():
    rng = np.random.default_rng(0)
    x = rng.normal(10, 50, (3, 17, 23, 3)).astype(np.float32)
    x[2] = 7.0  # one colour: zeros, not NaN
    got = np.asarray(gray_standardise(jnp.asarray(x)))
    for b in range(3):
        np.testing.assert_allclose(got[b], _ref(x[b]), rtol=1e-4, atol=1e-4)
    assert not got[2].any()


def test_valid_hw_uses_each_images_own_pixels():
    rng = np.random.default_rng(1)
    hw = np.array([[9, 14], [20, 5]])
    x = rng.normal(0, 60, (2, 20, 14, 3)).astype(np.float32)  # garbage beyond each image
    got = np.asarray(gray_standardise(jnp.asarray(x), jnp.asarray(hw, jnp.int32)))
    for b, (h, w) in enumerate(hw):
        np.testing.assert_allclose(got[b, :h, :w], _ref(x[b, :h, :w]), rtol=1e-4, atol=1e-4)


def test_network_is_blind_to_colour_brightness_and_contrast_and_exact_when_padded():
    m = get_model("overfeat7", width=0.0625, fc_dim=8, num_classes=3, init_scheme="he",
                  input_norm="gray_std")
    v = random_variables(m, seed=2, bias_std=0.1)
    f = jax.jit(lambda x, hw=None: m.apply(v, x, valid_hw=hw, features=True))
    rng = np.random.default_rng(3)
    img = rng.normal(0, 60, (1, 150, 170, 1)).astype(np.float32)
    colour = np.array([1.0, -0.5, 2.0], np.float32)  # a gray image tinted: same channel mean
    base = f(jnp.asarray(np.repeat(img, 3, -1)))["fc7"]
    tinted = f(jnp.asarray(img * 2.5 + 40 + (colour - colour.mean()) * 30))["fc7"]
    np.testing.assert_allclose(tinted, base, rtol=1e-4, atol=1e-5)
    # Padded with garbage to a bigger bucket: the image's features as if alone.
    batch = rng.normal(0, 60, (1, 190, 230, 3)).astype(np.float32)
    batch[0, :150, :170] = np.repeat(img[0], 3, -1)
    padded = f(jnp.asarray(batch), jnp.asarray([[150, 170]], jnp.int32))["fc7"]
    np.testing.assert_allclose(padded, base, rtol=1e-4, atol=1e-5)
    # Without the option the same tint changes the features (the test can fail).
    m0 = get_model("overfeat7", width=0.0625, fc_dim=8, num_classes=3, init_scheme="he")
    f0 = jax.jit(lambda x: m0.apply(v, x, features=True)["fc7"])
    assert not np.allclose(f0(jnp.asarray(img * 2.5 + 40 + (colour - colour.mean()) * 30)),
                           f0(jnp.asarray(np.repeat(img, 3, -1))), rtol=1e-2)


def test_config_key_reaches_the_model_and_bad_names_are_refused():
    # The embedded preset feeds gray_std (README, plateau); the paper's preset and an
    # override both reach the model.
    assert build_model(get_config("embedded", ["model=zf5"]), 10).input_norm == "gray_std"
    assert build_model(get_config("embedded", ["input_norm=none", "model=zf5"]), 10).input_norm == "none"
    assert build_model(get_config("imagenet"), 10).input_norm == "none"
    with pytest.raises(ConfigError, match="input_norm"):
        get_config("embedded", ["input_norm=grey"])
    with pytest.raises(ValueError, match="input_norm"):
        get_model("zf5", input_norm="grey").init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def test_results_recorded_before_the_key_existed_still_count_as_this_config():
    # Every committed run (results/claims, plateau-dropout0, ...) was recorded before
    # input_norm existed: such a record means input_norm=none, not "another config".
    import json
    from spp_jax.config_grammar import config_dict
    from spp_jax.train.grid import same_results_config
    cfg = get_config("embedded", ["model=zf5", "input_norm=none"])
    old = json.loads(json.dumps(config_dict(cfg)))
    del old["input_norm"]
    assert same_results_config(old, cfg)
    assert not same_results_config(old, get_config("embedded", ["model=zf5", "input_norm=gray_std"]))
    assert not same_results_config(old, get_config("embedded", ["model=zf5"]))  # today's preset
    assert not same_results_config({**old, "dropout": 0.3}, cfg)


@pytest.mark.parametrize("features", [40, 5])
def test_input_conv_is_nn_conv_on_three_channels(features):
    # conv1's module has nn.Conv's parameters (same names, shapes, initial values from the
    # same key) and, on a 3-channel input, nn.Conv's output: exactly where it is XLA's strided
    # convolution (3 x 40 channels, above layers.BLOCK_CONV_MAX_UNITS), to float rounding
    # where it runs on space-to-depth blocks (3 x 5).
    from flax import linen as nn
    from spp_jax.models.sppnet import InputConv
    ours = InputConv(features, 7, 2, 1, kernel_init=nn.initializers.normal(0.3),
                     bias_init=nn.initializers.normal(0.3))
    ref = nn.Conv(features, (7, 7), (2, 2), padding=((1, 1), (1, 1)),
                  kernel_init=nn.initializers.normal(0.3), bias_init=nn.initializers.normal(0.3))
    x = jnp.asarray(np.random.default_rng(4).normal(0, 1, (2, 23, 19, 3)).astype(np.float32))
    p_ours, p_ref = ours.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(p_ours["params"][k], p_ref["params"][k])
    got, want = np.asarray(ours.apply(p_ours, x)), np.asarray(ref.apply(p_ref, x))
    if 3 * features > L.BLOCK_CONV_MAX_UNITS:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not np.array_equal(got, want)  # the blocks did run (another summation order)
    with pytest.raises(ValueError, match="conv1 takes 3 channels"):
        ours.apply(p_ours, x[..., :2])


def test_folded_conv1_equals_three_equal_channels_with_the_same_gradients():
    # A gray (B, H, W, 1) input is convolved with the kernel summed over its 3 input
    # channels: the same outputs and parameter gradients as the 3 equal channels it stands
    # for (the unfolded conv is the reference; only float rounding differs).
    from spp_jax.models.sppnet import InputConv
    conv = InputConv(6, 7, 2, 1)
    rng = np.random.default_rng(5)
    gray = jnp.asarray(rng.normal(0, 1, (2, 30, 26, 1)).astype(np.float32))
    three = jnp.broadcast_to(gray, (2, 30, 26, 3))
    params = conv.init(jax.random.key(0), three)
    g = jnp.asarray(rng.normal(0, 1, conv.apply(params, three).shape).astype(np.float32))
    out = {}
    for name, x in (("gray", gray), ("three", three)):
        y, vjp = jax.vjp(lambda p: conv.apply(p, x), params)
        out[name] = (y, vjp(g)[0]["params"])
    np.testing.assert_allclose(out["gray"][0], out["three"][0], rtol=1e-5, atol=1e-5)
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(out["gray"][1][k], out["three"][1][k], rtol=1e-4, atol=1e-4)
    assert out["gray"][1]["kernel"].shape == (7, 7, 3, 6)


def test_gray_model_folds_conv1_and_equals_the_unfolded_network(monkeypatch):
    # The model with gray_std (conv1 folded) against the same weights fed the 3-channel
    # standardised image without the option (conv1 unfolded), also with a padded batch. XLA's
    # convolutions, so the jaxpr shows each one's input channels (the native kernels:
    # test_native_conv.py).
    monkeypatch.setenv("SPP_JAX_NATIVE", "0")
    kw = dict(width=0.0625, fc_dim=8, num_classes=3, init_scheme="he")
    m = get_model("overfeat7", input_norm="gray_std", **kw)
    m3 = get_model("overfeat7", **kw)
    v = random_variables(m, seed=3, bias_std=0.1)
    assert v["params"]["backbone"]["conv1"]["kernel"].shape[2] == 3  # checkpoints unchanged
    x = np.random.default_rng(6).normal(0, 60, (2, 150, 170, 3)).astype(np.float32)
    hw = jnp.asarray([[150, 170], [131, 120]], jnp.int32)
    for valid in (None, hw):
        got = m.apply(v, jnp.asarray(x), valid_hw=valid, features=True)["fc7"]
        want = m3.apply(v, gray_standardise(jnp.asarray(x), valid), valid_hw=valid, features=True)["fc7"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # conv1 really runs on one channel (the folded kernel; in space-to-depth blocks of 2 x 4
    # cells, so 8 channels, where the unfolded conv1 has blocks of 2 x 2 cells x 3 channels),
    # the others as before.
    lhs, lhs3 = (_conv_input_channels(net, v, x) for net in (m, m3))
    assert lhs[0] == 8 and lhs3[0] == 12 and lhs[1:] == lhs3[1:] and len(lhs) == 7


def _conv_input_channels(model, variables, x) -> list[int]:
    """The input channel count of every convolution ``model`` runs on ``x``, in order."""
    jaxpr = jax.make_jaxpr(lambda a: model.apply(variables, a))(jnp.asarray(x)).jaxpr
    return [e.invars[0].aval.shape[-1] for e in _eqns(jaxpr)
            if e.primitive.name == "conv_general_dilated"]


def _eqns(jaxpr):
    """Every equation of a jaxpr, nested ones (jit, custom_vjp) included, in order."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            sub = getattr(p, "jaxpr", p)
            if hasattr(sub, "eqns"):
                yield from _eqns(sub)
