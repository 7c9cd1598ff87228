"""Detection dataset records: one VOC-like dict per image.

A record is::

    {"image_id": str,                      unique within a dataset
     "image": uint8 (H, W, 3) RGB,
     "boxes": float32 (N, 4) (x1, y1, x2, y2), 0-based inclusive pixels,
     "labels": int64 (N,) 0-based over the K object classes (no background),
     "difficult": bool (N,)}

N may be 0 (an image without objects): such an image is still a source of
negatives, never of positives; :func:`log_empty` says so once per image.

Sources (random access, images decoded on demand so a whole split never has
to sit in memory):

* the embedded synthetic shapes ("detection" variant, 10 classes), rendered
  on the fly by :func:`spp_jax.data.shapes.generate`;
* TFDS ``voc/2007`` read with ``tfds.data_source`` (array_record files, no
  TensorFlow needed to read). TFDS stores boxes normalised as
  ``[ymin, xmin, ymax, xmax]``; :func:`tfds_bbox_to_pixels` is the one place
  where they become our pixel boxes.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from spp_jax.detection.boxes import clip_boxes

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")

DATASETS = ("shapes", "voc2007")

__all__ = ["DATASETS", "VOC_CLASSES", "RecordSource", "tfds_bbox_to_pixels", "tfds_voc_to_record",
           "shapes_to_record", "load_records", "class_names", "ground_truth", "has_objects",
           "log_empty"]


def tfds_bbox_to_pixels(bbox, height: int, width: int) -> np.ndarray:
    """TFDS ``voc`` boxes -> our 0-based inclusive pixel boxes.

    TFDS's VOC builder (4.9.x) stores each box as
    ``[ymin / H, xmin / W, ymax / H, xmax / W]`` with the *1-based inclusive*
    pixel values of the VOC XML files. So ``round(v * size)`` recovers the VOC
    integer (the rounding only undoes float32 error), and subtracting 1 gives
    our 0-based inclusive corners (as ``voc_to_internal``). Results are clipped
    to the image.

    Args:
      bbox: (N, 4) float in [0, 1], ``(ymin, xmin, ymax, xmax)``.
      height, width: image size in pixels.
    Returns:
      (N, 4) float32 ``(x1, y1, x2, y2)`` with x in [0, W-1], y in [0, H-1].
    """
    b = np.asarray(bbox, np.float64).reshape(-1, 4)
    # Half away from zero: values are positive, so floor(x + 0.5).
    ymin, xmin, ymax, xmax = (np.floor(b[:, i] * s + 0.5) for i, s in
                              enumerate((height, width, height, width)))
    out = np.stack([xmin, ymin, xmax, ymax], axis=1) - 1.0
    return clip_boxes(out, (height, width)).astype(np.float32)


def _objects(boxes, labels, difficult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    difficult = np.asarray(difficult, bool).reshape(-1)
    n = min(len(boxes), len(labels), len(difficult))
    if not len(boxes) == len(labels) == len(difficult):
        log.warning("object fields have different lengths (%d boxes, %d labels, %d difficult); "
                    "keeping the first %d", len(boxes), len(labels), len(difficult), n)
    return boxes[:n], labels[:n], difficult[:n]


def tfds_voc_to_record(example: dict, image_id: str) -> dict:
    """A TFDS ``voc`` example (NumPy dict from ``tfds.data_source``) -> a record."""
    img = np.asarray(example["image"], np.uint8)
    h, w = img.shape[:2]
    obj = example.get("objects", {})
    bbox = np.asarray(obj.get("bbox", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    boxes, labels, diff = _objects(tfds_bbox_to_pixels(bbox, h, w),
                                   obj.get("label", np.zeros(0)), obj.get("is_difficult", np.zeros(0)))
    fname = example.get("image/filename")
    if isinstance(fname, bytes):
        fname = fname.decode()
    return {"image_id": str(fname or image_id), "image": img, "boxes": boxes, "labels": labels,
            "difficult": diff}


def shapes_to_record(example: dict, image_id: str) -> dict:
    """An embedded-shapes "detection" sample -> a record (boxes are already 0-based inclusive)."""
    o = example["objects"]
    boxes, labels, diff = _objects(o["bbox"], o["label"], o["difficult"])
    return {"image_id": image_id, "image": np.asarray(example["image"], np.uint8), "boxes": boxes,
            "labels": labels, "difficult": diff}


class RecordSource:
    """Random-access detection records: ``len(src)``, ``src[i]`` -> record dict.

    Attributes:
      name: dataset name (part of cache keys), split: split name,
      classes: the K class names.
    """

    def __init__(self, name: str, split: str, classes: Sequence[str], n: int,
                 get: Callable[[int], dict]):
        self.name, self.split, self.classes = name, split, tuple(classes)
        self._n, self._get = int(n), get

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self._n:
            raise IndexError(f"record {i} out of range for {self._n}")
        return self._get(int(i))

    def __iter__(self):
        return (self[i] for i in range(self._n))

    def subset(self, indices: Sequence[int], split: str | None = None) -> "RecordSource":
        """The records at ``indices`` (a new source; its split name defaults to ``split[idx]``)."""
        idx = [int(i) for i in indices]
        return RecordSource(self.name, split or f"{self.split}[{len(idx)}]", self.classes, len(idx),
                            lambda j: self._get(idx[j]))

    def __repr__(self) -> str:
        return f"RecordSource({self.name!r}, {self.split!r}, n={self._n})"


def _shapes_source(split: str, size: int, seed: int) -> RecordSource:
    from spp_jax.data.shapes import CLASS_NAMES, generate
    return RecordSource("shapes", split, CLASS_NAMES, size,
                        lambda i: shapes_to_record(generate("detection", split, i, seed),
                                                   f"shapes-{split}-{seed}-{i:06d}"))


def _voc_source(split: str, data_dir: str | None, size: int | None) -> RecordSource:
    import tensorflow_datasets as tfds
    # VOC 2007 "trainval" is TFDS's train + validation.
    parts = ["train", "validation"] if split == "trainval" else [split]
    try:
        srcs = [tfds.data_source("voc/2007", split=p, data_dir=data_dir) for p in parts]
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; say what to do
        raise RuntimeError(
            f"could not open TFDS voc/2007 split {split!r} in data_dir={data_dir!r} as an "
            f"array_record data source ({type(e).__name__}: {e}). Prepare it once with "
            f"tfds.builder('voc/2007', data_dir=...).download_and_prepare(file_format='array_record') "
            f"or pass --dataset shapes.") from e
    offsets = np.cumsum([0] + [len(s) for s in srcs])
    n = int(offsets[-1]) if size is None else min(int(size), int(offsets[-1]))

    def get(i):
        k = int(np.searchsorted(offsets, i, side="right") - 1)
        return tfds_voc_to_record(srcs[k][int(i - offsets[k])], f"voc2007-{split}-{i:06d}")

    return RecordSource("voc2007", split, VOC_CLASSES, n, get)


def load_records(dataset: str, split: str, *, size: int | None = None, seed: int = 0,
                 data_dir: str | None = None) -> RecordSource:
    """Records of ``dataset`` ("shapes" | "voc2007") and ``split`` ("trainval" | "test").

    ``size`` is required for shapes (its splits are unbounded index spaces) and
    caps VOC. ``data_dir`` is the TFDS data directory for VOC.
    """
    if dataset == "shapes":
        if size is None:
            raise ValueError("size is required for the shapes dataset")
        return _shapes_source(split, size, seed)
    if dataset == "voc2007":
        return _voc_source(split, data_dir, size)
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def class_names(dataset: str) -> tuple[str, ...]:
    if dataset == "shapes":
        from spp_jax.data.shapes import CLASS_NAMES
        return CLASS_NAMES
    if dataset == "voc2007":
        return VOC_CLASSES
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def has_objects(rec: dict) -> bool:
    return len(rec["boxes"]) > 0


_logged_empty: set = set()


def log_empty(rec: dict, role: str) -> None:
    """Log (once per image and role) that an image without objects is used only as ``role``."""
    key = (rec["image_id"], role)
    if key not in _logged_empty:
        _logged_empty.add(key)
        log.info("image %s has no objects: %s", rec["image_id"], role)


def ground_truth(records) -> dict[str, dict[str, np.ndarray]]:
    """image_id -> {"boxes", "labels", "difficult"} for :func:`spp_jax.detection.mean_ap`."""
    return {r["image_id"]: {"boxes": r["boxes"], "labels": r["labels"], "difficult": r["difficult"]}
            for r in records}
