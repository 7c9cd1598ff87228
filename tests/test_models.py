"""The Table-1 backbones: map sizes, pooled lengths, geometry vs measured receptive fields, layers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax.models import BACKBONES, get_model, init_params, map_size
from spp_jax.models import layers as L
from tests.reference import window_ref

# SPP_FACTS section 3: last conv map side at a 224 input (and ZF-5's 10 at 180).
PAPER_224 = {"zf5": 13, "convnet5": 13, "overfeat5": 18, "overfeat7": 18}
TEST_SCALES = (224, 256, 300, 360, 448, 560)


def _conv_shape(name, side, width=0.05):
    m = get_model(name, width=width, fc_dim=8, num_classes=3)
    v = jax.eval_shape(lambda: init_params(m, jax.random.key(0), side))  # traced, never compiled
    out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, side, side, 3)), features=True), v)
    return out


@pytest.mark.parametrize("name", list(PAPER_224))
def test_map_sizes_at_paper_sizes(name):
    assert map_size(name, 224) == PAPER_224[name]
    for side in (180,) + TEST_SCALES:
        out = _conv_shape(name, side)
        assert out["conv"].shape[1:3] == (map_size(name, side),) * 2
        # the Flax module and the spec arithmetic agree; the map grows with the input
    sizes = [map_size(name, s) for s in TEST_SCALES]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_zf5_180_and_pooled_lengths():
    assert map_size("zf5", 180) == 10  # released ZF-5
    # fc6 inputs with SPP (6,3,2,1) at full width: 12,800 (256 ch) and 25,600 (Overfeat's 512 ch)
    for name, dim in (("zf5", 12800), ("convnet5", 12800), ("overfeat5", 25600), ("overfeat7", 25600)):
        m = get_model(name, num_classes=1000)
        assert m.pooled_dim == dim
        v = jax.eval_shape(lambda: init_params(m, jax.random.key(0), 180))
        assert v["params"]["classifier"]["fc6"]["kernel"].shape == (dim, 4096)
        out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, 180, 180, 3)), features=True), v)
        assert out["pooled"].shape == (2, dim) and out["logits"].shape == (2, 1000)
        assert out["fc7"].shape == (2, 4096)
    assert get_model("zf5", spp=False).pooled_dim == 256 * 36  # no-SPP: the 6x6 level alone
    assert get_model("zf5", levels=(4, 3, 2, 1)).pooled_dim == 256 * 30


def test_no_spp_pools_to_6x6_at_224_and_refuses_other_sizes():
    for name in PAPER_224:
        m = get_model(name, spp=False, width=0.05, fc_dim=8, num_classes=3)
        v = jax.eval_shape(lambda: init_params(m, jax.random.key(0), 224))
        out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 224, 224, 3)), features=True), v)
        assert out["pooled"].shape == (1, 36 * m.channels)
        with pytest.raises(ValueError, match="needs a conv map that pools to 6x6"):
            jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 180, 180, 3))), v)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="zf5, convnet5, overfeat5, overfeat7"):
        get_model("alexnet")
    with pytest.raises(ValueError, match="valid: paper, he"):
        init_params(get_model("zf5", init_scheme="xavier", width=0.05, fc_dim=4), jax.random.key(0), 64)


def test_bad_image_shape():
    m = get_model("zf5", width=0.05, fc_dim=4, num_classes=2)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 64, 64))))
    with pytest.raises(ValueError, match="too small for layer"):
        map_size("overfeat7", 10)
    v = jax.eval_shape(lambda: init_params(m, jax.random.key(0), 64))
    with pytest.raises(ValueError, match="too small for layer pool2"):
        jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 20, 20, 3))), v)


def test_initialisation_paper_and_he():
    m = get_model("zf5", width=0.25, fc_dim=64, num_classes=10)
    p = init_params(m, jax.random.key(0), 64)["params"]
    k = np.asarray(p["backbone"]["conv3"]["kernel"])
    assert abs(k.std() - 0.01) < 0.001 and np.all(np.asarray(p["backbone"]["conv3"]["bias"]) == 0)
    assert abs(np.asarray(p["classifier"]["fc6"]["kernel"]).std() - 0.01) < 0.001
    mh = get_model("zf5", width=0.25, fc_dim=64, num_classes=10, init_scheme="he")
    ph = init_params(mh, jax.random.key(0), 64)["params"]
    kh = np.asarray(ph["backbone"]["conv3"]["kernel"])
    fan_in = 3 * 3 * kh.shape[2]
    assert abs(kh.std() / np.sqrt(2 / fan_in) - 1) < 0.05


def _measured_rf_centre(name, j, side_w=400, side_h=None):
    """Perturbation probe on the real Flax model: which input columns change conv-map column j?

    All weights positive and the input constant makes every layer (ReLU, LRN with tiny alpha,
    max pool) monotone, so raising one input column changes exactly the outputs whose receptive
    field contains it. Returns the midpoint of that column range.
    """
    side_h = side_h or 64
    m = get_model(name, width=0.03, fc_dim=4, num_classes=2)
    v = init_params(m, jax.random.key(0), 64)
    v = jax.tree.map(lambda a: jnp.full_like(a, 0.1 if a.ndim == 1 else 1.0 / a[..., 0].size), v)
    conv = jax.jit(lambda x: m.apply(v, x, method=m.conv_map))
    base = np.asarray(conv(jnp.ones((1, side_h, side_w, 3))))[0]
    hit = []
    for chunk in np.array_split(np.arange(side_w), 4):
        x = np.ones((len(chunk), side_h, side_w, 3), np.float32)
        x[np.arange(len(chunk)), :, chunk, :] += 1.0
        out = np.asarray(conv(jnp.asarray(x)))
        changed = np.any(out[:, :, j, :] != base[None, :, j, :], axis=(1, 2))
        hit.extend(chunk[changed])
    lo, hi = min(hit), max(hit)
    assert lo > 0 and hi < side_w - 1, "receptive field clipped by the image edge: choose another j"
    return (lo + hi) / 2, hi - lo + 1


@pytest.mark.parametrize("name, j", [("zf5", 12), ("convnet5", 12), ("overfeat7", 16)])
def test_geometry_matches_measured_receptive_field(name, j):
    g = get_model(name).geometry
    centre, extent = _measured_rf_centre(name, j)
    assert centre == g.offset + g.stride * j
    if name == "zf5":
        assert (g.stride, g.offset) == (16.0, 20.0)  # released code: centre of cell j at 16 j + 20
    assert g.stride == {"zf5": 16, "convnet5": 16, "overfeat7": 12}[name]


def test_max_pool_ceil_mode_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 10, 7, 2)).astype(np.float32)
    spec = L.Pool("p", 3, 2, ceil_mode=True)
    got = np.asarray(L.max_pool(jnp.asarray(x), spec))
    oh, ow = -(-(10 - 3) // 2) + 1, -(-(7 - 3) // 2) + 1  # Caffe: ceil((in - k) / s) + 1
    want = np.array([[[x[0, i * 2:i * 2 + 3, j * 2:j * 2 + 3, c].max() for c in range(2)]
                      for j in range(ow)] for i in range(oh)])
    np.testing.assert_array_equal(got[0], want)
    assert got.shape[1:3] == (5, 3)
    assert L.max_pool(jnp.asarray(x), L.Pool("p", 3, 2)).shape[1:3] == (4, 3)


def _pool_windows(a: int, spec) -> list:
    """The pool's windows on an a-cell axis, clipped at the edge (Caffe ceil mode)."""
    return [(i * spec.stride, min(i * spec.stride + spec.kernel, a))
            for i in range(L.spec_out_size(a, spec))]


@pytest.mark.parametrize("spec", sorted({s for specs in BACKBONES.values() for s in specs
                                         if isinstance(s, L.Pool)}, key=repr))
@pytest.mark.parametrize("hw", [(11, 14), (12, 9)])
def test_backbone_pools_values_and_gradients_with_ties(spec, hw):
    # Small integers: many exact ties per window, where gradient rules differ. Every pool
    # of every backbone (through spp_jax.binmax).
    rng = np.random.default_rng(hw[0])
    x = rng.integers(0, 3, (2, *hw, 3)).astype(np.float32)
    y, vjp = jax.vjp(lambda a: L.max_pool(a, spec), jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    y_ref, dx_ref = window_ref(x, _pool_windows(hw[0], spec), _pool_windows(hw[1], spec), g)
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), dx_ref, rtol=1e-6, atol=1e-6)


def test_backbone_pools_backward_has_no_scatter():
    # The fast paths are taken: Overfeat's kernel = stride pools and ZF-5's overlapping
    # ceil-mode pools differentiate without XLA's select-and-scatter (slow on CPU).
    for spec in (L.Pool("pool1", 3, 3), L.Pool("pool2", 2, 2), L.Pool("p", 3, 2, True)):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda a: L.max_pool(a, spec).sum()))(
            jnp.zeros((1, 13, 13, 2))))
        assert "scatter" not in jaxpr  # neither select_and_scatter nor scatter-add
    gaps = str(jax.make_jaxpr(jax.grad(lambda a: L.max_pool(a, L.Pool("p", 2, 3)).sum()))(
        jnp.zeros((1, 13, 13, 2))))
    assert "select_and_scatter" in gaps  # kernel < stride keeps XLA's own pool


@pytest.mark.parametrize("spec", [L.Pool("p", 3, 2, True), L.Pool("p", 3, 2), L.Pool("p", 5, 3, True),
                                  L.Pool("p", 2, 3)])
@pytest.mark.parametrize("hw", [(13, 13), (110, 27), (12, 8)])
def test_pools_equal_reduce_window_and_its_gradient_with_ties(spec, hw):
    # XLA's own max-pool gradient also picks each window's first max in row-major order, so
    # even with ties (small integers) the gradients are equal, overhanging windows included.
    rng = np.random.default_rng(sum(hw))
    x = jnp.asarray(rng.integers(0, 3, (2, *hw, 3)).astype(np.float32))
    y = L.max_pool(x, spec)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(L.reduce_window_pool(x, spec)))
    g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    got = jax.vjp(lambda a: L.max_pool(a, spec), x)[1](g)[0]
    want = jax.vjp(lambda a: L.reduce_window_pool(a, spec), x)[1](g)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("within", [True, False])
def test_lrn_brute_force(within):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 6, 7)).astype(np.float32) * 30
    spec = L.LRN("n", size=3 if within else 5, alpha=5e-3, beta=0.75, within_channel=within)
    got = np.asarray(L.lrn(jnp.asarray(x), spec))
    want = np.empty_like(x)
    n = spec.size
    for y in range(5):
        for xx in range(6):
            for c in range(7):
                if within:  # Caffe WITHIN_CHANNEL: mean over a zero-padded size x size window
                    win = x[0, max(0, y - 1):y + 2, max(0, xx - 1):xx + 2, c]
                    s = 1 + spec.alpha * (win ** 2).sum() / (n * n)
                else:  # AlexNet ACROSS_CHANNELS
                    win = x[0, y, xx, max(0, c - 2):c + 3]
                    s = 1 + spec.alpha / n * (win ** 2).sum()
                want[0, y, xx, c] = x[0, y, xx, c] * s ** -0.75
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("size,hw", [(3, (5, 6)), (3, (1, 1)), (5, (2, 7)), (3, (13, 9))])
def test_within_channel_lrn_gradient(size, hw):
    # The hand-written backward (one more box sum) against XLA's autodiff of the
    # reduce_window formulation, and against finite differences (float64).
    rng = np.random.default_rng(size + sum(hw))
    spec = L.LRN("n", size=size, alpha=5e-2, beta=0.75)
    x = jnp.asarray(rng.standard_normal((2, *hw, 4)).astype(np.float32) * 5)
    g = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
    y, vjp = jax.vjp(lambda a: L.lrn(a, spec), x)
    y_ref, vjp_ref = jax.vjp(lambda a: L.reduce_window_lrn(a, spec), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]), rtol=1e-4, atol=1e-5)
    with jax.enable_x64(True):
        from jax.test_util import check_grads
        check_grads(lambda a: L.lrn(a, dataclasses.replace(spec, beta=0.6)),
                    (jnp.asarray(np.asarray(x), jnp.float64),), order=1, modes=["rev"])


def test_backbone_tables_follow_table_1():
    convs = {n: [(s.features, s.kernel) for s in specs if isinstance(s, L.Conv)] for n, specs in BACKBONES.items()}
    assert convs["zf5"] == [(96, 7), (256, 5), (384, 3), (384, 3), (256, 3)]
    assert convs["convnet5"] == [(96, 11), (256, 5), (384, 3), (384, 3), (256, 3)]
    assert convs["overfeat5"] == [(96, 7), (256, 5), (512, 3), (512, 3), (512, 3)]
    assert convs["overfeat7"] == convs["overfeat5"] + [(512, 3), (512, 3)]
    assert spp_jax.get_model("overfeat7").channels == 512


def test_init_schemes_biases():
    # "paper": the released definition, Gaussian std 0.01 kernels, biases 1 on conv2, conv4, conv5,
    # fc6, fc7, fc8 and 0 elsewhere (Overfeat-7's conv6/conv7 included); "he": zero biases.
    for scheme in ("paper", "he"):
        m = get_model("overfeat7", width=0.05, fc_dim=64, num_classes=3, init_scheme=scheme)
        p = init_params(m, jax.random.key(0), 64)["params"]
        layers = {**p["backbone"], **p["classifier"]}
        assert sorted(layers) == ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7",
                                  "fc6", "fc7", "fc8"]
        for name, q in layers.items():
            one = scheme == "paper" and name in ("conv2", "conv4", "conv5", "fc6", "fc7", "fc8")
            np.testing.assert_array_equal(np.asarray(q["bias"]), 1.0 if one else 0.0, err_msg=name)
        if scheme == "paper":
            k = np.concatenate([np.ravel(layers[n]["kernel"]) for n in ("conv3", "conv4", "fc6")])
            assert abs(k.std() - 0.01) < 0.0005 and abs(k.mean()) < 0.0005


def test_input_sides():
    from spp_jax.models import input_sides, map_size
    # No-SPP ZF-5: the last pool (3, stride 2, ceil) gives 6x6 from a 12- or 13-cell map,
    # which a 16-pixel stride reaches from 32 consecutive sides around 224.
    sides = input_sides("zf5", spp=False)
    assert sides == list(range(207, 239)) and 224 in sides
    assert {map_size("zf5", s) for s in sides} == {12, 13}
    spp = input_sides("overfeat7", largest=300)
    assert spp == list(range(spp[0], 301))
    with pytest.raises(ValueError):
        map_size("overfeat7", spp[0] - 1)


def _brute_conv(x, w, s, pad):
    """Brute-force numpy strided convolution, zero padding: (B,H,W,C) x (k,k,C,F)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = w.shape[0]
    oh, ow = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = np.einsum("bhwc,hwcf->bf", x[:, i * s:i * s + k, j * s:j * s + k], w)
    return out


@pytest.mark.parametrize("hw,k,s,pad,c,f", [
    ((23, 30), 7, 2, 0, 1, 5),    # Overfeat's conv1 on gray input; odd sides crop the last row
    ((24, 19), 7, 2, 1, 3, 4),    # ZF-5's conv1 (pad 1), colour
    ((31, 31), 11, 4, 0, 3, 2),   # Convnet*-5's 11x11 / 4
    ((16, 17), 4, 2, 2, 2, 3),    # kernel a multiple of the stride, padding past the blocks
    ((7, 9), 3, 3, 1, 1, 1),      # kernel = stride
    ((25, 26), 11, 4, 2, 1, 3),   # one channel: blocks two outputs wide, an odd last block
    ((9, 10), 4, 2, 2, 1, 2),     # one channel, padding past the wide blocks
])
def test_space_to_depth_conv(hw, k, s, pad, c, f):
    # Values against brute force; the custom gradient against autodiff of the blocks
    # formulation itself (an independent path: pads, reshapes and a stride-1 convolution).
    from spp_jax.models import space_to_depth as S2D
    rng = np.random.default_rng(k * 100 + s * 10 + pad)
    x = rng.standard_normal((2, *hw, c)).astype(np.float32)
    w = rng.standard_normal((k, k, c, f)).astype(np.float32)
    y, vjp = jax.vjp(lambda a, b: S2D.conv(a, b, s, pad), jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(y), _brute_conv(x, w, s, pad), rtol=1e-4, atol=1e-4)
    g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    _, vjp_blocks = jax.vjp(lambda a, b: S2D._block_conv(a, b, s, pad), jnp.asarray(x), jnp.asarray(w))
    for got, want in zip(vjp(g), vjp_blocks(g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_input_conv_uses_blocks_for_small_strided_layers(monkeypatch):
    # Without the native kernels (test_native_conv.py) the backbones' conv1 goes through the
    # blocks only where they measured faster (L.BLOCK_CONV_MAX_UNITS); either way the model
    # equals brute force.
    from spp_jax.models import space_to_depth as S2D
    monkeypatch.setenv("SPP_JAX_NATIVE", "0")
    calls = []
    orig = S2D.conv
    try:
        S2D.conv = lambda *a: calls.append(a[1].shape) or orig(*a)
        x = jnp.ones((1, 15, 15, 1))
        L.input_conv(x, jnp.ones((7, 7, 1, 12)), 2, 0)
        L.input_conv(jnp.ones((1, 15, 15, 3)), jnp.ones((7, 7, 3, 96)), 2, 0)  # full-width colour
        L.input_conv(x, jnp.ones((3, 3, 1, 4)), 1, 1)  # stride 1: nothing to gain
    finally:
        S2D.conv = orig
    assert calls == [(7, 7, 1, 12)]
    m = get_model("overfeat7", width=0.125, fc_dim=8, num_classes=3)
    p = init_params(m, jax.random.key(0), 64)
    img = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    feats = m.apply(p, jnp.asarray(img), features=True)
    k1 = np.asarray(p["params"]["backbone"]["conv1"]["kernel"])
    b1 = np.asarray(p["params"]["backbone"]["conv1"]["bias"])
    spec = BACKBONES["overfeat7"][0]
    conv1 = np.maximum(_brute_conv(img, k1, spec.stride, spec.pad) + b1, 0)
    sown = m.apply(p, jnp.asarray(img), method=m.conv_map, mutable=["intermediates"])[1]
    np.testing.assert_allclose(np.asarray(sown["intermediates"]["backbone"]["conv1_out"][0]), conv1,
                               rtol=1e-4, atol=1e-4)
    assert np.isfinite(np.asarray(feats["logits"])).all()
