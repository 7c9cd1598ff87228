import numpy as np

from spp_jax.detection.rcnn import RCNNExtractor, context_boxes, time_windows, warp_windows
from spp_jax.serve import Server
from test_det_common import tiny_model, tiny_records


def test_context_boxes_hand_case():
    # a 192-px box grows by 224 / 192 to 224 px about its centre: 16 px context each side of 224 output
    out = context_boxes([[0, 0, 191, 95]])
    np.testing.assert_allclose(out, [[-16, -8, 208, 104]])


def test_warp_constant_and_outside_is_the_fill_colour():
    img = np.full((50, 60, 3), 200, np.uint8)
    w = warp_windows(img, [[10, 10, 39, 39]])
    assert w.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(w[0, 100:120, 100:120], 200)
    w2 = warp_windows(img, [[0, 0, 59, 49]], fill=(50.0, 60.0, 70.0))
    assert w2[0, 0, 0].tolist() == [50, 60, 70] and w2[0, 112, 112, 0] == 200.0  # context beyond the image


def test_rcnn_pool5_is_the_whole_net_on_the_warp():
    import jax.numpy as jnp
    m, v = tiny_model()
    img = tiny_records("trainval", 1)[0]["image"]
    boxes = np.array([[0, 0, 50, 50], [-20, 10, 300, 90]], np.float32)  # the second reaches outside
    p5, _ = RCNNExtractor(Server(m, v, mean=128.0), batch=4).pool5(img, boxes)
    x = warp_windows(img, boxes, fill=128.0) - 128.0  # outside the image: 0 after the mean
    assert (x[1, :, :5] == 0).all()
    want = m.apply(v, jnp.asarray(x), method=lambda mod, x: mod.pool_map(mod.conv_map(x)))
    # The server's programs compile with spp_jax.xla_options (another CPU convolution than
    # this eager reference): equal up to float rounding, ~1e-6 of the largest value (~80).
    np.testing.assert_allclose(p5, np.asarray(want), rtol=1e-5, atol=1e-4)


def test_rcnn_extractor_and_timing():
    m, v = tiny_model()
    ex = RCNNExtractor(Server(m, v, mean=128.0), batch=4)
    img = tiny_records("trainval", 1)[0]["image"]
    boxes = np.array([[0, 0, 50, 50], [10, 10, 100, 90], [0, 0, 239, 159], [5, 5, 30, 60], [1, 2, 3, 4]],
                     np.float32)
    p5, sidx = ex.pool5(img, boxes)
    assert p5.shape == (5, m.pooled_dim) and np.isfinite(p5).all() and (sidx == 0).all()
    t = time_windows(ex, img, boxes, max_windows=2)
    assert t["extrapolated"] and t["measured_windows"] == 2 and t["seconds"] > 0
