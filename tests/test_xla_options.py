"""spp_jax.xla_options: the CPU options resolve, unknown options fall back, results match the default."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax import xla_options


@pytest.fixture
def fresh_cache():
    xla_options._resolved.cache_clear()
    yield
    xla_options._resolved.cache_clear()


def test_cpu_options_resolve(fresh_cache):
    assert jax.default_backend() == "cpu"
    assert xla_options.compiler_options() == xla_options.OPTIONS["cpu"]


def test_unknown_option_is_dropped_with_one_warning(fresh_cache, monkeypatch, caplog):
    known = dict(xla_options.OPTIONS["cpu"])
    monkeypatch.setitem(xla_options.OPTIONS, "cpu", {**known, "xla_cpu_no_such_option_for_test": "1"})
    with caplog.at_level(logging.WARNING, logger="spp_jax.xla_options"):
        assert xla_options.compiler_options() == known
        assert xla_options.compiler_options() == known  # resolved once: no second warning
        f = xla_options.jit(lambda x: x * 2)
        assert float(f(jnp.float32(3))) == 6.0
    warned = [r for r in caplog.records if "xla_cpu_no_such_option_for_test" in r.getMessage()]
    assert len(warned) == 1


def test_other_backends_get_no_options(fresh_cache):
    assert xla_options._resolved("tpu") == ()


def test_conv_net_gradient_equals_default_compile():
    # A small conv + pool net's gradient with the options equals the default compile's.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 21, 21, 3)).astype(np.float32))
    w1 = jnp.asarray(rng.standard_normal((7, 7, 3, 8)).astype(np.float32) * 0.1)
    w2 = jnp.asarray(rng.standard_normal((3, 3, 8, 4)).astype(np.float32) * 0.1)

    def loss(ws, x):
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.nn.relu(jax.lax.conv_general_dilated(x, ws[0], (2, 2), "SAME", dimension_numbers=dn))
        y = jax.lax.conv_general_dilated(y, ws[1], (1, 1), "SAME", dimension_numbers=dn)
        return jnp.sum(y ** 2)

    g = jax.grad(loss)
    want = jax.jit(g)((w1, w2), x)
    got = xla_options.jit(g)((w1, w2), x)
    assert xla_options.jit(g).lower((w1, w2), x).compile() is not None
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


def _ynn_fused(f, *args, options=None) -> bool:
    return "__ynn_fusion" in jax.jit(f, compiler_options=options).lower(*args).compile().as_text()


def test_cpu_options_keep_ynn_dots_and_reductions(fresh_cache):
    # The options drop YNN's convolutions only: dots and reductions still compile to YNN
    # fusions (with the option emptied, as before 2026-12-06, they do not).
    opts = xla_options.compiler_options()
    a, b = jnp.zeros((64, 128)), jnp.zeros((128, 256))
    x = jnp.zeros((2, 16, 16, 8))
    assert _ynn_fused(lambda p, q: p @ q, a, b, options=opts)
    assert _ynn_fused(lambda v: v.max((1, 2)), x, options=opts)
    empty = {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert not _ynn_fused(lambda p, q: p @ q, a, b, options=empty)
    assert not _ynn_fused(lambda v: v.max((1, 2)), x, options=empty)


def test_dense_and_pool_gradient_equals_default_compile():
    # conv -> SPP -> dense: the options' YNN dots and reductions give the default's gradient.
    import spp_jax
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 13, 11, 3)).astype(np.float32))
    w1 = jnp.asarray(rng.standard_normal((3, 3, 3, 16)).astype(np.float32) * 0.3)
    w2 = jnp.asarray(rng.standard_normal((16 * 50, 10)).astype(np.float32) * 0.05)

    def loss(ws, x):
        y = jax.lax.conv_general_dilated(x, ws[0], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(spp_jax.pool(jax.nn.relu(y)) @ ws[1]))

    g = jax.grad(loss)
    want = jax.jit(g)((w1, w2), x)
    got = xla_options.jit(g)((w1, w2), x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
