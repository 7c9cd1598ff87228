"""Tests for spp_jax.detection.boxes (0-based inclusive boxes, VOC +1 areas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.detection.boxes import (
    apply_deltas,
    bbox_targets,
    box_area,
    clip_boxes,
    flip_boxes_lr,
    internal_to_voc,
    pairwise_iou,
    scale_boxes,
    voc_to_internal,
)


def _raster(box, shape=(24, 24)):
    """Pixel mask (H, W) of an inclusive integer box (empty if degenerate)."""
    mask = np.zeros(shape, bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 >= x1 and y2 >= y1:
        mask[y1 : y2 + 1, x1 : x2 + 1] = True
    return mask


def _random_int_boxes(rng, n, size=24):
    """(n, 4) int boxes inside a size x size image, some one pixel wide."""
    x = np.sort(rng.integers(0, size, (n, 2)), axis=1)
    y = np.sort(rng.integers(0, size, (n, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)


def test_voc_conversion_round_trip():
    voc = np.array([[1, 1, 10, 20], [5, 6, 7, 8]])
    internal = voc_to_internal(voc)
    np.testing.assert_array_equal(internal, [[0, 0, 9, 19], [4, 5, 6, 7]])
    np.testing.assert_array_equal(internal_to_voc(internal), voc)
    # Width with the +1 convention is unchanged by the shift.
    np.testing.assert_array_equal(box_area(voc), box_area(internal))


def test_box_area_plus_one_and_degenerate():
    boxes = np.array([[0, 0, 9, 9], [2, 3, 2, 3], [5, 5, 3, 8], [0, 0, 4, 1]])
    # 10 x 10, one pixel, negative width -> 0, 5 x 2.
    np.testing.assert_array_equal(box_area(boxes), [100.0, 1.0, 0.0, 10.0])
    assert box_area(boxes).dtype == np.float64
    assert box_area(boxes[None]).shape == (1, 4)  # arbitrary leading dims


def test_pairwise_iou_hand_cases():
    a = np.array([[0, 0, 9, 9]])
    b = np.array(
        [
            [0, 0, 9, 9],  # identical -> 1
            [5, 5, 14, 14],  # 5x5 overlap: 25 / (100 + 100 - 25) = 1/7
            [10, 0, 19, 9],  # adjacent, shares no pixel -> 0
            [9, 0, 18, 9],  # shares one column: 10 / 190
            [30, 30, 40, 40],  # far away -> 0
        ]
    )
    expected = [1.0, 1.0 / 7.0, 0.0, 10.0 / 190.0, 0.0]
    np.testing.assert_allclose(pairwise_iou(a, b)[0], expected, rtol=1e-12)
    np.testing.assert_allclose(pairwise_iou(b, a)[:, 0], expected, rtol=1e-12)


def test_pairwise_iou_matches_pixel_counting():
    rng = np.random.default_rng(0)
    a = _random_int_boxes(rng, 30)
    b = _random_int_boxes(rng, 20)
    got = pairwise_iou(a, b)
    assert got.shape == (30, 20)
    for i in range(len(a)):
        for j in range(len(b)):
            ma, mb = _raster(a[i]), _raster(b[j])
            ref = (ma & mb).sum() / (ma | mb).sum()
            assert got[i, j] == pytest.approx(ref, abs=1e-12)


def test_pairwise_iou_degenerate_and_empty():
    degenerate = np.array([[5.0, 5.0, 3.0, 3.0], [0.0, 0.0, -1.0, 9.0]])  # widths -1 and 0
    iou = pairwise_iou(degenerate, degenerate)
    assert np.all(np.isfinite(iou)) and np.all(iou == 0)
    normal = np.array([[0.0, 0.0, 9.0, 9.0]])
    assert np.all(pairwise_iou(degenerate, normal) == 0)
    assert pairwise_iou(np.zeros((0, 4)), normal).shape == (0, 1)
    assert pairwise_iou(normal, np.zeros((0, 4))).shape == (1, 0)


def test_pairwise_iou_jax_matches_numpy_under_jit():
    rng = np.random.default_rng(1)
    a = _random_int_boxes(rng, 7).astype(np.float32)
    b = _random_int_boxes(rng, 5).astype(np.float32)
    got = jax.jit(pairwise_iou)(a, b)
    assert isinstance(got, jax.Array) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), pairwise_iou(a, b), rtol=1e-6)


@pytest.mark.parametrize(
    "fn, args",
    [
        (box_area, ()),
        (clip_boxes, ((10, 10),)),
        (flip_boxes_lr, (10,)),
        (scale_boxes, (2.0,)),
        (voc_to_internal, ()),
    ],
)
def test_wrong_last_dimension_raises(fn, args):
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        fn(np.zeros((3, 5)), *args)


def test_pairwise_iou_requires_2d():
    with pytest.raises(ValueError):
        pairwise_iou(np.zeros((3, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError):
        pairwise_iou(np.zeros((2, 3, 4)), np.zeros((2, 4)))


def test_clip_boxes():
    boxes = np.array([[-5, -3, 50, 8], [2, 2, 4, 4]])
    # H = 10, W = 20: x in [0, 19], y in [0, 9].
    clipped = clip_boxes(boxes, (10, 20))
    np.testing.assert_array_equal(clipped, [[0, 0, 19, 8], [2, 2, 4, 4]])
    assert clipped.dtype == boxes.dtype
    got = jax.jit(clip_boxes, static_argnums=1)(jnp.asarray(boxes, jnp.float32), (10, 20))
    np.testing.assert_array_equal(np.asarray(got), clipped)
    with pytest.raises(ValueError):
        clip_boxes(boxes, (10,))


def test_flip_boxes_lr_matches_flipped_pixels():
    rng = np.random.default_rng(2)
    width = 24
    boxes = _random_int_boxes(rng, 20, size=width)
    flipped = flip_boxes_lr(boxes, width)
    for box, fbox in zip(boxes, flipped):
        np.testing.assert_array_equal(_raster(fbox), _raster(box)[:, ::-1])
    np.testing.assert_array_equal(flip_boxes_lr(flipped, width), boxes)  # involution
    np.testing.assert_array_equal(flip_boxes_lr(np.array([0, 1, 3, 4]), 10), [6, 1, 9, 4])


def test_scale_boxes():
    boxes = np.array([[0, 0, 10, 20]])
    np.testing.assert_allclose(scale_boxes(boxes, 0.5), [[0, 0, 5, 10]])
    # Pair is (scale_y, scale_x), ordered like (H, W).
    np.testing.assert_allclose(scale_boxes(boxes, (2.0, 3.0)), [[0, 0, 30, 40]])
    with pytest.raises(ValueError):
        scale_boxes(boxes, (1.0, 2.0, 3.0))


def test_bbox_targets_hand_cases():
    p = np.array([0.0, 0.0, 9.0, 19.0])  # w = 10, h = 20, centre (4.5, 9.5)
    np.testing.assert_allclose(bbox_targets(p, p), np.zeros(4), atol=1e-12)
    # Shift right by 1 px and down by 4 px: dx = 1/10, dy = 4/20.
    np.testing.assert_allclose(bbox_targets(p, p + [1, 4, 1, 4]), [0.1, 0.2, 0, 0], atol=1e-12)
    # Same centre (4.5, 9.5), twice the size (w 20: x1 = 4.5 - 9.5 = -5).
    g = np.array([-5.0, -10.0, 14.0, 29.0])
    np.testing.assert_allclose(bbox_targets(p, g), [0, 0, np.log(2), np.log(2)], atol=1e-12)


def test_bbox_targets_apply_deltas_round_trip():
    rng = np.random.default_rng(3)
    p = _random_int_boxes(rng, 50, size=200).astype(np.float64)
    g = _random_int_boxes(rng, 50, size=200).astype(np.float64)
    t = bbox_targets(p, g)
    assert t.shape == (50, 4)
    np.testing.assert_allclose(apply_deltas(p, t), g, atol=1e-9)
    np.testing.assert_allclose(apply_deltas(p, np.zeros_like(t)), p, atol=1e-12)
    # Per-class deltas broadcast against boxes[:, None, :].
    per_class = np.stack([t, np.zeros_like(t)], axis=1)  # (50, 2, 4)
    out = apply_deltas(p[:, None, :], per_class)
    assert out.shape == (50, 2, 4)
    np.testing.assert_allclose(out[:, 0], g, atol=1e-9)
    # JAX under jit agrees with NumPy.
    out_j = jax.jit(lambda a, b: apply_deltas(a, bbox_targets(a, b)))(
        jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(out_j), g, atol=1e-3)


def test_apply_deltas_max_log_scale():
    p = np.array([[0.0, 0.0, 9.0, 9.0]])
    out = apply_deltas(p, np.array([[0.0, 0.0, 100.0, 100.0]]), max_log_scale=np.log(4.0))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(box_area(out), [40.0 * 40.0])
