"""input_norm="gray_std": per-image gray standardisation ahead of conv1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.models import get_model, random_variables
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
