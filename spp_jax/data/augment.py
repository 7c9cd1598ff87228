"""Image augmentation and test-view helpers for SPP-net classification.

Implements the recipe of SPP_FACTS.md section 4 (He et al. 2014, following
Krizhevsky et al. 2012):

* resize the shorter side to 256 (``resize_shorter``);
* take a 224 crop from the centre or one of the four corners of the whole
  resized image (``five_crop_boxes`` / ``crop``), random horizontal flip
  (``random_hflip``);
* AlexNet "PCA colour altering" (``pca_colour_offset`` / ``apply_pca_colour``
  with ``estimate_pca_colour`` or the ImageNet constants);
* subtract the mean image warped to the input size (``compute_mean_image`` /
  ``subtract_mean``), or a per-channel mean;
* multi-size training: the 180 input is the 224 crop resized to 180
  (``resize_to``);
* the standard 10-view test (``ten_crops``).

Conventions used throughout this module:

* Images are numpy arrays in HWC layout, **RGB** channel order. "uint8
  image" means dtype uint8 with values 0..255; float images produced here
  are float32 in the same 0..255 units (no rescaling to [0, 1]).
* Pixel coordinates are 0-based; a box is ``(y0, x0, y1, x1)`` in pixels,
  half-open (``img[y0:y1, x0:x1]``).
* Functions are pure: they never modify their input in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np

__all__ = [
    "CROP_POSITIONS",
    "IMAGENET_PCA_EIGVAL",
    "IMAGENET_PCA_EIGVEC",
    "IMAGENET_MEAN_RGB",
    "BadImageError",
    "resize_shorter",
    "resize_to",
    "gray",
    "crop_box",
    "five_crop_boxes",
    "crop",
    "ten_crops",
    "hflip",
    "random_hflip",
    "pca_colour_offset",
    "apply_pca_colour",
    "random_pca_colour",
    "estimate_pca_colour",
    "compute_mean_image",
    "subtract_mean",
    "to_rgb_uint8",
    "decode_image",
    "load_image",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: Order of the five crops everywhere in this project (training draws an index
#: into this tuple; ``five_crop_boxes`` and ``ten_crops`` follow it).
CROP_POSITIONS: tuple[str, ...] = (
    "center",
    "top_left",
    "top_right",
    "bottom_left",
    "bottom_right",
)

#: The widely used ImageNet RGB PCA constants (fb.resnet.torch / Caffe
#: re-implementations of AlexNet's lighting noise), for pixels scaled to
#: [0, 1]. ``IMAGENET_PCA_EIGVEC[:, i]`` (a column) is the eigenvector of
#: ``IMAGENET_PCA_EIGVAL[i]``; rows are the R, G, B channels. They are
#: applied with the same formula as estimated values (see
#: ``pca_colour_offset``). Shapes (3,) and (3, 3), float32.
IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
IMAGENET_PCA_EIGVEC = np.array(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ],
    dtype=np.float32,
)

#: Widely used ImageNet per-channel RGB mean, in 0..255 units, shape (3,).
IMAGENET_MEAN_RGB = np.array([123.675, 116.28, 103.53], dtype=np.float32)


class BadImageError(ValueError):
    """Raised for data that cannot be turned into an RGB image (empty, wrong
    rank, undecodable). The pipeline catches it, skips and counts the sample."""


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    # Positive sizes only: C/MATLAB-style round (half away from zero), not
    # Python's round-half-to-even (SPP_FACTS.md section 7).
    return int(np.floor(x + 0.5))


def _interp(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    # Area averaging avoids aliasing when shrinking; bilinear when enlarging
    # (INTER_AREA degenerates to nearest-like behaviour when upsampling).
    shrinking = dst_hw[0] * dst_hw[1] < src_hw[0] * src_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def _resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img
    out = cv2.resize(
        img, (out_w, out_h), interpolation=_interp((h, w), (out_h, out_w))
    )
    if img.ndim == 3 and out.ndim == 2:  # cv2 drops a singleton channel axis
        out = out[:, :, None]
    return out


_THIRDS = np.full((1, 3), 1 / 3, np.float32)


def gray(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float image -> (H, W, 1) float32 mean of its three channels.

    The channel mean of ``spp_jax.models.input_norm.gray_level``, taken on the host (one
    OpenCV pass, 0.1-0.2 ms for a 224 x 224 crop against 0.6 for a NumPy mean over a
    flipped crop view).
    """
    out = cv2.transform(np.ascontiguousarray(img).astype(np.float32, copy=False), _THIRDS)
    return out.reshape(img.shape[0], img.shape[1], 1)


def resize_shorter(img: np.ndarray, side: int) -> np.ndarray:
    """Resize so that the shorter side equals ``side``, keeping the aspect.

    Args:
      img: (H, W, C) uint8 or float32 image, H, W >= 1.
      side: target length of the shorter side, in pixels.

    Returns:
      (H', W', C) array of the same dtype with ``min(H', W') == side`` and the
      longer side ``round(long * side / short)`` (rounded half up, at least
      1). Area interpolation when shrinking, bilinear when enlarging. The
      input object itself is returned when no resize is needed.
    """
    h, w = img.shape[:2]
    if h <= 0 or w <= 0:
        raise BadImageError(f"empty image of shape {img.shape}")
    if h <= w:
        out_h, out_w = side, max(1, _round_half_up(w * side / h))
    else:
        out_h, out_w = max(1, _round_half_up(h * side / w)), side
    return _resize(img, out_h, out_w)


def resize_to(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Warp an image to a fixed size, ignoring the aspect ratio.

    Used for the multi-size rule (the 180 input is the 224 crop resized to
    180) and for warping the mean image.

    Args:
      img: (H, W, C) uint8 or float32 image.
      size: ``S`` for an (S, S) output, or ``(out_h, out_w)`` in pixels.

    Returns:
      (out_h, out_w, C) array of the same dtype (area interpolation when
      shrinking, bilinear when enlarging; the input itself if already sized).
    """
    out_h, out_w = (size, size) if np.isscalar(size) else size
    return _resize(img, int(out_h), int(out_w))


def crop_box(h: int, w: int, size: int, position: str) -> tuple[int, int, int, int]:
    """The ``size`` x ``size`` box at a named position of an (h, w) image.

    Args:
      h, w: image height and width in pixels; both must be >= ``size``.
      size: crop side in pixels.
      position: one of ``CROP_POSITIONS``. The centre box starts at
        ``((h - size) // 2, (w - size) // 2)`` (floor when the margin is odd);
        corner boxes touch the image corners.

    Returns:
      ``(y0, x0, y1, x1)``, half-open pixel box.
    """
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop {size}")
    if position == "center":
        y0, x0 = (h - size) // 2, (w - size) // 2
    elif position == "top_left":
        y0, x0 = 0, 0
    elif position == "top_right":
        y0, x0 = 0, w - size
    elif position == "bottom_left":
        y0, x0 = h - size, 0
    elif position == "bottom_right":
        y0, x0 = h - size, w - size
    else:
        raise ValueError(f"unknown crop position {position!r}")
    return (y0, x0, y0 + size, x0 + size)


def five_crop_boxes(h: int, w: int, size: int) -> list[tuple[int, int, int, int]]:
    """The five ``size`` x ``size`` boxes of an (h, w) image, in
    ``CROP_POSITIONS`` order: centre, top-left, top-right, bottom-left,
    bottom-right. Each box is ``(y0, x0, y1, x1)`` in pixels, half-open."""
    return [crop_box(h, w, size, p) for p in CROP_POSITIONS]


def crop(img: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """Return ``img[y0:y1, x0:x1]`` (a view) for ``box = (y0, x0, y1, x1)``.

    Args:
      img: (H, W, C) array of any dtype.
      box: half-open pixel box lying inside the image.

    Returns:
      (y1 - y0, x1 - x0, C) view of ``img``.
    """
    y0, x0, y1, x1 = (int(v) for v in box)
    h, w = img.shape[:2]
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"box {tuple(box)} outside image {h}x{w}")
    return img[y0:y1, x0:x1]


def ten_crops(img: np.ndarray, size: int = 224) -> np.ndarray:
    """The standard 10-view test crops of an (already resized) image.

    Args:
      img: (H, W, C) array, H, W >= ``size`` (usually shorter side 256).
      size: crop side in pixels.

    Returns:
      (10, size, size, C) array of ``img``'s dtype: indices 0..4 are the five
      crops in ``CROP_POSITIONS`` order (centre, top-left, top-right,
      bottom-left, bottom-right); index ``5 + k`` is crop ``k`` flipped
      horizontally.
    """
    h, w = img.shape[:2]
    crops = np.stack([crop(img, b) for b in five_crop_boxes(h, w, size)])
    return np.concatenate([crops, crops[:, :, ::-1]], axis=0)


def hflip(img: np.ndarray) -> np.ndarray:
    """Horizontal (left-right) flip of an (H, W, C) image; returns a
    contiguous copy of the same dtype."""
    return np.ascontiguousarray(img[:, ::-1])


def random_hflip(
    img: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, bool]:
    """Flip horizontally with probability ``p``.

    Args:
      img: (H, W, C) array.
      rng: source of the single uniform draw.
      p: flip probability.

    Returns:
      ``(image, flipped)``: the (possibly flipped) image, same shape/dtype.
    """
    flipped = bool(rng.random() < p)
    return (hflip(img) if flipped else img), flipped


# ---------------------------------------------------------------------------
# PCA colour altering (Krizhevsky et al. 2012, section 4.1)
# ---------------------------------------------------------------------------


def pca_colour_offset(
    alpha: np.ndarray,
    eigval: np.ndarray = IMAGENET_PCA_EIGVAL,
    eigvec: np.ndarray = IMAGENET_PCA_EIGVEC,
) -> np.ndarray:
    """The RGB offset ``sum_i alpha_i * lambda_i * p_i``, in 0..255 units.

    Args:
      alpha: (3,) coefficients (drawn from N(0, 0.1) for augmentation).
      eigval: (3,) eigenvalues ``lambda_i`` of the RGB covariance of pixels
        scaled to [0, 1].
      eigvec: (3, 3) matrix whose column ``i`` is the eigenvector ``p_i``.

    Returns:
      (3,) float32 offset in 0..255 units (the [0, 1]-scale offset times 255),
      to be added to every pixel.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    offset = np.asarray(eigvec, np.float64) @ (alpha * np.asarray(eigval, np.float64))
    return (255.0 * offset).astype(np.float32)


def apply_pca_colour(
    img: np.ndarray,
    alpha: np.ndarray,
    eigval: np.ndarray = IMAGENET_PCA_EIGVAL,
    eigvec: np.ndarray = IMAGENET_PCA_EIGVEC,
) -> np.ndarray:
    """Add the PCA colour offset for coefficients ``alpha`` to every pixel.

    Args:
      img: (H, W, 3) uint8 or float image in 0..255 units, RGB.
      alpha, eigval, eigvec: see ``pca_colour_offset``.

    Returns:
      (H, W, 3) float32 image, not clipped (as in AlexNet, the offset is
      applied to the network input, which is later mean-subtracted anyway).
    """
    return img.astype(np.float32) + pca_colour_offset(alpha, eigval, eigvec)


def random_pca_colour(
    img: np.ndarray,
    rng: np.random.Generator,
    std: float = 0.1,
    eigval: np.ndarray = IMAGENET_PCA_EIGVAL,
    eigvec: np.ndarray = IMAGENET_PCA_EIGVEC,
) -> np.ndarray:
    """``apply_pca_colour`` with ``alpha ~ N(0, std)`` (3 draws from ``rng``).

    Returns an (H, W, 3) float32 image in 0..255 units.
    """
    alpha = rng.normal(0.0, std, size=3)
    return apply_pca_colour(img, alpha, eigval, eigvec)


def _sample_images(
    source: Any,
    num_samples: int | None,
    seed: int,
    image_key: str,
) -> Iterator[np.ndarray]:
    """Yield RGB uint8 images of a random subset (without replacement) of a
    random-access source (items: dicts with ``image_key``, or bare images),
    skipping undecodable ones."""
    n = len(source)
    if num_samples is None or num_samples >= n:
        indices = np.arange(n)
    else:
        indices = np.sort(
            np.random.default_rng(seed).choice(n, size=num_samples, replace=False)
        )
    for i in indices:
        item = source[int(i)]
        raw = item[image_key] if isinstance(item, dict) else item
        img = load_image(raw)
        if img is not None:
            yield img


def estimate_pca_colour(
    source: Any,
    num_samples: int | None = 1000,
    pixels_per_image: int | None = 1000,
    seed: int = 0,
    image_key: str = "image",
) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the 3x3 RGB covariance of training pixels.

    Args:
      source: random-access source (``len`` and ``[i]``) whose items are dicts
        with an ``image_key`` entry, or bare images (any format accepted by
        ``load_image``), e.g. a list of uint8 arrays.
      num_samples: number of images drawn without replacement (None = all).
      pixels_per_image: pixels drawn uniformly with replacement from each
        image (None = all pixels), so large images do not dominate.
      seed: seed for both samplings.
      image_key: key of the image in dict items.

    Returns:
      ``(eigval, eigvec)``: (3,) float32 eigenvalues in descending order of
      the covariance of pixels scaled to [0, 1], and (3, 3) float32 whose
      column ``i`` is the unit eigenvector of ``eigval[i]`` (sign chosen so
      that its largest-magnitude entry is negative, like the ImageNet
      constants). Feed them to ``pca_colour_offset``.
    """
    rng = np.random.default_rng(seed + 1)
    total = np.zeros(3, np.float64)
    outer = np.zeros((3, 3), np.float64)
    count = 0
    for img in _sample_images(source, num_samples, seed, image_key):
        px = img.reshape(-1, 3)
        if pixels_per_image is not None:
            px = px[rng.integers(0, px.shape[0], size=pixels_per_image)]
        px = px.astype(np.float64) / 255.0
        total += px.sum(0)
        outer += px.T @ px
        count += px.shape[0]
    if count < 2:
        raise ValueError("need at least 2 pixels to estimate a covariance")
    mean = total / count
    cov = (outer - count * np.outer(mean, mean)) / (count - 1)
    w, v = np.linalg.eigh(cov)  # ascending
    order = np.argsort(w)[::-1]
    w, v = np.clip(w[order], 0.0, None), v[:, order]
    for i in range(3):
        if v[np.argmax(np.abs(v[:, i])), i] > 0:
            v[:, i] = -v[:, i]
    return w.astype(np.float32), v.astype(np.float32)


# ---------------------------------------------------------------------------
# Mean subtraction
# ---------------------------------------------------------------------------


def compute_mean_image(
    source: Any,
    size: int = 256,
    num_samples: int | None = 10000,
    seed: int = 0,
    image_key: str = "image",
) -> np.ndarray:
    """Estimate the mean image: every sampled image warped to size x size.

    Each image is warped (aspect ratio ignored, as in Caffe's 256x256 mean
    file) with ``resize_to`` and the pixel-wise mean is accumulated in
    float64.

    Args:
      source: random-access source, items as in ``estimate_pca_colour``.
      size: side of the square mean image, pixels.
      num_samples: images drawn without replacement (None = all).
      seed: sampling seed.
      image_key: key of the image in dict items.

    Returns:
      (size, size, 3) float32 mean image, RGB, 0..255 units.
    """
    acc = np.zeros((size, size, 3), np.float64)
    count = 0
    for img in _sample_images(source, num_samples, seed, image_key):
        acc += resize_to(img, size)
        count += 1
    if count == 0:
        raise ValueError("no decodable image to compute a mean from")
    return (acc / count).astype(np.float32)


def subtract_mean(
    img: np.ndarray, mean: np.ndarray | None
) -> np.ndarray:
    """Subtract a mean image (warped to the input size) or a channel mean.

    Args:
      img: (H, W, 3) uint8 or float image in 0..255 units.
      mean: None (no subtraction); (3,) per-channel mean; or (Hm, Wm, 3)
        mean image, warped with ``resize_to`` to (H, W) when sizes differ.
        For repeated use at one size, pre-warp once with ``resize_to``.

    Returns:
      (H, W, 3) float32 image, 0..255 units minus the mean.
    """
    out = img.astype(np.float32)
    if mean is None:
        return out
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim == 1:
        return out - mean
    return out - resize_to(mean, img.shape[:2])


# ---------------------------------------------------------------------------
# Decoding and conversion
# ---------------------------------------------------------------------------


def to_rgb_uint8(
    x: np.ndarray, four_channel: str = "rgba", float_range: str = "auto"
) -> np.ndarray:
    """Convert an image of any common layout/dtype to (H, W, 3) uint8 RGB.

    Args:
      x: (H, W), (H, W, 1) grayscale; (H, W, 2) grayscale + alpha; (H, W, 3)
        RGB; (H, W, 4) RGBA or CMYK-like. dtypes: uint8; bool; other ints
        (uint16 scaled by 1/257, others clipped to 0..255); floats (NaN/inf
        replaced, see ``float_range``).
      four_channel: "rgba" (alpha dropped, no compositing) or "cmyk"
        (``R = (255 - C) * (255 - K) / 255`` etc., 0..255 ink amounts).
      float_range: "auto" (values in [0, 1] if the maximum is <= 1, else
        0..255), "unit" ([0, 1]) or "byte" (0..255).

    Returns:
      (H, W, 3) uint8 C-contiguous array (the input itself if it already is).

    Raises:
      BadImageError: empty image, wrong rank or channel count.
    """
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 2, 3, 4):
        raise BadImageError(f"cannot interpret shape {x.shape} as an image")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise BadImageError(f"empty image of shape {x.shape}")

    if x.dtype == np.uint8:
        pass
    elif x.dtype == np.bool_:
        x = x.astype(np.uint8) * 255
    elif np.issubdtype(x.dtype, np.floating):
        x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if float_range == "auto":
            unit = float(x.max()) <= 1.0
        elif float_range in ("unit", "byte"):
            unit = float_range == "unit"
        else:
            raise ValueError(f"bad float_range {float_range!r}")
        if unit:
            x = x * 255.0
        x = np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)
    elif x.dtype == np.uint16:
        x = ((x.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.integer):
        x = np.clip(x, 0, 255).astype(np.uint8)
    else:
        raise BadImageError(f"unsupported dtype {x.dtype}")

    c = x.shape[2]
    if c in (1, 2):  # grayscale (+ alpha): replicate the luminance
        x = np.repeat(x[:, :, :1], 3, axis=2)
    elif c == 4:
        if four_channel == "rgba":
            x = x[:, :, :3]
        elif four_channel == "cmyk":
            f = x.astype(np.float32)
            k = 255.0 - f[:, :, 3:4]
            rgb = (255.0 - f[:, :, :3]) * k / 255.0
            x = np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8)
        else:
            raise ValueError(f"bad four_channel {four_channel!r}")
    return np.ascontiguousarray(x)


def decode_image(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray | None:
    """Decode encoded image bytes (JPEG, PNG, ...) with OpenCV.

    Args:
      data: the encoded file content (bytes-like, or a 1-D uint8 array).

    Returns:
      (H, W, 3) uint8 RGB image (grayscale/CMYK/alpha files are converted by
      OpenCV; EXIF orientation applied), or None if the data is empty or
      cannot be decoded. Never raises for bad data; callers count the Nones.
    """
    try:
        buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
            else np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if buf.size == 0:
            return None
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    except (cv2.error, ValueError, TypeError):
        return None
    if img is None or img.size == 0 or img.ndim != 3:
        return None
    return img


def load_image(raw: Any, **to_rgb_kwargs: Any) -> np.ndarray | None:
    """Turn a stored image into (H, W, 3) uint8 RGB, or None if unusable.

    Args:
      raw: encoded bytes (``bytes``, ``np.bytes_``, 1-D uint8 array, 0-d
        object array) or a decoded (H, W[, C]) array.
      **to_rgb_kwargs: forwarded to ``to_rgb_uint8``.

    Returns:
      (H, W, 3) uint8 image, or None for empty/undecodable/unconvertible data.
    """
    if isinstance(raw, np.ndarray) and raw.dtype == object and raw.size == 1:
        raw = raw.item()
    if isinstance(raw, (bytes, bytearray, memoryview, np.bytes_)):
        return decode_image(bytes(raw))
    if raw is None:
        return None
    arr = np.asarray(raw)
    if arr.ndim == 1 and arr.dtype == np.uint8:
        return decode_image(arr)
    try:
        return to_rgb_uint8(arr, **to_rgb_kwargs)
    except BadImageError:
        return None
