"""Greedy non-maximum suppression (NMS): a NumPy reference and jit versions.

Greedy NMS as in R-CNN/SPP-net: visit boxes in descending score order; keep
a box unless it was suppressed, and suppress every lower-scoring box whose
IoU with it is **strictly greater** than ``thresh`` (default 0.3, applied per
class). IoU uses the +1 pixel convention of :mod:`spp_jax.detection.boxes`.

Tie-breaking (the same in every function here, so results match exactly):
equal scores are visited in increasing index order (a stable sort on
``-score``; ``-0.0`` and ``0.0`` tie). Scores of valid entries must not be
NaN; padded (invalid) entries may hold anything.

The jit versions have static shapes: inputs are padded to a fixed ``N`` with
a validity mask ``valid (N,)``, and kept indices come back as a fixed-size
array padded with -1 plus a count. They build the (N, N) "suppresses" matrix
once (N**2 bytes: 4 MB for N = 2000) and run a ``lax.fori_loop`` of N cheap
vector steps; for per-class NMS over shared boxes the matrix is shared by all
classes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax.detection.boxes import pairwise_iou

__all__ = [
    "nms_numpy",
    "nms_keep_mask",
    "nms_padded",
    "batched_nms",
    "top_k_detections",
    "Detections",
    "multiclass_nms",
]


# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def nms_numpy(boxes: Any, scores: Any, thresh: float = 0.3) -> np.ndarray:
    """Greedy NMS in NumPy (reference implementation).

    Args:
      boxes: (N, 4) internal boxes (int or float).
      scores: (N,) float scores, higher is better.
      thresh: IoU above which a lower-scoring box is suppressed.
    Returns:
      (K,) int64 indices into ``boxes`` of the kept boxes, in visiting order
      (descending score, ties by index). ``K == 0`` for empty input.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    _check_shapes(boxes, scores)
    neg = -scores
    neg = np.where(neg == 0, 0, neg)  # make -0.0 and 0.0 tie, as in the jit version
    order = np.argsort(neg, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        overlap = pairwise_iou(boxes[i : i + 1], boxes[rest])[0]
        order = rest[overlap <= thresh]
    return np.asarray(keep, dtype=np.int64)


# --------------------------------------------------------------------------
# jit-compatible versions
# --------------------------------------------------------------------------


def _score_order(scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Visiting order: valid first, then descending score, ties by index.

    Args:
      scores: (N,) float.  valid: (N,) bool.
    Returns:
      order (N,) int32 (order[r] = index visited r-th) and its inverse
      rank (N,) int32 (rank[order[r]] = r).
    """
    n = scores.shape[0]
    neg = -scores
    neg = jnp.where(neg == 0, jnp.zeros_like(neg), neg)  # -0.0 ties with 0.0
    invalid = jnp.logical_not(valid).astype(jnp.int32)
    iota = jnp.arange(n, dtype=jnp.int32)
    # lax.sort is stable, so equal (invalid, -score) keys keep index order.
    _, _, order = lax.sort((invalid, neg, iota), num_keys=2, is_stable=True)
    rank = jnp.zeros(n, jnp.int32).at[order].set(iota)
    return order, rank


def _greedy_keep(suppress: jax.Array, order: jax.Array, rank: jax.Array, valid: jax.Array) -> jax.Array:
    """Run the greedy pass.

    Args:
      suppress: (N, N) bool, ``suppress[i, j]`` = IoU(i, j) > thresh
        (original index order).
      order, rank: from :func:`_score_order`.
      valid: (N,) bool.
    Returns:
      (N,) bool keep mask in original index order.
    """
    n = order.shape[0]

    def body(r, keep):
        i = order[r]
        # Box i (visited r-th) suppresses only boxes visited after it.
        hit = suppress[i] & (rank > r)
        return jnp.where(keep[i], keep & jnp.logical_not(hit), keep)

    return lax.fori_loop(0, n, body, valid)


def _check_shapes(boxes, scores):
    """boxes (N, 4) and scores (N,), or a ValueError naming the wrong shape."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4); got {boxes.shape}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape ({boxes.shape[0]},); got {scores.shape}")


def _check_inputs(boxes, scores, valid):
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    _check_shapes(boxes, scores)
    if valid is None:
        valid = jnp.ones(scores.shape, bool)
    valid = jnp.asarray(valid, bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid must have shape {scores.shape}; got {valid.shape}")
    return boxes, scores, valid


def nms_keep_mask(boxes: Any, scores: Any, valid: Any = None, thresh: Any = 0.3) -> jax.Array:
    """jit-compatible greedy NMS returning a keep mask.

    Args:
      boxes: (N, 4) padded internal boxes.
      scores: (N,) float scores.
      valid: (N,) bool, False for padding (never kept, never suppresses);
        None means all valid.
      thresh: IoU threshold (may be a traced scalar; not static).
    Returns:
      (N,) bool, True for kept boxes (original index order).
    """
    boxes, scores, valid = _check_inputs(boxes, scores, valid)
    order, rank = _score_order(scores, valid)
    suppress = pairwise_iou(boxes, boxes) > thresh
    return _greedy_keep(suppress, order, rank, valid)


def _pack_indices(keep: jax.Array, order: jax.Array, max_out: int) -> tuple[jax.Array, jax.Array]:
    """Keep mask (N,) -> kept indices in visiting order, padded to (max_out,)."""
    kept_sorted = keep[order]  # (N,) in visiting order
    slot = jnp.cumsum(kept_sorted.astype(jnp.int32)) - 1  # output slot of each kept box
    target = jnp.where(kept_sorted & (slot < max_out), slot, max_out)  # max_out = dropped
    indices = jnp.full((max_out,), -1, jnp.int32).at[target].set(order, mode="drop")
    count = jnp.minimum(kept_sorted.sum(dtype=jnp.int32), max_out)
    return indices, count


def nms_padded(
    boxes: Any, scores: Any, valid: Any = None, thresh: Any = 0.3, max_out: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """jit-compatible greedy NMS returning padded kept indices.

    Under ``jax.jit`` mark ``max_out`` static (``static_argnames="max_out"``).

    Args:
      boxes: (N, 4) padded internal boxes.
      scores: (N,) float scores.
      valid: (N,) bool mask of real entries (None = all valid).
      thresh: IoU threshold (traced scalar allowed).
      max_out: static output length (default N); kept boxes beyond it, the
        lowest-scoring ones, are dropped.
    Returns:
      indices: (max_out,) int32 indices into ``boxes`` of the kept boxes in
        descending score order, padded with -1.
      count: () int32, number of non-padding entries in ``indices``.
    """
    boxes, scores, valid = _check_inputs(boxes, scores, valid)
    max_out = boxes.shape[0] if max_out is None else int(max_out)
    order, rank = _score_order(scores, valid)
    suppress = pairwise_iou(boxes, boxes) > thresh
    keep = _greedy_keep(suppress, order, rank, valid)
    return _pack_indices(keep, order, max_out)


def batched_nms(
    boxes: Any, scores: Any, valid: Any = None, thresh: Any = 0.3, max_out: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-class NMS for C classes at once (vmapped over classes).

    Args:
      boxes: (N, 4) boxes shared by all classes (e.g. the windows of an
        image, scored by every class's SVM), or (C, N, 4) per-class boxes
        (e.g. after class-specific box regression).
      scores: (C, N) float, class-major.
      valid: (C, N) or (N,) bool (None = all valid); use it for padding and
        for a per-class score threshold.
      thresh: IoU threshold (traced scalar allowed).
      max_out: static per-class output length (default N).
    Returns:
      indices: (C, max_out) int32 box indices (into N) per class, descending
        score, padded with -1.
      count: (C,) int32.
    """
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (C, N); got {scores.shape}")
    num_classes, n = scores.shape
    if boxes.shape not in ((n, 4), (num_classes, n, 4)):
        raise ValueError(f"boxes must have shape ({n}, 4) or ({num_classes}, {n}, 4); got {boxes.shape}")
    if valid is None:
        valid = jnp.ones((n,), bool)
    valid = jnp.broadcast_to(jnp.asarray(valid, bool), scores.shape)
    max_out = n if max_out is None else int(max_out)

    def one_class(suppress, s, v):
        order, rank = _score_order(s, v)
        keep = _greedy_keep(suppress, order, rank, v)
        return _pack_indices(keep, order, max_out)

    if boxes.ndim == 2:
        # Shared boxes: one (N, N) matrix for every class.
        suppress = pairwise_iou(boxes, boxes) > thresh
        return jax.vmap(one_class, in_axes=(None, 0, 0))(suppress, scores, valid)
    suppress = jax.vmap(lambda b: pairwise_iou(b, b) > thresh)(boxes)
    return jax.vmap(one_class)(suppress, scores, valid)


def top_k_detections(scores: Any, valid: Any, k: int = 100) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The k highest-scoring valid detections of an image, across classes.

    Args:
      scores: (C, M) float, e.g. per-class scores gathered at NMS outputs.
      valid: (C, M) bool.
      k: static number of detections to keep (default 100 per image).
    Returns:
      class_ids: (k,) int32 row of each selected detection (-1 for padding).
      slot_ids: (k,) int32 column of each selected detection (-1 for padding).
      selected: (k,) bool, False for padding (fewer than k valid entries).
      Ordered by descending score, ties by flat (class-major) index.
    """
    scores = jnp.asarray(scores)
    valid = jnp.broadcast_to(jnp.asarray(valid, bool), scores.shape)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (C, M); got {scores.shape}")
    num_classes, m = scores.shape
    total = num_classes * m
    order, _ = _score_order(scores.reshape(total), valid.reshape(total))
    take = min(k, total)
    flat = order[:take]
    selected = valid.reshape(total)[flat]
    if take < k:  # pad static shapes when there are fewer slots than k
        flat = jnp.concatenate([flat, jnp.zeros(k - take, jnp.int32)])
        selected = jnp.concatenate([selected, jnp.zeros(k - take, bool)])
    class_ids = jnp.where(selected, flat // m, -1).astype(jnp.int32)
    slot_ids = jnp.where(selected, flat % m, -1).astype(jnp.int32)
    return class_ids, slot_ids, selected


class Detections(NamedTuple):
    """Fixed-size detections of one image (a pytree; fine as a jit output).

    Attributes:
      boxes: (K, 4) float internal boxes (zeros where not valid).
      scores: (K,) float (0 where not valid).
      classes: (K,) int32 class index into the C score rows (-1 padding).
      indices: (K,) int32 index of the source window in N (-1 padding).
      valid: (K,) bool; the authoritative padding mask.
    """

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    indices: jax.Array
    valid: jax.Array


def multiclass_nms(
    boxes: Any,
    scores: Any,
    valid: Any = None,
    thresh: Any = 0.3,
    max_per_class: int = 100,
    max_per_image: int = 100,
) -> Detections:
    """Per-class NMS followed by the top ``max_per_image`` over all classes.

    The background class should not be among the C rows. A score threshold
    is applied by passing ``valid = scores > t``.

    Args:
      boxes: (N, 4) shared or (C, N, 4) per-class internal boxes.
      scores: (C, N) float, class-major.
      valid: (C, N) or (N,) bool (None = all valid).
      thresh: NMS IoU threshold (default 0.3).
      max_per_class: static per-class cap after NMS.
      max_per_image: static number K of detections returned.
    Returns:
      :class:`Detections` with K = ``max_per_image`` rows, by descending score.
    """
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    idx, count = batched_nms(boxes, scores, valid, thresh, max_per_class)  # (C, P), (C,)
    kept = jnp.arange(idx.shape[1])[None, :] < count[:, None]  # (C, P)
    safe = jnp.maximum(idx, 0)
    kept_scores = jnp.take_along_axis(scores, safe, axis=1)  # (C, P)
    cls, slot, sel = top_k_detections(kept_scores, kept, max_per_image)
    cls0 = jnp.maximum(cls, 0)
    window = jnp.where(sel, idx[cls0, jnp.maximum(slot, 0)], -1)
    w0 = jnp.maximum(window, 0)
    out_boxes = boxes[w0] if boxes.ndim == 2 else boxes[cls0, w0]
    out_boxes = jnp.where(sel[:, None], out_boxes, 0).astype(boxes.dtype)
    out_scores = jnp.where(sel, scores[cls0, w0], 0).astype(scores.dtype)
    return Detections(out_boxes, out_scores, cls, window.astype(jnp.int32), sel)
