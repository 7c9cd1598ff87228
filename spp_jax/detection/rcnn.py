"""R-CNN mode for the comparison column: every window through the whole network.

Each window is enlarged so that, after warping to 224 x 224, it has 16 pixels
of context on every side (R-CNN's "padding 16" warp: the box is scaled about
its centre by 224 / (224 - 2 * 16)), cropped and warped anisotropically to
224 x 224 (parts of the enlarged window outside the image are filled with
the mean colour, i.e. zero after mean subtraction, as R-CNN's
``rcnn_im_crop`` does; R-CNN also rounds the enlarged window to whole pixels,
where the affine warp here keeps it exact), mean-subtracted and run through
the conv layers in fixed-size
batches (one compiled program). pool5 is the SPP pooling of the 13 x 13 conv5
map with the model's own levels, so the same fc6/fc7 (pretrained or
fine-tuned), SVM and box-regression code apply to both modes.

:func:`time_windows` can time a subset of an image's windows and extrapolate
linearly to all of them (it reports that it did).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.detection.features import DEFAULT_MEAN_RGB, params_fingerprint
from spp_jax.models import SPPNet

__all__ = ["context_boxes", "warp_windows", "RCNNExtractor", "time_windows"]

CROP = 224
PADDING = 16


def context_boxes(boxes, crop: int = CROP, padding: int = PADDING) -> np.ndarray:
    """Enlarge (R, 4) inclusive boxes about their centres by crop / (crop - 2 * padding).

    Returns (R, 4) float64 *pixel-edge* rectangles ``(x0, y0, x1, y1)`` (x1, y1
    exclusive) in image pixels, possibly outside the image.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    f = crop / (crop - 2.0 * padding)
    cx, cy = (b[:, 0] + b[:, 2] + 1) / 2, (b[:, 1] + b[:, 3] + 1) / 2  # centres in edge coordinates
    hw, hh = (b[:, 2] - b[:, 0] + 1) * f / 2, (b[:, 3] - b[:, 1] + 1) * f / 2
    return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1)


def warp_windows(image: np.ndarray, boxes, mean=DEFAULT_MEAN_RGB, crop: int = CROP,
                 padding: int = PADDING) -> np.ndarray:
    """(H, W, 3) uint8 image, (R, 4) boxes -> (R, crop, crop, 3) float32 mean-subtracted warps."""
    img = image.astype(np.float32) - np.asarray(mean, np.float32)
    rects = context_boxes(boxes, crop, padding)
    out = np.empty((len(rects), crop, crop, 3), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        sx, sy = crop / max(x1 - x0, 1e-6), crop / max(y1 - y0, 1e-6)
        # Affine map of pixel centres: edge x0 -> 0, edge x1 -> crop (cv2 uses centre coordinates).
        m = np.array([[sx, 0, 0.5 * sx - 0.5 - sx * x0], [0, sy, 0.5 * sy - 0.5 - sy * y0]], np.float64)
        out[i] = cv2.warpAffine(img, m, (crop, crop), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


@dataclasses.dataclass
class RCNNExtractor:
    """pool5 of warped windows (same interface as :class:`~spp_jax.detection.features.SPPExtractor`).

    Attributes:
      model, variables: an SPPNet and its variables; mean: (3,) RGB mean;
      batch: windows per conv call (the last batch is zero-padded).
    """

    model: SPPNet
    variables: Any
    mean: Any = None
    batch: int = 32
    scales: tuple = (CROP,)

    def __post_init__(self):
        self.mean = DEFAULT_MEAN_RGB if self.mean is None else np.asarray(self.mean, np.float32)
        model = self.model

        def run(v, x):
            fmap = model.apply(v, x, method=SPPNet.conv_map)
            return model.apply(v, fmap, method=SPPNet.pool_map)

        self._run = jax.jit(run)
        self.conv_shapes = {(self.batch, CROP, CROP, 3)}
        self.pool_shapes: set = set()
        self.stats = {"images": 0, "conv_s": 0.0, "pool_s": 0.0, "warp_s": 0.0, "windows": 0, "unique": 0}

    @property
    def kind(self) -> str:
        return "rcnn"

    def key(self) -> dict:
        return {"kind": "rcnn", "arch": self.model.arch, "width": self.model.width, "crop": CROP,
                "padding": PADDING, "levels": list(self.model.levels),
                "mean": [round(float(m), 3) for m in self.mean],
                "params": params_fingerprint(self.variables["params"]["backbone"])}

    def pool5(self, image: np.ndarray, boxes, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(R, 4) windows -> pool5 (R, D) float32, scale_idx (R,) zeros."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            raise ValueError("no windows to pool (empty box list)")
        if flip:
            image = image[:, ::-1]
        outs = []
        t_warp = t_net = 0.0
        for i in range(0, len(boxes), self.batch):
            t0 = time.perf_counter()
            x = warp_windows(image, boxes[i:i + self.batch], self.mean)
            m = len(x)
            if m < self.batch:
                x = np.concatenate([x, np.zeros((self.batch - m,) + x.shape[1:], np.float32)])
            t1 = time.perf_counter()
            outs.append(np.asarray(self._run(self.variables, jnp.asarray(x)))[:m])
            t_warp += t1 - t0
            t_net += time.perf_counter() - t1
        st = self.stats
        st["images"] += 1
        st["warp_s"] += t_warp
        st["conv_s"] += t_net  # conv + pooling of the warped windows
        st["windows"] += len(boxes)
        st["unique"] += len(boxes)
        return np.concatenate(outs), np.zeros(len(boxes), np.int64)

    def describe(self) -> str:
        return f"R-CNN {self.model.arch} width {self.model.width}: 1 program (batch {self.batch} x {CROP}^2)"


def time_windows(extractor, image: np.ndarray, boxes, max_windows: int | None = None) -> dict:
    """Wall time of ``extractor.pool5`` on one image's windows.

    With ``max_windows`` < R only the first ``max_windows`` windows are run
    (after one untimed warm-up call) and the time is **extrapolated linearly**
    to all R windows; the result says so.

    Returns:
      {"seconds": time for all R windows (measured or extrapolated),
       "measured_windows": n, "windows": R, "extrapolated": bool}
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes) if max_windows is None else min(len(boxes), max_windows)
    extractor.pool5(image, boxes[:min(n, 1)])  # warm-up: compile outside the timing
    t0 = time.perf_counter()
    extractor.pool5(image, boxes[:n])
    dt = time.perf_counter() - t0
    return {"seconds": dt * len(boxes) / n, "measured_windows": n, "windows": len(boxes),
            "extrapolated": n < len(boxes)}
