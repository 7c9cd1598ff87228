"""Winograd F(2x2, 3x3) convolutions (spp_jax.native.winograd): values and gradients against
brute force in float64, the dispatch that routes wide 3x3 layers to it, and a backbone's
gradient against XLA's path."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import conv_grads_ref, conv_ref
from spp_jax import native
from spp_jax.models import convolution
from spp_jax.native import winograd

HAS_COMPILER = shutil.which(os.environ.get("CXX") or "c++") is not None


@pytest.fixture(autouse=True)
def _built():
    if not HAS_COMPILER or not native.cpu_supported():
        pytest.skip("no C++ compiler or no AVX-512: the library runs XLA's convolutions")
    assert native.available()


# (B, H, W, Ci, Co, padding): even and odd outputs (a last tile cut to one row / column),
# asymmetric and zero padding (windows past the map on one side only), channels in whole
# 16-lane vectors, in part (3, 20, 70), and more than one 64-channel block of the input's
# adjoint (80, 136); one-cell and one-row outputs.
CASES = [
    (2, 8, 8, 16, 32, ((1, 1), (1, 1))),
    (3, 7, 9, 3, 5, ((1, 1), (1, 1))),
    (2, 6, 5, 20, 17, ((0, 2), (2, 1))),
    (1, 11, 10, 70, 33, ((2, 0), (0, 0))),
    (2, 5, 6, 80, 64, ((2, 2), (1, 2))),
    (1, 3, 3, 136, 24, ((0, 0), (0, 0))),
    (1, 4, 3, 16, 16, ((2, 2), (0, 0))),
]


def _operands(case, seed=0):
    b, h, w, ci, co, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, ci)).astype(np.float32)
    kern = (rng.standard_normal((3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)
    return x, kern, pad


def _close(a, ref):
    # The transforms add up to 9 terms (and halve the kernel's): a few float32 ulps of the
    # scale, as the direct kernels' reordered sums.
    np.testing.assert_allclose(np.asarray(a), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _vjp(pad):
    return jax.jit(lambda a, w, g: jax.vjp(lambda a, w: winograd.conv(a, w, pad), a, w)[1](g))


@pytest.mark.parametrize("case", CASES)
def test_winograd_values_and_gradients_equal_brute_force(case):
    x, kern, pad = _operands(case)
    y = np.asarray(jax.jit(lambda a, w: winograd.conv(a, w, pad))(x, kern))
    ref = conv_ref(x, kern, 1, pad)
    assert y.shape == ref.shape
    _close(y, ref)
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    dx, dw = _vjp(pad)(x, kern, dy)
    dx_ref, dw_ref = conv_grads_ref(x, kern, 1, pad, dy)
    _close(dx, dx_ref)
    _close(dw, dw_ref)


def test_winograd_is_deterministic_and_runs_as_ffi_calls():
    x, kern, pad = _operands((4, 9, 9, 80, 48, ((1, 1), (1, 1))))
    dy = np.random.default_rng(2).standard_normal((4, 9, 9, 48)).astype(np.float32)
    f = _vjp(pad)
    first, again = f(x, kern, dy), f(x, kern, dy)
    for a, b in zip(first, again):  # the input's adjoint sums overlapping windows: fixed order
        assert np.array_equal(np.asarray(a), np.asarray(b))
    txt = f.lower(x, kern, dy).compile().as_text()
    for target in ("spp_winograd_input", "spp_winograd_input_grad", "spp_winograd_output_grad"):
        assert f'custom_call_target="{target}"' in txt
    ks = np.stack([kern, -2 * kern])
    ys = jax.vmap(lambda w: winograd.conv(jnp.asarray(x), w, pad))(ks)
    for i in range(2):
        _close(ys[i], conv_ref(x, ks[i], 1, pad))


def test_winograd_refuses_what_it_does_not_compute():
    x = jnp.ones((1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"kernel \(5, 5, 4, 8\)"):
        winograd.conv(x, jnp.ones((5, 5, 4, 8)), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match=r"padding \(\(3, 3\)"):
        winograd.conv(x, jnp.ones((3, 3, 4, 8)), ((3, 3), (1, 1)))
    with pytest.raises(ValueError, match="bfloat16"):
        winograd.conv(x.astype(jnp.bfloat16), jnp.ones((3, 3, 4, 8), jnp.bfloat16), ((1, 1),) * 2)


def test_dispatch_routes_wide_3x3_layers_to_winograd():
    x = jnp.ones((1, 9, 9, 128))
    dn = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 128, 128), ("NHWC", "HWIO", "NHWC"))

    def route(rhs, strides=(1, 1), padding=((1, 1), (1, 1)), lhs=x):
        return convolution._route(lhs, rhs, strides, padding, None, None, dn, 1)
    assert route(jnp.ones((3, 3, 128, 128))) == "winograd"
    assert route(jnp.ones((3, 3, 128, 128)), padding=((0, 2), (2, 0))) == "winograd"
    assert route(jnp.ones((3, 3, 128, 128)), strides=(2, 2)) == "xla"      # stride 2
    assert route(jnp.ones((3, 3, 128, 128)), padding=((3, 3), (1, 1))) == "xla"
    assert route(jnp.ones((5, 5, 128, 128))) == "xla"                      # 5x5 (conv2)
    assert route(jnp.ones((3, 3, 128, 16))) == "native"                    # narrow: direct
    assert route(jnp.ones((3, 3, 128, 128), jnp.bfloat16),
                 lhs=x.astype(jnp.bfloat16)) == "xla"


def _wide_grads(monkeypatch, enabled: bool, side=48):
    from spp_jax.models import get_model, init_params
    monkeypatch.setenv("SPP_JAX_NATIVE", "1" if enabled else "0")
    # Overfeat-7 at width 1/4: conv3-7 have 128 x 128 channels, so they take Winograd.
    m = get_model("overfeat7", width=0.25, fc_dim=16, num_classes=4)
    p = init_params(m, jax.random.key(0), side)
    rng = np.random.default_rng(3)
    img = jnp.asarray(rng.standard_normal((2, side, side, 3)).astype(np.float32) * 50)

    def loss(params):
        logits = m.apply(params, img, train=False)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), jnp.asarray([1, 3])])
    fn = jax.jit(jax.value_and_grad(loss))
    txt = fn.lower(p).compile().as_text()
    return fn(p), txt.count('custom_call_target="spp_winograd_output"')


def test_backbone_gradients_equal_xla_path(monkeypatch):
    (l_w, g_w), calls_w = _wide_grads(monkeypatch, True)
    (l_x, g_x), calls_x = _wide_grads(monkeypatch, False)
    assert calls_w == 5 and calls_x == 0  # conv3-7
    np.testing.assert_allclose(float(l_w), float(l_x), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_w), jax.tree.leaves(g_x)):
        scale = float(jnp.abs(b).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) <= 1e-4 * scale, jax.tree_util.keystr(path)
