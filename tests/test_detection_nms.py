"""Tests for spp_jax.detection.nms: jit NMS against the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.detection.boxes import pairwise_iou
from spp_jax.detection.nms import (
    batched_nms,
    multiclass_nms,
    nms_keep_mask,
    nms_numpy,
    nms_padded,
    top_k_detections,
)

# One padded size and one compiled function per entry point keeps the number
# of XLA compilations (the slow part) small. thresh is traced, not static.
N_PAD = 48
_NMS = jax.jit(nms_padded, static_argnames="max_out")
_BATCHED = jax.jit(batched_nms, static_argnames="max_out")
_KEEP = jax.jit(nms_keep_mask)
_TOP_K = jax.jit(top_k_detections, static_argnames="k")


def _run(boxes, scores, valid, thresh):
    idx, count = _NMS(
        jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32), jnp.asarray(valid), thresh, max_out=N_PAD
    )
    idx, count = np.asarray(idx), int(count)
    assert np.all(idx[count:] == -1) and np.all(idx[:count] >= 0)
    return idx[:count]


def _random_case(rng, n_valid):
    """Padded (N_PAD, 4) float32 integer-valued boxes, scores with ties, valid mask.

    Integer coordinates and float32 everywhere make the NumPy reference and
    XLA compute bit-identical IoUs, so threshold comparisons agree.
    """
    boxes = np.zeros((N_PAD, 4), np.float32)
    xy = rng.integers(0, 40, (N_PAD, 2))
    wh = rng.integers(1, 20, (N_PAD, 2))
    boxes[:, :2] = xy
    boxes[:, 2:] = xy + wh - 1
    # Exact duplicates of earlier boxes.
    dup = rng.random(N_PAD) < 0.2
    boxes[dup] = boxes[rng.integers(0, N_PAD, dup.sum())]
    # Few distinct score values -> many ties.
    if rng.random() < 0.5:
        scores = rng.integers(0, 4, N_PAD).astype(np.float32) / 4
    else:
        scores = rng.random(N_PAD).astype(np.float32)
    valid = np.zeros(N_PAD, bool)
    valid[rng.choice(N_PAD, n_valid, replace=False)] = True
    # Padding gets the highest scores, to prove it is ignored.
    scores[~valid] = 10.0
    return boxes, scores, valid


def _reference(boxes, scores, valid, thresh):
    real = np.flatnonzero(valid)
    return real[nms_numpy(boxes[real], scores[real], thresh)]


def test_nms_numpy_hand_case():
    boxes = np.array(
        [
            [0, 0, 9, 9],  # 0: score .9, kept
            [1, 1, 10, 10],  # 1: IoU with 0 = 81/119 = 0.68 > .3 -> suppressed
            [5, 0, 14, 9],  # 2: IoU with 0 = 50/150 = 0.333 > .3 -> suppressed
            [20, 20, 29, 29],  # 3: highest score, overlaps nothing -> kept first
            [7, 0, 16, 9],  # 4: IoU with 0 = 30/170 = 0.18 -> kept
        ]
    )
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.6])
    np.testing.assert_array_equal(nms_numpy(boxes, scores), [3, 0, 4])
    # At thresh 0.5, box 2 (0.333) and box 4 survive; 2 then suppresses 4 (IoU 80/120).
    np.testing.assert_array_equal(nms_numpy(boxes, scores, 0.5), [3, 0, 2])
    valid = np.ones(5, bool)
    np.testing.assert_array_equal(_run(np.pad(boxes, ((0, N_PAD - 5), (0, 0))),
                                       np.pad(scores, (0, N_PAD - 5)),
                                       np.pad(valid, (0, N_PAD - 5)), 0.3), [3, 0, 4])


def test_nms_suppressed_box_does_not_suppress():
    # A (.9) suppresses B (.8, IoU 60/140 = .43); B would suppress C
    # (IoU .43) but is gone; C vs A is 20/180 = .11, so C stays.
    boxes = np.array([[0, 0, 9, 9], [4, 0, 13, 9], [8, 0, 17, 9]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    np.testing.assert_array_equal(nms_numpy(boxes, scores), [0, 2])
    keep = _KEEP(np.pad(boxes, ((0, N_PAD - 3), (0, 0))), np.pad(scores, (0, N_PAD - 3)), np.arange(N_PAD) < 3, 0.3)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(keep)), [0, 2])


def test_nms_ties_and_identical_boxes():
    boxes = np.tile(np.array([[3, 3, 12, 12]], np.float32), (4, 1))
    # All tied: the lowest index wins; -0.0 and 0.0 tie too.
    for scores in ([0.5, 0.5, 0.5, 0.5], [-0.0, 0.0, 0.0, -0.0], [0.0, -0.0, 0.0, 0.0]):
        scores = np.array(scores, np.float32)
        np.testing.assert_array_equal(nms_numpy(boxes, scores), [0])
        padded = (np.pad(boxes, ((0, N_PAD - 4), (0, 0))), np.pad(scores, (0, N_PAD - 4)),
                  np.arange(N_PAD) < 4)
        np.testing.assert_array_equal(_run(*padded, 0.3), [0])


def test_nms_empty_and_all_masked():
    assert nms_numpy(np.zeros((0, 4)), np.zeros(0)).shape == (0,)
    rng = np.random.default_rng(0)
    boxes, scores, _ = _random_case(rng, 10)
    idx, count = _NMS(boxes, scores, np.zeros(N_PAD, bool), 0.3, max_out=N_PAD)
    assert int(count) == 0 and np.all(np.asarray(idx) == -1)


def test_jit_nms_matches_numpy_on_random_cases():
    rng = np.random.default_rng(1234)
    for case in range(150):
        n_valid = int(rng.integers(0, N_PAD + 1))
        thresh = float(rng.choice([0.0, 0.3, 0.5, 0.7]))
        boxes, scores, valid = _random_case(rng, n_valid)
        got = _run(boxes, scores, valid, thresh)
        np.testing.assert_array_equal(got, _reference(boxes, scores, valid, thresh), err_msg=f"case {case}")


def test_kept_set_is_valid_and_maximal():
    rng = np.random.default_rng(7)
    thresh = 0.3
    for _ in range(40):
        boxes, scores, valid = _random_case(rng, int(rng.integers(1, N_PAD + 1)))
        kept = _run(boxes, scores, valid, thresh)
        iou = pairwise_iou(boxes, boxes)
        # Kept boxes never overlap each other by more than thresh.
        sub = iou[np.ix_(kept, kept)]
        assert np.all(sub[~np.eye(len(kept), dtype=bool)] <= thresh)
        # Visiting order: descending score, ties by index.
        keys = [(-scores[i], i) for i in kept]
        assert keys == sorted(keys)
        # Every removed valid box overlaps a kept box visited before it.
        rank = {i: (-scores[i], i) for i in range(N_PAD)}
        for j in np.flatnonzero(valid):
            if j in kept:
                continue
            assert any(iou[k, j] > thresh and rank[k] < rank[j] for k in kept), j


def test_max_out_truncates_to_highest_scores():
    rng = np.random.default_rng(3)
    boxes, scores, valid = _random_case(rng, N_PAD)
    full = _run(boxes, scores, valid, 0.3)
    assert len(full) > 3
    idx, count = jax.jit(nms_padded, static_argnames="max_out")(boxes, scores, valid, 0.3, max_out=3)
    assert int(count) == 3
    np.testing.assert_array_equal(np.asarray(idx), full[:3])


def test_keep_mask_agrees_with_indices():
    rng = np.random.default_rng(5)
    boxes, scores, valid = _random_case(rng, 30)
    keep = np.asarray(_KEEP(boxes, scores, valid, 0.3))
    np.testing.assert_array_equal(np.flatnonzero(keep), np.sort(_reference(boxes, scores, valid, 0.3)))


def test_batched_nms_shared_and_per_class_boxes():
    rng = np.random.default_rng(11)
    num_classes = 3
    boxes, _, _ = _random_case(rng, N_PAD)
    scores = rng.random((num_classes, N_PAD)).astype(np.float32)
    valid = rng.random((num_classes, N_PAD)) < 0.8
    idx, count = _BATCHED(boxes, scores, valid, 0.3, max_out=N_PAD)
    assert idx.shape == (num_classes, N_PAD) and count.shape == (num_classes,)
    for c in range(num_classes):
        ref = _reference(boxes, scores[c], valid[c], 0.3)
        assert int(count[c]) == len(ref)
        np.testing.assert_array_equal(np.asarray(idx[c, : len(ref)]), ref)

    per_class = np.stack([_random_case(rng, N_PAD)[0] for _ in range(num_classes)])  # (C, N, 4)
    idx, count = _BATCHED(per_class, scores, valid, 0.5, max_out=N_PAD)
    for c in range(num_classes):
        ref = _reference(per_class[c], scores[c], valid[c], 0.5)
        np.testing.assert_array_equal(np.asarray(idx[c, : int(count[c])]), ref)

    with pytest.raises(ValueError):
        batched_nms(boxes[:5], scores)


def test_top_k_detections_and_padding():
    scores = np.array([[0.5, 0.9, 0.1], [0.9, 0.7, 0.3]], np.float32)
    valid = np.array([[True, True, False], [True, True, True]])
    cls, slot, sel = _TOP_K(scores, valid, k=4)
    # Order: .9 (0,1) and .9 (1,0) tie -> class-major flat index first.
    np.testing.assert_array_equal(np.asarray(cls), [0, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(slot), [1, 0, 1, 0])
    assert np.asarray(sel).all()
    # k larger than the number of entries: padded with -1 / False.
    cls, slot, sel = _TOP_K(scores, valid, k=8)
    assert np.asarray(sel).sum() == 5
    assert np.all(np.asarray(cls)[5:] == -1) and np.all(np.asarray(slot)[5:] == -1)


def test_multiclass_nms_matches_numpy_composition():
    rng = np.random.default_rng(21)
    boxes, _, _ = _random_case(rng, N_PAD)
    scores = rng.random((2, N_PAD)).astype(np.float32)
    valid = scores > 0.2
    det = jax.jit(multiclass_nms, static_argnames=("max_per_class", "max_per_image"))(
        boxes, scores, valid, 0.3, max_per_class=10, max_per_image=12
    )
    ref = []
    for c in range(2):
        kept = _reference(boxes, scores[c], valid[c], 0.3)[:10]
        ref += [(-scores[c, i], c, i) for i in kept]
    ref = sorted(ref)[:12]
    n = int(np.asarray(det.valid).sum())
    assert n == len(ref)
    np.testing.assert_array_equal(np.asarray(det.classes[:n]), [c for _, c, _ in ref])
    np.testing.assert_array_equal(np.asarray(det.indices[:n]), [i for _, _, i in ref])
    np.testing.assert_array_equal(np.asarray(det.boxes[:n]), boxes[[i for _, _, i in ref]])
    np.testing.assert_array_equal(np.asarray(det.scores[:n]), [-s for s, _, _ in ref])
