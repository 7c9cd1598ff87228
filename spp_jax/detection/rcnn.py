"""R-CNN mode for the comparison column: every window through the whole network.

Each window is enlarged so that, after warping to 224 x 224, it has 16 pixels
of context on every side (R-CNN's "padding 16" warp: the box is scaled about
its centre by 224 / (224 - 2 * 16)), cropped and warped anisotropically to
224 x 224 (parts of the enlarged window outside the image are filled with
the mean colour, as R-CNN's ``rcnn_im_crop`` does; R-CNN also rounds the
enlarged window to whole pixels, where the affine warp here keeps it exact),
minus the mean and run through the conv layers in fixed-size batches (one
compiled program) by the serving layer (:class:`spp_jax.serve.Server`). pool5
is the model's own pooling of the 13 x 13 conv5 map, so the same fc6/fc7
(pretrained or fine-tuned), SVM and box-regression code apply to both modes.

:func:`time_windows` can time a subset of an image's windows and extrapolate
linearly to all of them (it reports that it did).
"""
from __future__ import annotations

import time

import cv2
import numpy as np

from spp_jax.serve import Server

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


def warp_windows(image: np.ndarray, boxes, fill=0.0, crop: int = CROP, padding: int = PADDING) -> np.ndarray:
    """(H, W, 3) uint8 image, (R, 4) boxes -> (R, crop, crop, 3) float32 warps, 0..255 units
    (the mean is not subtracted); outside the image: ``fill`` (a number or an RGB colour)."""
    img = image.astype(np.float32)
    border = tuple(float(v) for v in np.broadcast_to(np.asarray(fill, np.float64), (3,)))
    rects = context_boxes(boxes, crop, padding)
    out = np.empty((len(rects), crop, crop, 3), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        sx, sy = crop / max(x1 - x0, 1e-6), crop / max(y1 - y0, 1e-6)
        # Affine map of pixel centres: edge x0 -> 0, edge x1 -> crop (cv2 uses centre coordinates).
        m = np.array([[sx, 0, 0.5 * sx - 0.5 - sx * x0], [0, sy, 0.5 * sy - 0.5 - sy * y0]], np.float64)
        out[i] = cv2.warpAffine(img, m, (crop, crop), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    return out


class RCNNExtractor:
    """pool5 of warped windows (the interface of :class:`~spp_jax.detection.features.SPPExtractor`).

    Args:
      server: the network, its variables and mean (:class:`~spp_jax.serve.Server`).
      batch: windows per conv call (the last batch is padded).
    """

    kind = "rcnn"
    scales = (CROP,)

    def __init__(self, server: Server, batch: int = 32):
        self.server, self.model, self.batch = server, server.model, batch
        self.stats = {"images": 0, "conv_s": 0.0, "pool_s": 0.0, "warp_s": 0.0, "windows": 0, "unique": 0}

    @property
    def dim(self) -> int:
        return self.model.pooled_dim

    def key(self) -> dict:
        return {"kind": "rcnn", "net": self.server.fingerprint, "crop": CROP, "padding": PADDING}

    def pool5(self, image: np.ndarray, boxes, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(R, 4) windows -> pool5 (R, D) float32, scale_idx (R,) zeros."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            raise ValueError("no windows to pool (empty box list)")
        if flip:
            image = image[:, ::-1]
        sv = self.server
        outs = []
        t_warp = t_net = 0.0
        for i in range(0, len(boxes), self.batch):
            t0 = time.perf_counter()
            views = [sv.subtract_mean(w) for w in warp_windows(image, boxes[i:i + self.batch], sv.mean_colour)]
            t1 = time.perf_counter()
            outs.append(np.asarray(sv.pooled(sv.conv(sv.batch(views, size=self.batch))))[:len(views)])
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
