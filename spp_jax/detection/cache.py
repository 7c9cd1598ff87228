"""Per-image window features on disk: :class:`CachedImage`, :class:`FeatureCache`, :func:`cache_features`.

Fine-tuning, the SVMs, box regression and testing all read pool5 of the windows of
every image, never the images themselves. :func:`cache_features` computes it once
per image with an extractor (SPP: :class:`~spp_jax.detection.features.SPPExtractor`,
R-CNN mode: :class:`~spp_jax.detection.rcnn.RCNNExtractor`) and stores one
:class:`CachedImage` per image as an ``.npz``; pool5 is **float16 by default**
(halves disk; conv5 activations are post-ReLU values well inside float16's range,
relative error ~5e-4), ``dtype="float32"`` keeps it exact. Files are written to a
temporary name and renamed, so every file present is complete and an interrupted
:func:`cache_features` resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

from spp_jax import atomic
from spp_jax.detection.boxes import clip_boxes, flip_boxes_lr

log = logging.getLogger(__name__)

__all__ = ["CachedImage", "FeatureCache", "cache_features", "valid_windows"]


@dataclasses.dataclass
class CachedImage:
    """One image's windows, their pool5 and its ground truth.

    Attributes:
      boxes: (R, 4) float32 windows, 0-based inclusive pixels: the ``num_gt`` ground-truth
        boxes first (training caches), then the proposals.
      num_gt: how many of the first rows are ground-truth boxes.
      pool5: (R, D) float32 pooled conv5 of each window.
      scale_idx: (R,) int64 the scale each window was pooled at (index into the extractor's scales).
      gt_boxes: (G, 4) float32; gt_labels: (G,) int64 0-based classes; gt_difficult: (G,) bool.
      image_hw: (2,) int (height, width) of the image.
    """

    boxes: np.ndarray
    num_gt: int
    pool5: np.ndarray
    scale_idx: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_difficult: np.ndarray
    image_hw: np.ndarray

    @property
    def proposal_rows(self) -> np.ndarray:
        """Row indices of the proposals (every window after the ground-truth rows)."""
        return np.arange(self.num_gt, len(self.boxes))


_FIELDS = tuple(f.name for f in dataclasses.fields(CachedImage))


class FeatureCache:
    """Per-image :class:`CachedImage` files under ``root/<key hash>/``.

    Args:
      root: cache directory.
      key: dict describing extractor + proposals + split (hashed into the subdirectory;
        also written to ``key.json`` there for humans).
      dtype: "float16" (default) or "float32" for stored pool5.
    """

    def __init__(self, root: str, key: dict, dtype: str = "float16"):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        self.dtype = dtype
        blob = json.dumps({**key, "dtype": dtype}, sort_keys=True, default=str)
        self.dir = os.path.join(root, hashlib.sha1(blob.encode()).hexdigest()[:12])
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "key.json"), "w") as f:
            f.write(blob)
        self.ids: list[str] = []  # image ids in record order (filled by cache_features)

    def path(self, image_id: str, flip: bool = False) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)
        return os.path.join(self.dir, safe + ("__flip" if flip else "") + ".npz")

    def has(self, image_id: str, flip: bool = False) -> bool:
        return os.path.exists(self.path(image_id, flip))

    def save(self, image_id: str, entry: CachedImage, flip: bool = False) -> None:
        path = self.path(image_id, flip)
        data = dataclasses.asdict(entry)
        data["pool5"] = np.asarray(entry.pool5).astype(self.dtype)
        with atomic.path(path) as tmp:  # a present file is always complete
            np.savez(tmp, **data)

    def load(self, image_id: str, flip: bool = False) -> CachedImage:
        path = self.path(image_id, flip)
        try:
            with np.load(path) as z:
                e = {k: z[k] for k in _FIELDS}
        except Exception as err:  # noqa: BLE001 - say which file, and what to do
            raise ValueError(f"feature cache file {path} is unreadable ({type(err).__name__}: {err}); "
                             f"delete it and run again to recompute it") from err
        e["pool5"] = e["pool5"].astype(np.float32)
        e["num_gt"] = int(e["num_gt"])
        return CachedImage(**e)

    def valid(self, image_id: str, flip: bool = False) -> bool:
        """True when the image's file exists and opens as a complete entry (headers only)."""
        path = self.path(image_id, flip)
        if not os.path.exists(path):
            return False
        try:
            with np.load(path) as z:
                return set(_FIELDS) <= set(z.files)
        except Exception:  # noqa: BLE001 - truncated or foreign file
            return False

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return (self.load(i) for i in self.ids)


def cache_features(records, proposals: dict, extractor, cache: FeatureCache, *, include_gt: bool = True,
                   flip: bool = False, progress: bool = True) -> FeatureCache:
    """Compute and store pool5 of (GT boxes +) proposals of every record not yet cached.

    Windows per image: the ground-truth boxes first (``include_gt``; all of them,
    ``num_gt`` rows), then the proposals. Images with no proposals and no GT
    are skipped with a log message. With ``flip`` the left-right flipped image
    is cached too (windows and GT flipped). Sets ``cache.ids`` to the cached ids.
    """
    from tqdm import tqdm
    ids, skipped, done, dropped = [], 0, 0, 0
    for rec in tqdm(records, total=len(records), desc=f"pool5 {getattr(records, 'split', '')}",
                    disable=not progress):
        iid = rec["image_id"]
        h, w = rec["image"].shape[:2]
        props, bad = valid_windows(proposals.get(iid, np.zeros((0, 4))), (h, w))
        dropped += bad
        gt = rec["boxes"] if include_gt else np.zeros((0, 4), np.float32)
        boxes = np.concatenate([gt, props]).astype(np.float32)
        if len(boxes) == 0 and len(rec["boxes"]) == 0:
            log.warning("image %s has no proposals and no objects: skipped", iid)
            skipped += 1
            continue
        if len(props) == 0:
            # A test image keeps an entry without windows, so its objects count as missed.
            log.warning("image %s has no proposals: %s", iid, "only its ground-truth boxes are cached"
                        if include_gt else "no detections, its objects count as missed")
        ids.append(iid)
        for fl in ((False, True) if flip else (False,)):
            if cache.valid(iid, fl):
                continue
            if cache.has(iid, fl):
                log.warning("feature cache file %s is incomplete or unreadable: recomputing", cache.path(iid, fl))
            b = flip_boxes_lr(boxes, w) if fl else boxes
            g = flip_boxes_lr(rec["boxes"], w) if fl else rec["boxes"]
            if len(b):
                pool5, sidx = extractor.pool5(rec["image"], b, flip=fl)
            else:
                pool5, sidx = np.zeros((0, extractor.dim), np.float32), np.zeros(0, np.int64)
            cache.save(iid, CachedImage(b, len(gt), pool5, sidx, np.asarray(g, np.float32),
                                        np.asarray(rec["labels"], np.int64), np.asarray(rec["difficult"], bool),
                                        np.array([h, w])), fl)
            done += 1
    cache.ids = ids
    if dropped:
        log.warning("dropped %d proposal(s) lying outside their image or under a pixel wide", dropped)
    log.info("features: %d computed, %d already cached, %d skipped; %s", done,
             len(ids) * (2 if flip else 1) - done, skipped, extractor.describe())
    return cache


def valid_windows(boxes, image_hw) -> tuple[np.ndarray, int]:
    """Proposals clipped to the image; those empty after clipping (outside it, or with
    x2 < x1 / y2 < y1: under a pixel) dropped -> ((R', 4) float32, number dropped)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(b) == 0:
        return b, 0
    h, w = image_hw
    ok = np.isfinite(b).all(1) & (b[:, 2] >= 0) & (b[:, 3] >= 0) & (b[:, 0] <= w - 1) & (b[:, 1] <= h - 1)
    c = clip_boxes(b, (h, w))
    ok &= (c[:, 2] >= c[:, 0]) & (c[:, 3] >= c[:, 1])
    return c[ok], int((~ok).sum())
