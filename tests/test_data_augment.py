"""Tests for spp_jax.data.augment (pure numpy/OpenCV image functions)."""

import cv2
import numpy as np
import pytest

from spp_jax.data import augment as A


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- geometry ----------------------------------------------------------------


@pytest.mark.parametrize(
    "hw, side, expected",
    [
        ((100, 150), 50, (50, 75)),
        ((150, 100), 50, (75, 50)),
        ((3, 5), 4, (4, 7)),  # 6.67 -> 7
        ((4, 6), 3, (3, 5)),  # 4.5 -> 5: half rounds up, not to even
        ((300, 300), 256, (256, 256)),
        ((2, 1000), 256, (256, 128000)),
    ],
)
def test_resize_shorter_shape(hw, side, expected):
    img = np.zeros((*hw, 3), np.uint8)
    out = A.resize_shorter(img, side)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8


def test_resize_keeps_constant_image_and_identity():
    img = np.full((40, 60, 3), 77, np.uint8)
    assert (A.resize_shorter(img, 20) == 77).all()
    assert (A.resize_shorter(img, 90) == 77).all()
    same = _img(8, 9)
    assert A.resize_shorter(same, 8) is same
    assert A.resize_to(_img(224, 224), 180).shape == (180, 180, 3)
    assert A.resize_to(_img(10, 20), (7, 5)).shape == (7, 5, 3)


def test_crop_boxes_hand_checked():
    # 6 x 8 image, 4 x 4 crops: margins 2 (rows) and 4 (columns).
    assert A.five_crop_boxes(6, 8, 4) == [
        (1, 2, 5, 6),  # centre
        (0, 0, 4, 4),  # top-left
        (0, 4, 4, 8),  # top-right
        (2, 0, 6, 4),  # bottom-left
        (2, 4, 6, 8),  # bottom-right
    ]
    # Odd margin: the centre box starts at floor(margin / 2).
    assert A.crop_box(7, 4, 4, "center") == (1, 0, 5, 4)
    assert A.CROP_POSITIONS[0] == "center"
    with pytest.raises(ValueError):
        A.crop_box(3, 8, 4, "center")
    with pytest.raises(ValueError):
        A.crop_box(8, 8, 4, "middle")


def test_crop_content():
    img = _img(6, 8)
    assert np.array_equal(A.crop(img, (2, 4, 6, 8)), img[2:6, 4:8])
    with pytest.raises(ValueError):
        A.crop(img, (0, 0, 7, 4))


def test_ten_crops_order_and_flips():
    img = _img(6, 8)
    v = A.ten_crops(img, 4)
    assert v.shape == (10, 4, 4, 3) and v.dtype == np.uint8
    for k, box in enumerate(A.five_crop_boxes(6, 8, 4)):
        assert np.array_equal(v[k], A.crop(img, box))
        assert np.array_equal(v[5 + k], np.flip(v[k], axis=1))


def test_flip():
    img = _img(3, 5)
    assert np.array_equal(A.hflip(img), img[:, ::-1])
    rng = np.random.default_rng(0)
    flips = [A.random_hflip(img, rng)[1] for _ in range(200)]
    assert 50 < sum(flips) < 150
    out, flipped = A.random_hflip(img, rng, p=1.0)
    assert flipped and np.array_equal(out, img[:, ::-1])


# -- PCA colour ----------------------------------------------------------------


def test_pca_alpha_zero_is_identity():
    img = _img(5, 7)
    out = A.apply_pca_colour(img, np.zeros(3))
    assert out.dtype == np.float32 and np.array_equal(out, img.astype(np.float32))


def test_pca_offset_constant_and_in_eigen_span():
    img = _img(5, 7)
    alpha = np.array([0.3, -1.2, 0.7])
    out = A.apply_pca_colour(img, alpha)
    diff = out - img.astype(np.float32)
    assert np.allclose(diff, diff[0, 0], atol=1e-4)  # same offset at every pixel
    # Coordinates of the offset in the eigenbasis are 255 * alpha_i * lambda_i.
    coords = A.IMAGENET_PCA_EIGVEC.T.astype(np.float64) @ diff[0, 0] / 255.0
    assert np.allclose(coords, alpha * A.IMAGENET_PCA_EIGVAL, atol=2e-4)
    # With a zero eigenvalue the offset stays in the span of the others.
    eigval = np.array([0.2, 0.05, 0.0])
    off = A.pca_colour_offset(alpha, eigval, A.IMAGENET_PCA_EIGVEC)
    assert abs(float(A.IMAGENET_PCA_EIGVEC[:, 2] @ off)) < 1e-3


def test_random_pca_colour_draws():
    img = np.zeros((2, 2, 3), np.uint8)
    rng = np.random.default_rng(0)
    offsets = np.stack([A.random_pca_colour(img, rng)[0, 0] for _ in range(2000)])
    # Std along the main eigenvector ~= 255 * 0.1 * 0.2175.
    proj = offsets @ A.IMAGENET_PCA_EIGVEC[:, 0]
    assert abs(proj.std() - 255 * 0.1 * 0.2175) < 0.5
    assert abs(proj.mean()) < 0.5


def test_estimate_pca_colour_recovers_direction():
    rng = np.random.default_rng(1)
    d = np.array([1.0, 2.0, 2.0]) / 3.0
    images = []
    for _ in range(5):
        t = rng.normal(0, 20, size=(16, 16, 1))
        images.append(np.clip(120 + t * d, 0, 255).astype(np.uint8))
    eigval, eigvec = A.estimate_pca_colour(images, num_samples=None, pixels_per_image=None)
    assert eigval.shape == (3,) and eigvec.shape == (3, 3)
    assert eigval[0] >= eigval[1] >= eigval[2] >= 0
    assert abs(abs(float(eigvec[:, 0] @ d)) - 1) < 1e-3
    assert eigval[1] < 0.05 * eigval[0]
    assert np.allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-5)
    # Eigenvalues are of the covariance of [0, 1]-scaled pixels.
    px = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255
    assert np.isclose(eigval.sum(), np.trace(np.cov(px.T)), rtol=1e-4)


# -- mean ----------------------------------------------------------------------


def test_compute_mean_image_equals_numpy_mean():
    imgs = [_img(8, 8, seed=s) for s in range(4)]
    items = [{"image": im, "label": 0} for im in imgs]
    mean = A.compute_mean_image(items, size=8, num_samples=None)
    assert mean.shape == (8, 8, 3) and mean.dtype == np.float32
    assert np.allclose(mean, np.mean(np.stack(imgs).astype(np.float64), axis=0), atol=1e-4)
    # Varied sizes are warped to size x size first.
    imgs2 = [_img(10, 14, 5), _img(6, 5, 6)]
    mean2 = A.compute_mean_image(imgs2, size=8, num_samples=None)
    ref = np.mean([A.resize_to(im, 8).astype(np.float64) for im in imgs2], axis=0)
    assert np.allclose(mean2, ref, atol=1e-4)
    # Corrupt items are ignored.
    mean3 = A.compute_mean_image(imgs + [b"junk"], size=8, num_samples=None)
    assert np.allclose(mean3, mean, atol=1e-4)


def test_compute_mean_image_subset():
    imgs = [np.full((4, 4, 3), v, np.uint8) for v in range(10)]
    mean = A.compute_mean_image(imgs, size=4, num_samples=3, seed=3)
    chosen = np.sort(np.random.default_rng(3).choice(10, 3, replace=False))
    assert np.allclose(mean, chosen.mean())


def test_subtract_mean():
    img = _img(5, 7)
    f = img.astype(np.float32)
    assert np.array_equal(A.subtract_mean(img, None), f)
    ch = np.array([1.0, 2.0, 3.0], np.float32)
    assert np.allclose(A.subtract_mean(img, ch), f - ch)
    mean_img = np.full((8, 8, 3), 10.0, np.float32)
    out = A.subtract_mean(img, mean_img)  # warped to 5 x 7
    assert out.shape == (5, 7, 3) and out.dtype == np.float32
    assert np.allclose(out, f - 10.0, atol=1e-4)
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[None, :, None], (8, 8, 3))
    out = A.subtract_mean(np.zeros((8, 16, 3), np.uint8), ramp)
    assert np.allclose(-out, A.resize_to(np.ascontiguousarray(ramp), (8, 16)))


# -- conversion / decoding -------------------------------------------------------


def test_to_rgb_uint8_conversions():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for x in (g, g[:, :, None], np.stack([g, np.full_like(g, 9)], -1)):
        out = A.to_rgb_uint8(x)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        assert all(np.array_equal(out[:, :, c], g) for c in range(3))
    rgba = np.dstack([_img(3, 4), np.full((3, 4), 128, np.uint8)])
    assert np.array_equal(A.to_rgb_uint8(rgba), rgba[:, :, :3])
    cmyk = np.zeros((1, 2, 4), np.uint8)
    cmyk[0, 1] = [255, 0, 0, 0]  # full cyan -> (0, 255, 255)
    assert A.to_rgb_uint8(cmyk, four_channel="cmyk").tolist() == [
        [[255, 255, 255], [0, 255, 255]]]
    fl = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    assert A.to_rgb_uint8(fl).tolist() == [[[0, 128, 255]]]
    fl255 = np.array([[[0.0, 127.6, 300.0]]], np.float64)
    assert A.to_rgb_uint8(fl255).tolist() == [[[0, 128, 255]]]
    nan = np.array([[[np.nan, 0.2, 0.4]]], np.float32)
    assert A.to_rgb_uint8(nan).tolist() == [[[0, 51, 102]]]
    u16 = np.full((1, 1, 3), 65535, np.uint16)
    assert A.to_rgb_uint8(u16).tolist() == [[[255, 255, 255]]]
    assert A.to_rgb_uint8(np.ones((1, 1), bool)).tolist() == [[[255, 255, 255]]]
    rgb = _img(2, 2)
    assert A.to_rgb_uint8(rgb) is rgb
    for bad in (np.zeros((0, 4, 3), np.uint8), np.zeros((2, 2, 5), np.uint8),
                np.zeros(5, np.uint8), np.zeros((1, 2, 2, 3), np.uint8)):
        with pytest.raises(A.BadImageError):
            A.to_rgb_uint8(bad)


def test_decode_image():
    img = _img(9, 11)
    ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    out = A.decode_image(png.tobytes())
    assert out.shape == (9, 11, 3) and np.array_equal(out, img)  # RGB order
    assert np.array_equal(A.decode_image(png), img)
    ok, gray_png = cv2.imencode(".png", img[:, :, 0])
    assert A.decode_image(gray_png.tobytes()).shape == (9, 11, 3)
    assert A.decode_image(b"") is None
    assert A.decode_image(b"definitely not an image") is None
    assert A.decode_image(png.tobytes()[:20]) is None  # truncated


def test_load_image():
    img = _img(4, 5)
    ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert np.array_equal(A.load_image(png.tobytes()), img)
    assert np.array_equal(A.load_image(np.bytes_(png.tobytes())), img)
    assert np.array_equal(A.load_image(img[:, :, 0]), np.repeat(img[:, :, :1], 3, 2))
    assert A.load_image(None) is None
    assert A.load_image(np.zeros((0, 0, 3), np.uint8)) is None
    assert A.load_image(b"xx") is None
