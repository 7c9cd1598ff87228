"""Shared tiny fixtures for the detection tests (module caches so compiled programs are reused)."""
import functools

import numpy as np

from spp_jax.data.shapes import generate
from spp_jax.detection.records import RecordSource, shapes_to_record

TINY = dict(width=0.05, fc_dim=32)
SCALE = 160


@functools.lru_cache(maxsize=None)
def tiny_model():
    from spp_jax.models import get_model, random_variables
    m = get_model("zf5", num_classes=11, **TINY)
    return m, random_variables(m, 0)


@functools.lru_cache(maxsize=None)
def tiny_extractor():
    from spp_jax.detection.features import SPPExtractor
    from spp_jax.serve import Server
    m, v = tiny_model()
    return SPPExtractor(Server(m, v, mean=128.0), scales=(SCALE,))


def small_image(index: int, split: str = "trainval", side: int = 160) -> dict:
    """A shapes detection record resized so its shorter side is ``side`` px and its aspect is 3:2 landscape
    (so every test image hits the same (160, 240) bucket)."""
    import cv2
    ex = generate("detection", split, index, 0)
    img = ex["image"]
    h, w = img.shape[:2]
    out = cv2.resize(img, (side * 3 // 2, side), interpolation=cv2.INTER_AREA)
    sx, sy = out.shape[1] / w, out.shape[0] / h
    b = ex["objects"]["bbox"].astype(np.float64)
    b = np.stack([b[:, 0] * sx, b[:, 1] * sy, (b[:, 2] + 1) * sx - 1, (b[:, 3] + 1) * sy - 1], 1)
    ex = {"image": out, "objects": {"bbox": np.round(b).clip(0, None), "label": ex["objects"]["label"],
                                   "difficult": np.zeros(len(b), bool)}}
    return shapes_to_record(ex, f"tiny-{split}-{index}")


def tiny_records(split: str, n: int) -> RecordSource:
    recs = [small_image(i, split) for i in range(n)]
    return RecordSource("tiny", split, [str(k) for k in range(10)], n, lambda i: recs[i])
