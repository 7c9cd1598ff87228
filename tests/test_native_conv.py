"""The native CPU convolutions (spp_jax.native): values and gradients against brute force,
the backbones' train-step gradient against XLA's path, the build cache and the fallback."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import conv_grads_ref, conv_ref
from spp_jax import native
from spp_jax.models import convolution
from spp_jax.native import conv as nc

HAS_COMPILER = shutil.which(os.environ.get("CXX") or "c++") is not None


@pytest.fixture(autouse=True)
def _built(request):
    if request.node.name == "test_fallback_without_compiler":
        return  # runs everywhere
    if not HAS_COMPILER or not native.cpu_supported():
        pytest.skip("no C++ compiler or no AVX-512: the library runs XLA's convolutions "
                    "(test_fallback_without_compiler)")
    # With a compiler on such a CPU the kernels must build: a failure is a failure, not a skip.
    assert native.available()


# (B, H, W, Ci, Co, k, stride, padding): conv1 gray / colour (7x7 / 2, few input channels),
# conv2-7 (stride 1), odd sides, asymmetric padding, output counts that are not multiples of
# 16 (20, 24: zero filters added; 5 with 3 input channels, 11x11 / 4: stored in part), 4 and
# 2 leftover cells and channels.
CASES = [
    (2, 23, 21, 1, 12, 7, 2, ((1, 1), (1, 1))),
    (2, 19, 24, 3, 96, 7, 2, ((1, 1), (1, 1))),
    (2, 14, 13, 12, 32, 5, 1, ((2, 2), (2, 2))),
    (3, 9, 11, 32, 64, 3, 1, ((1, 1), (1, 1))),
    (2, 10, 7, 64, 64, 3, 1, ((1, 0), (0, 2))),
    (1, 12, 12, 7, 20, 3, 2, ((0, 2), (1, 1))),
    (2, 8, 9, 5, 24, 5, 1, ((0, 0), (4, 3))),
    (1, 16, 16, 70, 80, 3, 1, ((1, 1), (1, 1))),
    # a kernel too large for per-chunk copies of its gradient: split by (tap, 64 channels)
    (1, 5, 4, 256, 160, 3, 1, ((1, 1), (1, 1))),
    (2, 11, 11, 3, 5, 11, 4, ((2, 2), (2, 2))),
    # fewer than 16 filters, stored in part: tiles of 12 cells, then 4, 2 and 1
    (1, 9, 80, 1, 12, 7, 2, ((1, 1), (1, 1))),
    (2, 7, 30, 1, 6, 3, 2, ((0, 1), (1, 0))),
    (1, 6, 21, 2, 8, 3, 1, ((1, 1), (1, 1))),
    (1, 5, 40, 1, 5, 5, 1, ((2, 2), (2, 2))),
]


def _operands(case, seed=0):
    b, h, w, ci, co, k, s, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, ci)).astype(np.float32)
    kern = (rng.standard_normal((k, k, ci, co)) / np.sqrt(k * k * ci)).astype(np.float32)
    return x, kern, s, pad


@pytest.mark.parametrize("case", CASES)
def test_native_conv_values_and_gradients_equal_brute_force(case):
    x, kern, s, pad = _operands(case)
    f = jax.jit(lambda a, w: nc.conv(a, w, pad, s))
    y = np.asarray(f(x, kern))
    ref = conv_ref(x, kern, s, pad)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    dx, dw = jax.jit(lambda a, w, g: jax.vjp(lambda a, w: nc.conv(a, w, pad, s), a, w)[1](g))(
        x, kern, dy)
    dx_ref, dw_ref = conv_grads_ref(x, kern, s, pad, dy)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max())
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-5 * np.abs(dw_ref).max())


def test_native_conv_runs_as_ffi_calls_and_under_vmap():
    # The compiled program holds the native calls (not XLA convolutions), and a vmapped call
    # (sequential over the mapped axis) equals the per-example calls.
    x, kern, s, pad = _operands(CASES[3])
    txt = jax.jit(jax.grad(lambda w: jnp.sum(nc.conv(jnp.asarray(x), w, pad, s) ** 2))).lower(
        kern).compile().as_text()
    assert "spp_conv_forward" in txt and "spp_conv_kernel_grad" in txt
    ks = np.stack([kern, -2 * kern])
    ys = jax.vmap(lambda w: nc.conv(jnp.asarray(x), w, pad, s))(ks)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(ys[i]), conv_ref(x, ks[i], s, pad), rtol=1e-5,
                                   atol=1e-4)


def test_dispatch_takes_only_plain_convolutions():
    x, k = jnp.ones((1, 9, 9, 4)), jnp.ones((3, 3, 4, 16))
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    takes = lambda **kw: convolution._route(**{  # noqa: E731
        "lhs": x, "rhs": k, "window_strides": (1, 1), "padding": ((1, 1), (1, 1)),
        "lhs_dilation": None, "rhs_dilation": None, "dimension_numbers": dn,
        "feature_group_count": 1, **kw}) == "native"
    assert takes()
    assert takes(window_strides=(2, 2))
    assert not takes(window_strides=(1, 2))
    assert not takes(rhs_dilation=(2, 2))
    assert not takes(padding="SAME")
    assert not takes(padding=((3, 3), (1, 1)))           # padding past the kernel
    assert not takes(lhs=x.astype(jnp.bfloat16))
    assert not takes(rhs=jnp.ones((3, 3, 4, 1040)))        # wide: Winograd (NATIVE_MAX_UNITS)
    nchw = jax.lax.conv_dimension_numbers((1, 4, 9, 9), (16, 4, 3, 3), ("NCHW", "OIHW", "NCHW"))
    assert not takes(lhs=jnp.ones((1, 4, 9, 9)), rhs=jnp.ones((16, 4, 3, 3)), dimension_numbers=nchw)


def _embedded_grads(monkeypatch, enabled: bool, side=64):
    from spp_jax.models import get_model, init_params
    monkeypatch.setenv("SPP_JAX_NATIVE", "1" if enabled else "0")
    m = get_model("overfeat7", width=0.125, fc_dim=16, num_classes=4, input_norm="gray_std")
    p = init_params(m, jax.random.key(0), side)
    rng = np.random.default_rng(3)
    img = jnp.asarray(rng.standard_normal((2, side, side, 1)).astype(np.float32) * 50)
    labels = jnp.asarray([1, 3])

    def loss(params):
        logits = m.apply(params, img, train=False)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    fn = jax.jit(jax.value_and_grad(loss))
    txt = fn.lower(p).compile().as_text()
    return fn(p), txt.count("spp_conv_")


def test_backbone_gradients_equal_xla_path(monkeypatch):
    # The embedded Overfeat-7 (gray conv1 and its six stride-1 convs) on the native kernels and
    # on XLA's: same loss and parameter gradient up to float rounding.
    (l_n, g_n), calls_n = _embedded_grads(monkeypatch, True)
    (l_x, g_x), calls_x = _embedded_grads(monkeypatch, False)
    assert calls_x == 0 and calls_n >= 14  # 7 forwards, 7 kernel gradients (+ input gradients)
    np.testing.assert_allclose(float(l_n), float(l_x), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_n), jax.tree.leaves(g_x)):
        scale = float(jnp.abs(b).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SPP_JAX_NATIVE_CACHE", str(tmp_path))
    first = native.build()
    mtime = os.path.getmtime(first)
    assert os.path.dirname(first) == str(tmp_path) and native.build() == first
    assert os.path.getmtime(first) == mtime           # not rebuilt
    assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []


def test_fallback_without_compiler(tmp_path):
    # No compiler and an empty cache: one warning, XLA's convolutions, the same values.
    code = (
        "import logging, jax, jax.numpy as jnp, numpy as np\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from spp_jax import native\n"
        "from spp_jax.models import layers as L\n"
        "assert not native.available()\n"
        "x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 15, 15, 1)), jnp.float32)\n"
        "k = jnp.ones((7, 7, 1, 12)) / 49\n"
        "y = L.input_conv(x, k, 2, 1)\n"
        "txt = jax.jit(lambda a: L.input_conv(a, k, 2, 1)).lower(x).compile().as_text()\n"
        "assert 'spp_conv' not in txt, txt\n"
        "print(float(jnp.sum(y)))\n")
    env = dict(os.environ, CXX="no-such-compiler-xyz", SPP_JAX_NATIVE_CACHE=str(tmp_path),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "native CPU kernels unavailable" in out.stderr
    assert "no-such-compiler-xyz" in out.stderr or not native.cpu_supported()
    x = np.random.default_rng(0).standard_normal((1, 15, 15, 1))
    ref = conv_ref(x, np.ones((7, 7, 1, 12)) / 49, 2, ((1, 1), (1, 1))).sum()
    assert abs(float(out.stdout.strip().splitlines()[-1]) - ref) <= 1e-4 * abs(ref)
