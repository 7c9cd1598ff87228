"""Testing views of the paper (SPP_FACTS section 4) as pure geometry.

* 1 crop: the centre 224 crop of the image resized to shorter side 256.
* 1 full: the whole image, shorter side 256.
* 10-view: centre + 4 corner 224 crops of the 256 image, and their flips.
* multi-view on feature maps: at each scale s (shorter side), the 224 windows
  at the centre, 4 corners and 4 edge midpoints of the image, pooled from the
  conv maps of the image and of its flip (18 views; only 6 distinct at s=224,
  where the image is 224 pixels tall or wide), plus 2 full views.

Boxes are (x1, y1, x2, y2), 0-based inclusive pixels of the resized image. The
full and multi-view protocols run on bucket-padded images through
:class:`spp_jax.serve.Server`, whose masking makes them exact.
"""
from __future__ import annotations

import numpy as np

MULTIVIEW_SCALES: tuple[int, ...] = (224, 256, 300, 360, 448, 560)


def nine_windows(h: int, w: int, size: int = 224) -> np.ndarray:
    """Distinct size x size windows at the centre, 4 corners and 4 edge midpoints.

    (h, w): resized image size, both >= size.  Returns (K, 4) int32 boxes, K = 9
    when both sides exceed ``size``, fewer when positions coincide (K = 3 for a
    224 x W image, 1 for 224 x 224).  Order: row by row (top, middle, bottom),
    left to right, duplicates dropped.
    """
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the {size} window")
    xs = sorted({0, (w - size) // 2, w - size})
    ys = sorted({0, (h - size) // 2, h - size})
    return np.array([[x, y, x + size - 1, y + size - 1] for y in ys for x in xs], np.int32)
