"""Object proposals: selective search "fast" mode (OpenCV), cached per split.

``selective_search(image)`` runs OpenCV's
``cv2.ximgproc.segmentation.createSelectiveSearchSegmentation`` in
``switchToSelectiveSearchFast`` mode (the setting SPP-net and R-CNN used) on
the image downscaled so its longer side is at most ``max_side`` (speed; the
boxes are scaled back), converts OpenCV's ``(x, y, w, h)`` to our 0-based
inclusive ``(x1, y1, x2, y2)``, clips to the image, drops boxes with a side
shorter than ``min_side`` pixels, removes duplicates and keeps the first
``max_boxes`` (OpenCV returns them in its own ranking order).

``compute_proposals(records, cache_dir)`` runs that over a split with a pool
of *spawned* worker processes (JAX is not fork-safe) and a tqdm bar, and
caches the result in one ``.npz`` (image_id -> (R, 4) float32) whose name
carries a hash of (dataset, split, settings). It is written to a temporary
file, renamed, and only then is a ``.done`` marker written; a cache without
its marker (a crash mid-write) is rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
import zipfile
import zlib
from typing import Iterable, Mapping

import cv2
import numpy as np

from spp_jax import atomic
from spp_jax.detection.boxes import clip_boxes
from spp_jax.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["ProposalSettings", "selective_search", "clean_boxes", "compute_proposals",
           "load_proposal_file", "save_proposal_file", "cache_path", "file_sha1"]


@dataclasses.dataclass(frozen=True)
class ProposalSettings:
    """Selective search settings (all part of the cache key).

    Attributes:
      max_side: the image is downscaled so its longer side is <= this (pixels).
      min_side: boxes narrower or shorter than this (original pixels) are dropped.
      max_boxes: at most this many boxes per image (~2000 in the paper).
      threads: OpenCV threads per worker (1: parallelism comes from processes).
    """

    max_side: int = 500
    min_side: int = 8
    max_boxes: int = 2000
    threads: int = 1

    def key(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("threads")
        return d


def clean_boxes(boxes, image_hw, min_side: int = 8, max_boxes: int = 2000) -> np.ndarray:
    """Clip to the image, drop tiny boxes, deduplicate (keeping first occurrences), cap.

    Args:
      boxes: (R, 4) (x1, y1, x2, y2) 0-based inclusive pixels (float or int).
      image_hw: (H, W).
    Returns:
      (R', 4) float32, R' <= max_boxes, in the input's order.
    """
    h, w = image_hw
    b = clip_boxes(np.round(np.asarray(boxes, np.float64).reshape(-1, 4)), (h, w))
    ok = (b[:, 2] - b[:, 0] + 1 >= min_side) & (b[:, 3] - b[:, 1] + 1 >= min_side)
    b = b[ok]
    _, first = np.unique(b, axis=0, return_index=True)
    b = b[np.sort(first)]
    return b[:max_boxes].astype(np.float32)


def _seed_c_rand(seed: int) -> None:
    """Seed C's ``rand()``: OpenCV's selective search ranks boxes with ``rand()`` jitter (as the
    original method), so without this the order, and which boxes survive the cap, varies per run."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
        except OSError:  # pragma: no cover - no C library to seed: proposals stay unseeded
            log.warning("cannot load the C library to seed rand(): proposal order is not reproducible")
            _LIBC = False
    if _LIBC:
        _LIBC.srand(seed)


_LIBC = None


def selective_search(image: np.ndarray, settings: ProposalSettings = ProposalSettings()) -> np.ndarray:
    """Selective search ("fast") proposals of one RGB uint8 (H, W, 3) image -> (R, 4) float32.

    R may be 0 for a degenerate image (callers decide what to do with that).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    cv2.setNumThreads(settings.threads)
    h, w = image.shape[:2]
    f = min(1.0, settings.max_side / max(h, w))
    small = image if f == 1.0 else cv2.resize(
        image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV expects BGR
    ss.switchToSelectiveSearchFast()
    _seed_c_rand(0)
    r = np.asarray(ss.process(), np.float64).reshape(-1, 4)  # (x, y, w, h) in small pixels
    # Inclusive corners in the small image, then back to original pixels.
    boxes = np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2] - 1, r[:, 1] + r[:, 3] - 1], axis=1)
    if f != 1.0:
        sx, sy = w / small.shape[1], h / small.shape[0]
        # Pixel edges scale, not pixel indices: edge = index (+1 for the far side).
        boxes = np.stack([boxes[:, 0] * sx, boxes[:, 1] * sy,
                          (boxes[:, 2] + 1) * sx - 1, (boxes[:, 3] + 1) * sy - 1], axis=1)
    return clean_boxes(boxes, (h, w), settings.min_side, settings.max_boxes)


def _worker(args):
    image_id, image, settings = args
    t0 = time.perf_counter()
    boxes = selective_search(image, settings)
    return image_id, boxes, time.perf_counter() - t0


def cache_path(cache_dir: str, dataset: str, split: str, settings: ProposalSettings) -> str:
    """``cache_dir/proposals-<dataset>-<split>-<hash of settings>.npz``."""
    key = json.dumps({"dataset": dataset, "split": split, **settings.key()}, sort_keys=True)
    h = hashlib.sha1(key.encode()).hexdigest()[:10]
    safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
    return os.path.join(cache_dir, f"proposals-{dataset}-{safe_split}-{h}.npz")


def save_proposal_file(path: str, proposals: Mapping[str, np.ndarray]) -> None:
    """Write image_id -> (R, 4) boxes atomically (temp file, then rename)."""
    with atomic.path(path) as tmp:
        np.savez(tmp, **{k: np.asarray(v, np.float32).reshape(-1, 4) for k, v in proposals.items()})


def file_sha1(path: str) -> str:
    """Short SHA-1 of a file's bytes (cache keys of features built on user proposals)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _boxes_of(path: str, image_id: str, a: np.ndarray) -> np.ndarray:
    """One image's array from a proposal file -> (R, 4) float32, or InputError naming it."""
    where = f"{path}: image {image_id!r}"
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InputError(f"{where}: boxes must be numbers, got dtype {a.dtype}")
    if a.size == 0:
        return np.zeros((0, 4), np.float32)  # an image without proposals (skipped later)
    if a.ndim != 2 or a.shape[1] != 4:
        hint = (" (drop the score column: keep boxes[:, :4])" if a.ndim == 2 and a.shape[1] == 5
                else "")
        raise InputError(f"{where}: boxes must have shape (R, 4) as (x1, y1, x2, y2), got "
                         f"{a.shape}{hint}")
    if not np.isfinite(a).all():
        row = int(np.argmax(~np.isfinite(a).all(axis=1)))
        raise InputError(f"{where}: box {row} has a NaN or infinite coordinate: {a[row].tolist()}")
    return a.astype(np.float32)


def load_proposal_file(path: str, image_ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Load a user ``.npz`` (image_id -> (R, 4) 0-based inclusive boxes) -> dict of float32 arrays.

    The file is what :func:`save_proposal_file` writes (``np.savez(path, **{image_id:
    boxes})``): one numeric (R, 4) array (x1, y1, x2, y2) per image id, R >= 0, finite.
    Raises InputError (a ValueError) naming the file, and the image id where there is one,
    for: a missing, empty or non-``.npz`` file (e.g. a single ``.npy`` array), an array of
    another shape (e.g. (R, 5) boxes with scores) or dtype, a NaN or infinite coordinate,
    and, with ``image_ids``, images the file lacks.
    """
    how = "expected an .npz archive with one (R, 4) array per image id (np.savez(path, **boxes))"
    try:
        z = np.load(path)
    except FileNotFoundError:
        raise InputError(f"proposal file {path} does not exist") from None
    except EOFError:
        raise InputError(f"{path} is empty; {how}") from None
    except (ValueError, zipfile.BadZipFile):  # text, pickles, a truncated archive
        raise InputError(f"{path} is not an .npz archive; {how}") from None
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise InputError(f"{path} holds a single array of shape {z.shape}; {how}")
    out = {}
    with z:
        for k in z.files:
            try:
                a = z[k]
            except (ValueError, OSError, zipfile.BadZipFile, zlib.error) as e:
                raise InputError(f"{path}: image {k!r} cannot be read ({e})") from None
            out[k] = _boxes_of(path, k, a)
    if not out:
        raise InputError(f"{path} holds no arrays; {how}")
    if image_ids is not None:
        missing = [i for i in image_ids if i not in out]
        if missing:
            raise InputError(f"{path} has no proposals for {len(missing)} image(s), e.g. "
                             f"{', '.join(repr(m) for m in missing[:3])}")
    return out


def compute_proposals(records, cache_dir: str | None = None, *,
                      settings: ProposalSettings = ProposalSettings(), workers: int = 2,
                      progress: bool = True, stats: dict | None = None) -> dict[str, np.ndarray]:
    """Selective-search proposals of every record, cached on disk.

    Args:
      records: a :class:`spp_jax.detection.records.RecordSource` (has ``name``,
        ``split``; items have "image_id", "image").
      cache_dir: directory of the cache (None = no cache).
      settings: :class:`ProposalSettings`.
      workers: worker processes (spawn context); 0 = run in this process.
      stats: if given, receives "seconds_per_image" (mean worker time, also when loaded from
        the cache: it is stored with it) and "cached" (True if loaded from the cache).
    Returns:
      image_id -> (R, 4) float32 boxes (R may be 0; callers skip such images).
    """
    path = None
    if cache_dir is not None:
        path = cache_path(cache_dir, records.name, records.split, settings)
        if os.path.exists(path + ".done") and os.path.exists(path):
            try:
                out = load_proposal_file(path)
                if len(out) == len(records):
                    log.info("proposals: loaded %d images from %s", len(out), path)
                    if stats is not None:
                        with open(path + ".done") as f:  # the time it took when it was computed
                            done = json.loads(f.read() or "{}")
                        stats.update(cached=True, seconds_per_image=done.get("seconds_per_image",
                                                                             float("nan")))
                    return out
                log.warning("proposal cache %s has %d images, expected %d: rebuilding",
                            path, len(out), len(records))
            except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
                log.warning("proposal cache %s unreadable (%s): rebuilding", path, e)
        elif os.path.exists(path):
            log.warning("proposal cache %s has no completion marker (interrupted write?): rebuilding", path)
        for p in (path + ".done", path):
            if os.path.exists(p):
                os.remove(p)

    from tqdm import tqdm
    jobs = ((r["image_id"], r["image"], settings) for r in records)
    out, times = {}, []
    bar = tqdm(total=len(records), desc=f"selective search {records.name}/{records.split}",
               disable=not progress)
    if workers > 0:
        with mp.get_context("spawn").Pool(workers) as pool:
            for image_id, boxes, dt in pool.imap(_worker, jobs, chunksize=1):
                out[image_id] = boxes
                times.append(dt)
                bar.update()
    else:
        for job in jobs:
            image_id, boxes, dt = _worker(job)
            out[image_id] = boxes
            times.append(dt)
            bar.update()
    bar.close()
    empty = [k for k, v in out.items() if len(v) == 0]
    if empty:
        log.warning("selective search found no box in %d image(s), e.g. %s", len(empty), empty[0])
    spi = float(np.mean(times)) if times else float("nan")
    log.info("proposals: %d images, mean %.0f boxes, %.2f s/image (per worker)", len(out),
             np.mean([len(v) for v in out.values()]) if out else 0, spi)
    if stats is not None:
        stats.update(cached=False, seconds_per_image=spi)
    if path is not None:
        save_proposal_file(path, out)
        with open(path + ".done", "w") as f:  # the marker comes last: its presence means complete
            f.write(json.dumps({"images": len(out), "seconds_per_image": spi}))
    return out
