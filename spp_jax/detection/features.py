"""SPP window features: conv maps once per image and scale, pool5 per window, fc6/fc7.

Pipeline for one image (SPP_FACTS section 6):

1. For each scale s the image is resized to shorter side s, mean-subtracted
   and zero-padded at the bottom/right to a *bucket* shape
   (:func:`spp_jax.evaluate.views.bucket_shape`: the longer side rounded up to
   a multiple of s/2), so all images share at most 5 input shapes per scale
   -> at most 5 compiled conv programs per scale (the log says how many were
   compiled). The conv map is computed once.
2. Each window gets one scale (:func:`spp_jax.detection.scales.choose_scales`),
   is scaled into that image's pixels and projected with the model's geometry
   onto the *valid* map region ``map_size(arch, H') x map_size(arch, W')`` of the
   unpadded resized image, so padding cells are never pooled.
3. Windows of one scale that project to the same cells are pooled once (the
   released code's trick) by :func:`spp_jax.roi_pool_cells` in fixed-size
   chunks (one compiled program per bucket map shape).
4. fc6 / fc7 (:func:`fc_features`) from pool5 vectors in fixed-size batches.

pool5 is ``C * 50`` wide (12,800 for the full ZF-5), float32 in memory.

:class:`FeatureCache` stores per image ``{boxes, num_gt, pool5, scale_idx,
gt_boxes, gt_labels, gt_difficult}`` as one ``.npz``; pool5 is **float16 by
default** (halves disk; conv5 activations are post-ReLU values well inside
float16's range, relative error ~5e-4), ``dtype="float32"`` keeps it exact.
Files are written to a temporary name and renamed, so every file present is
complete and an interrupted :func:`cache_features` resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.bins import DEFAULT_LEVELS
from spp_jax.detection.boxes import clip_boxes, flip_boxes_lr, scale_boxes
from spp_jax.detection.scales import choose_scales
from spp_jax.geometry import project_boxes
from spp_jax.models import SPPNet, map_size
from spp_jax.roi import roi_pool_cells

log = logging.getLogger(__name__)

DEFAULT_MEAN_RGB = np.array([123.675, 116.28, 103.53], np.float32)  # per-channel, 0..255 units

_ENTRY_KEYS = ("boxes", "num_gt", "pool5", "scale_idx", "gt_boxes", "gt_labels", "gt_difficult", "image_hw")

__all__ = ["SPPExtractor", "FeatureCache", "cache_features", "fc_features", "resize_for_scale", "valid_windows",
           "params_fingerprint", "DEFAULT_MEAN_RGB"]


def resize_for_scale(image: np.ndarray, side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize so the shorter side is ``side``; return the image and (sy, sx) box factors."""
    from spp_jax.data.augment import resize_shorter
    out = resize_shorter(image, side)
    return out, (out.shape[0] / image.shape[0], out.shape[1] / image.shape[1])


def _bucket(h: int, w: int, scale: int, step: float) -> tuple[int, int]:
    from spp_jax.evaluate.views import bucket_shape
    return bucket_shape(h, w, scale, step)


def params_fingerprint(tree) -> str:
    """Short hash of a parameter pytree (shapes + a sample of values) for cache keys."""
    h = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a.reshape(-1)[:256], np.float32).tobytes())
    return h.hexdigest()[:12]


@jax.jit
def _fc67(fc, x):
    """fc6, fc7 (after ReLU) exactly as :class:`spp_jax.models.Head` computes them."""
    fc6 = jax.nn.relu(x @ fc["fc6"]["kernel"] + fc["fc6"]["bias"])
    fc7 = jax.nn.relu(fc6 @ fc["fc7"]["kernel"] + fc["fc7"]["bias"])
    return fc6, fc7


def fc_features(head_params: dict, pool5, layer: str, batch: int = 512) -> np.ndarray:
    """fc6 or fc7 features of pool5 vectors.

    Args:
      head_params: Head params with "fc6", "fc7" ({"kernel", "bias"}) —
        ``variables["params"]["classifier"]`` of an SPPNet or a fine-tuned head.
      pool5: (N, D) float pool5 features.
      layer: "fc6" or "fc7".
      batch: rows per call. Fewer rows are zero-padded up to a multiple of ``batch // 8``
        (so images with 150, 170, 190 windows share programs: at most 8 compiled shapes
        per head, not one per window count).
    Returns:
      (N, fc_dim) float32.
    """
    if layer not in ("fc6", "fc7"):
        raise ValueError(f"layer must be fc6 or fc7, got {layer!r}")
    fc = {k: head_params[k] for k in ("fc6", "fc7")}
    pool5 = np.asarray(pool5, np.float32)
    n = len(pool5)
    out = np.zeros((n, fc["fc6"]["bias"].shape[0]), np.float32)
    step = max(1, batch // 8)
    bsz = min(batch, -(-max(1, n) // step) * step)
    for i in range(0, n, bsz):
        chunk = pool5[i:i + bsz]
        m = len(chunk)
        if m < bsz:
            chunk = np.concatenate([chunk, np.zeros((bsz - m, chunk.shape[1]), np.float32)])
        f6, f7 = _fc67(fc, jnp.asarray(chunk))
        out[i:i + m] = np.asarray(f6 if layer == "fc6" else f7)[:m]
    return out


@dataclasses.dataclass
class SPPExtractor:
    """pool5 features of image windows with SPP (conv once per image per scale).

    Attributes:
      model: an :class:`SPPNet` (its arch, width and geometry are used).
      variables: its Flax variables ({"params": {"backbone", "classifier"}}).
      scales: shorter sides in pixels, e.g. (688,) or (480, 576, 688, 864, 1200).
      rule: per-window scale rule, "area" (paper) or "released" (208 rule).
      mean: (3,) mean RGB subtracted before the conv layers (0..255 units).
      bucket_step: bucket granularity as a fraction of the scale (0.5).
      pool_chunk: windows per roi-pooling call (fixed, so one program per map shape).
    """

    model: SPPNet
    variables: Any
    scales: Sequence[int] = (688,)
    rule: str = "area"
    mean: Any = None
    bucket_step: float = 0.5
    pool_chunk: int = 256

    def __post_init__(self):
        self.scales = tuple(int(s) for s in self.scales)
        self.mean = DEFAULT_MEAN_RGB if self.mean is None else np.asarray(self.mean, np.float32)
        self.levels = tuple(self.model.levels) if self.model.spp else DEFAULT_LEVELS
        self.geometry = self.model.geometry
        model = self.model
        self._conv = jax.jit(lambda v, x: model.apply(v, x, method=SPPNet.conv_map)[0])
        self.conv_shapes: set = set()
        self.pool_shapes: set = set()
        self.stats = {"images": 0, "conv_s": 0.0, "pool_s": 0.0, "windows": 0, "unique": 0}

    @property
    def kind(self) -> str:
        return "spp"

    @property
    def dim(self) -> int:
        """pool5 length: channels x sum(n^2) over the levels (12,800 for the full ZF-5)."""
        from spp_jax.bins import output_dim
        return output_dim(self.model.channels, self.levels)

    def key(self) -> dict:
        """Everything that changes the features (for cache keys)."""
        return {"kind": "spp", "arch": self.model.arch, "width": self.model.width,
                "levels": list(self.levels), "scales": list(self.scales), "rule": self.rule,
                "mean": [round(float(m), 3) for m in self.mean], "bucket_step": self.bucket_step,
                "params": params_fingerprint(self.variables["params"]["backbone"])}

    def conv_map(self, image: np.ndarray, scale: int):
        """Conv map of ``image`` at one scale.

        Returns (fmap (Hb', Wb', C) jax float32 of the padded bucket input,
        valid (h, w) cells of the unpadded resized image, (sy, sx) box factors).
        """
        from spp_jax.evaluate.views import pad_image
        resized, factors = resize_for_scale(image, scale)
        h, w = resized.shape[:2]
        x = resized.astype(np.float32) - self.mean
        x = pad_image(x, _bucket(h, w, scale, self.bucket_step))
        self.conv_shapes.add(x.shape)
        fmap = self._conv(self.variables, jnp.asarray(x)[None])
        valid = (map_size(self.model.arch, h), map_size(self.model.arch, w))
        return fmap, valid, factors

    def pool_cells(self, fmap, cells: np.ndarray) -> np.ndarray:
        """roi_pool_cells in fixed chunks: (R, 4) int cells -> (R, D) float32 numpy."""
        n, k = len(cells), self.pool_chunk
        pad = (-n) % k
        cells = np.concatenate([cells, np.zeros((pad, 4), np.int32)]) if pad else cells
        self.pool_shapes.add(tuple(fmap.shape))
        outs = [roi_pool_cells(fmap, jnp.asarray(cells[i:i + k]), self.levels)
                for i in range(0, len(cells), k)]
        return np.asarray(jnp.concatenate(outs))[:n]

    def pool5(self, image: np.ndarray, boxes, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """pool5 of windows of one image.

        Args:
          image: uint8 (H, W, 3) RGB.
          boxes: (R, 4) windows in ``image`` pixels (0-based inclusive), R >= 1.
          flip: compute on the left-right flipped image (``boxes`` are then
            windows of the *flipped* image).
        Returns:
          pool5 (R, D) float32, scale_idx (R,) int64 (index into ``scales``).
        """
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            raise ValueError("no windows to pool (empty box list)")
        if flip:
            image = image[:, ::-1]
        hw = image.shape[:2]
        sidx = choose_scales(boxes, hw, self.scales, self.rule)
        out = None
        t_conv = t_pool = 0.0
        n_unique = 0
        for si, s in enumerate(self.scales):
            sel = np.flatnonzero(sidx == si)
            if sel.size == 0:
                continue  # no window wants this scale: skip its conv map
            t0 = time.perf_counter()
            fmap, valid, factors = self.conv_map(image, s)
            fmap.block_until_ready()
            t1 = time.perf_counter()
            cells = project_boxes(scale_boxes(boxes[sel], factors), self.geometry, valid, xp=np)
            uniq, inv = np.unique(cells, axis=0, return_inverse=True)
            pooled = self.pool_cells(fmap, uniq.astype(np.int32))
            if out is None:
                out = np.zeros((len(boxes), pooled.shape[1]), np.float32)
            out[sel] = pooled[inv.reshape(-1)]
            n_unique += len(uniq)
            t_conv += t1 - t0
            t_pool += time.perf_counter() - t1
        st = self.stats
        st["images"] += 1
        st["conv_s"] += t_conv
        st["pool_s"] += t_pool
        st["windows"] += len(boxes)
        st["unique"] += n_unique
        return out, sidx

    def describe(self) -> str:
        return (f"SPP {self.model.arch} width {self.model.width} scales {self.scales} rule {self.rule}: "
                f"{len(self.conv_shapes)} conv program(s) {sorted(self.conv_shapes)}, "
                f"{len(self.pool_shapes)} pooling program(s)")


class FeatureCache:
    """Per-image pool5 feature files under ``root/<key hash>/``.

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

    def save(self, image_id: str, entry: dict, flip: bool = False) -> None:
        path = self.path(image_id, flip)
        tmp = path + ".tmp.npz"
        data = dict(entry)
        data["pool5"] = np.asarray(entry["pool5"]).astype(self.dtype)
        np.savez(tmp, **data)
        os.replace(tmp, path)  # atomic: a present file is always complete

    def load(self, image_id: str, flip: bool = False) -> dict:
        """{"boxes" (R, 4) f32, "num_gt" int, "pool5" (R, D) f32, "scale_idx" (R,),
        "gt_boxes" (G, 4), "gt_labels" (G,), "gt_difficult" (G,), "image_hw" (2,)}."""
        path = self.path(image_id, flip)
        try:
            with np.load(path) as z:
                e = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001 - say which file, and what to do
            raise ValueError(f"feature cache file {path} is unreadable ({type(err).__name__}: {err}); "
                             f"delete it and run again to recompute it") from err
        e["pool5"] = e["pool5"].astype(np.float32)
        e["num_gt"] = int(e["num_gt"])
        return e

    def valid(self, image_id: str, flip: bool = False) -> bool:
        """True when the image's file exists and opens as a complete entry (headers only)."""
        path = self.path(image_id, flip)
        if not os.path.exists(path):
            return False
        try:
            with np.load(path) as z:
                return set(_ENTRY_KEYS) <= set(z.files)
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
    dim = getattr(extractor, "dim", None) or extractor.model.pooled_dim
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
                pool5, sidx = np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
            cache.save(iid, {"boxes": b, "num_gt": len(gt), "pool5": pool5, "scale_idx": sidx,
                             "gt_boxes": g, "gt_labels": rec["labels"],
                             "gt_difficult": rec["difficult"], "image_hw": np.array([h, w])}, fl)
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
