"""The paper's testing protocols: 1 crop, 1 full, 10-view, multi-view on feature maps.

``evaluate(model, variables, source, ...)`` returns, per protocol, top-1 and
top-5 error (percent) over a split, averaging softmax probabilities over each
image's views (as the paper averages scores).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from spp_jax.data.pipeline import AugmentConfig, EvalIterator, _load
from spp_jax.evaluate.scoring import Scorer
from spp_jax.evaluate.views import MULTIVIEW_SCALES, nine_windows
from spp_jax.serve import Server

log = logging.getLogger(__name__)

PROTOCOLS: tuple[str, ...] = ("1crop", "1full", "10view", "multiview")
PROTOCOL_TITLES = {"1crop": "1 crop", "1full": "1 full", "10view": "10-view",
                   "multiview": "multi-view (96+2)"}
# Protocols scored in one pass over the images (an image's multi-view includes its full view,
# :func:`_map_views`): when both run, each one's ``seconds`` is that whole pass's.
ONE_PASS: frozenset[str] = frozenset({"1full", "multiview"})
_SLOTS = 10  # 9 windows + 1 full view: one program per padded shape serves every call


@dataclasses.dataclass
class ProtocolResult:
    top1_err: float  # percent
    top5_err: float  # percent
    num_images: int
    views_per_image: float  # mean number of distinct views averaged per image
    seconds: float
    # Per image, in order: its index in the split and whether the label was in the top 1 /
    # top 5.  Two protocols run on different numbers of images (multi-view is limited) can
    # then be compared on the images both saw.
    indices: tuple[int, ...] = ()
    top1_hits: tuple[bool, ...] = ()
    top5_hits: tuple[bool, ...] = ()

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("indices", "top1_hits", "top5_hits"):  # compact JSON: ints, 0/1
            d[k] = [int(v) for v in d[k]]
        return d


def topk_hits(probs: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> list[np.ndarray]:
    """Per image, whether the label is among the k largest scores: (N,) bool per k.

    (N, classes) scores, (N,) int labels; ties are broken by class index (``argsort``
    is stable), so a constant score vector is not rewarded.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs (N, K) and labels (N,) expected, got {probs.shape}, {labels.shape}")
    order = np.argsort(-probs, axis=1, kind="stable")
    return [(order[:, :min(k, probs.shape[1])] == labels[:, None]).any(axis=1) for k in ks]


def topk_errors(probs: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Top-k error in percent (see :func:`topk_hits`)."""
    return [float(100.0 * (1.0 - hit.mean())) for hit in topk_hits(probs, labels, ks)]


def _result(probs, labels, indices, views_per_image: float, seconds: float) -> ProtocolResult:
    h1, h5 = topk_hits(np.stack(probs) if isinstance(probs, list) else probs, np.asarray(labels))
    return ProtocolResult(float(100.0 * (1.0 - h1.mean())), float(100.0 * (1.0 - h5.mean())),
                          len(h1), views_per_image, seconds, tuple(int(i) for i in indices),
                          tuple(bool(v) for v in h1), tuple(bool(v) for v in h5))


def _crop_protocol(scorer: Scorer, source, view: str, cfg: AugmentConfig, batch_size: int,
                   limit: int | None, progress: bool):
    it = EvalIterator(source, view, batch_size, cfg=cfg, pad_last_batch=True,
                      process_index=0, process_count=1)
    probs, labels, indices = [], [], []
    n = 0
    bar = tqdm(total=min(limit or len(source), len(source)), desc=f"eval {view}", disable=not progress,
               leave=False)
    for batch in it:
        x = batch["image"]  # (B, V, S, S, 3)
        b, v = x.shape[:2]
        p = scorer.score_crops(x.reshape((b * v,) + x.shape[2:])).reshape(b, v, -1).mean(axis=1)
        keep = batch["mask"]
        probs.append(p[keep])
        labels.append(batch["label"][keep])
        indices.append(batch["index"][keep])
        n += int(keep.sum())
        bar.update(int(keep.sum()))
        if limit is not None and n >= limit:
            break
    bar.close()
    probs, labels = np.concatenate(probs)[:limit], np.concatenate(labels)[:limit]
    return probs, labels, np.concatenate(indices)[:limit], v, it.num_skipped


def _full_view(scorer: Scorer, img: np.ndarray, side: int) -> np.ndarray:
    """The 1-full probabilities (classes,) of a uint8 image resized to shorter side ``side``
    (the image alone, no flip: :meth:`Scorer.score_full`)."""
    x = scorer.server.prepare(img, side)  # shorter side `side`, minus the mean (image)
    return scorer.score_full(x, scorer.server.bucket(*x.shape[:2], side))


def _map_views(scorer: Scorer, img: np.ndarray, cfg: AugmentConfig, scales: Sequence[int],
               want_multiview: bool):
    """Full and multi-view probabilities of one uint8 image.

    Returns (full (classes,), multiview (classes,) or None, number of multi-views).
    Without multi-view only the image itself is scored (:meth:`Scorer.score_full`): the
    flipped map that multi-view also needs would be computed and thrown away.
    """
    if not want_multiview:
        return _full_view(scorer, img, cfg.resize_side), None, 0
    views = []
    full = None
    for s in sorted(set(scales) | {cfg.resize_side}):
        x = scorer.server.prepare(img, s)  # shorter side s, minus the mean (image)
        h, w = x.shape[:2]
        is_full_scale = s == cfg.resize_side
        boxes = nine_windows(h, w, cfg.crop_size) if s in scales else np.zeros((0, 4))
        p = scorer.score_windows(x, boxes, scorer.server.bucket(h, w, s), _SLOTS, include_full=is_full_scale)
        if is_full_scale:
            full = p[:, -1]  # (2, classes): the full image and its flip
            p = p[:, :-1]
        views.append(p.reshape(-1, p.shape[-1]))
    mv = np.concatenate(views + [full])  # 96 windows (for typical images) + 2 full views
    return full[0], mv.mean(axis=0), len(mv)


def full_view_by_side(model, variables, source, sides: Sequence[int], *,
                      cfg: AugmentConfig | None = None, limit: int | None = None,
                      progress: bool = True) -> dict[int, ProtocolResult]:
    """The "1 full" view at several test scales: error as the objects' size in pixels moves
    away from the one the network was trained at.

    Every image is resized so that its shorter side is ``s`` (for each ``s`` in ``sides``)
    and scored whole, without its flip, as the 1-full protocol scores it at ``s =
    cfg.resize_side`` (so that side gives exactly 1-full's errors).  A network trained on
    224 crops of images at shorter side 256 sees its objects at 224/256 of their training
    size at ``s = 224`` and at 2x at ``s = 512``: a probe of how much multi-size training
    buys in scale robustness that needs no retraining.

    Args:
      model, variables: an SPP ``SPPNet`` (``spp=True``) and its variables.
      source: random-access ``{"image": uint8 (H, W, 3), "label": int}``.
      sides: test shorter sides in pixels, each at least the network's minimum input.
      cfg: preprocessing (the mean); limit: the first ``limit`` images only.
    Returns:
      {side: ProtocolResult} in the order of ``sides``.
    """
    if not model.spp:
        raise ValueError("the full view at any scale needs an SPP model (spp=True)")
    cfg = cfg or AugmentConfig()
    scorer = Scorer(Server(model, variables, cfg.mean))
    n = min(len(source), limit or len(source))
    probs = {s: [] for s in sides}
    labels, indices, seconds = [], [], {s: 0.0 for s in sides}
    for i in tqdm(range(n), desc="eval full view by side", disable=not progress, leave=False):
        img, label = _load(source, i, cfg)
        if img is None:
            continue
        for s in sides:
            t = time.perf_counter()
            probs[s].append(_full_view(scorer, img, s))
            seconds[s] += time.perf_counter() - t
        labels.append(label)
        indices.append(i)
    return {s: _result(probs[s], labels, indices, 1.0, seconds[s]) for s in sides}


def evaluate(model, variables, source, *, protocols: Sequence[str] = PROTOCOLS,
             cfg: AugmentConfig | None = None, scales: Sequence[int] = MULTIVIEW_SCALES,
             limit: int | None = None, multiview_limit: int | None = None, batch_size: int = 32,
             progress: bool = True) -> dict[str, ProtocolResult]:
    """Run testing protocols on a split.

    Args:
      model, variables: an ``SPPNet`` and its variables.
      source: random-access source of ``{"image": uint8 (H, W, 3), "label": int}``.
      protocols: subset of ``PROTOCOLS``. "1full" and "multiview" need an SPP model.
      cfg: preprocessing (``resize_side`` 256, ``crop_size`` 224, ``mean``); the
        training augmentation fields are ignored.
      scales: multi-view scales (shorter sides), paper: 224, 256, 300, 360, 448, 560.
      limit: evaluate only the first ``limit`` images (all protocols).
      multiview_limit: a smaller limit for the two map-based protocols, which are
        the expensive ones (they still use the first images of the split).
      batch_size: images per batch for the crop protocols.
    Returns:
      {protocol: ProtocolResult}.
    """
    cfg = cfg or AugmentConfig()
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; valid: {', '.join(PROTOCOLS)}")
    if not model.spp:
        dropped = [p for p in protocols if p in ("1full", "multiview")]
        if dropped:
            log.info("no-SPP model: skipping %s (they need pooling of arbitrary maps)", dropped)
        protocols = [p for p in protocols if p not in dropped]
    scorer = Scorer(Server(model, variables, cfg.mean))
    results: dict[str, ProtocolResult] = {}
    for name, view in (("1crop", "center"), ("10view", "ten")):
        if name in protocols:
            t = time.perf_counter()
            probs, labels, idx, v, skipped = _crop_protocol(scorer, source, view, cfg, batch_size,
                                                            limit, progress)
            results[name] = _result(probs, labels, idx, float(v), time.perf_counter() - t)
            if skipped:
                log.warning("%s: skipped %d unreadable images", name, skipped)
    want_full, want_mv = "1full" in protocols, "multiview" in protocols
    if want_full or want_mv:
        t = time.perf_counter()
        n_total = min(len(source), limit or len(source))
        n_mv = min(n_total, multiview_limit or n_total)
        full_p, full_y, full_i, mv_p, mv_y, mv_i, mv_views = [], [], [], [], [], [], []
        skipped = 0
        for i in tqdm(range(n_total if want_full else n_mv), desc="eval full/multi-view",
                      disable=not progress, leave=False):
            img, label = _load(source, i, cfg)
            if img is None:
                skipped += 1
                continue
            f, mv, nv = _map_views(scorer, img, cfg, scales, want_mv and i < n_mv)
            full_p.append(f)
            full_y.append(label)
            full_i.append(i)
            if mv is not None:
                mv_p.append(mv)
                mv_y.append(label)
                mv_i.append(i)
                mv_views.append(nv)
        dt = time.perf_counter() - t
        if want_full:
            results["1full"] = _result(full_p, full_y, full_i, 1.0, dt)
        if want_mv:
            results["multiview"] = _result(mv_p, mv_y, mv_i, float(np.mean(mv_views)), dt)
        if skipped:
            log.warning("full/multi-view: skipped %d unreadable images", skipped)
    log.info("evaluation compiled %d programs: %s", len(scorer.compiled_shapes),
             sorted(scorer.compiled_shapes))
    return {p: results[p] for p in PROTOCOLS if p in results}
