"""Tests for spp_jax.detection.voc_eval (VOC 2007 devkit AP)."""

from fractions import Fraction

import numpy as np
import pytest
from reference import iou_voc

from spp_jax.detection.nms import Detections
from spp_jax.detection.voc_eval import (
    detections_by_class,
    mean_ap,
    voc_ap_11point,
    voc_ap_area,
    voc_ap_per_class,
)

A = [0, 0, 9, 9]
B = [20, 20, 29, 29]
FAR = [50, 50, 59, 59]


def test_hand_case_duplicate_is_false_positive():
    # One image, two ground-truth boxes A and B (non-difficult), npos = 2.
    gt = {"im": (np.array([A, B]), np.array([False, False]))}
    ids = ["im"] * 4
    scores = [0.9, 0.8, 0.7, 0.6]
    boxes = [A, A, FAR, B]  # TP on A, duplicate of A, miss, TP on B
    res = voc_ap_per_class(ids, scores, boxes, gt)
    # det   TP FP  recall  precision
    # .9     1  0   1/2     1
    # .8     1  1   1/2     1/2
    # .7     1  2   1/2     1/3
    # .6     2  2   1       1/2
    np.testing.assert_array_equal(res.is_tp, [1, 0, 0, 1])
    np.testing.assert_allclose(res.recall, [0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(res.precision, [1, 0.5, 1 / 3, 0.5])
    # 11-point: t = 0 .. 0.5 (6 points) -> best precision 1 (at recall 1/2);
    # t = 0.6 .. 1 (5 points) -> best precision at recall >= t is 1/2.
    assert res.ap == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    assert res.num_positives == 2
    # Area AP: envelope is 1 on (0, 1/2] and 1/2 on (1/2, 1] -> 0.5 + 0.25.
    res10 = voc_ap_per_class(ids, scores, boxes, gt, use_07_metric=False)
    assert res10.ap == pytest.approx(0.75)


def test_difficult_ground_truth_is_ignored():
    # A is difficult, B is not: npos = 1.
    gt = {"im": (np.array([A, B]), np.array([True, False]))}
    res = voc_ap_per_class(["im"] * 3, [0.9, 0.8, 0.7], [A, B, A], gt)
    # .9 hits difficult A -> ignored; .8 hits B -> TP (recall 1, precision 1);
    # .7 hits A again -> still ignored, not a duplicate FP.
    np.testing.assert_array_equal(res.is_tp, [-1, 1, -1])
    np.testing.assert_allclose(res.recall, [1.0])
    np.testing.assert_allclose(res.precision, [1.0])
    assert res.ap == pytest.approx(1.0)


def test_devkit_best_box_already_matched_is_false_positive():
    # G1 = A and G2 (10 x 12, IoU with A = 100/120) overlap. Detection 2 is
    # best matched to G1 (IoU 1 > 0.83), already taken -> FP in the devkit,
    # even though G2 also overlaps it by >= 0.5.
    g2 = [0, 0, 9, 11]
    gt = {"im": (np.array([A, g2]), np.zeros(2, bool))}
    res = voc_ap_per_class(["im"] * 2, [0.9, 0.8], [A, A], gt)
    np.testing.assert_array_equal(res.is_tp, [1, 0])
    np.testing.assert_allclose(res.recall, [0.5, 0.5])


def test_iou_exactly_half_matches():
    gt = {"im": (np.array([A]), np.zeros(1, bool))}
    # [0, 0, 9, 19] contains A: IoU = 100 / 200 = 0.5 (+1 convention) -> TP.
    assert voc_ap_per_class(["im"], [1.0], [[0, 0, 9, 19]], gt).is_tp[0] == 1
    # One more row: 100 / 210 < 0.5 -> FP.
    assert voc_ap_per_class(["im"], [1.0], [[0, 0, 9, 20]], gt).is_tp[0] == 0


def test_perfect_no_detections_and_unknown_images():
    gt = {"a": (np.array([A, B]), np.zeros(2, bool)), "b": (np.array([B]), np.zeros(1, bool))}
    perfect = voc_ap_per_class(["a", "b", "a"], [0.9, 0.8, 0.7], [A, B, B], gt)
    assert perfect.ap == pytest.approx(1.0)
    assert voc_ap_per_class(["a", "b", "a"], [0.9, 0.8, 0.7], [A, B, B], gt, use_07_metric=False).ap == pytest.approx(1.0)
    empty = voc_ap_per_class([], [], np.zeros((0, 4)), gt)
    assert empty.ap == 0.0 and empty.recall.shape == (0,)
    # Detections on an image absent from gt are false positives.
    res = voc_ap_per_class(["zzz", "a"], [0.9, 0.8], [A, A], gt)
    np.testing.assert_array_equal(res.is_tp, [0, 1])


def test_class_without_positives_is_nan():
    gt = {"im": (np.array([A]), np.array([True]))}  # only a difficult box
    assert np.isnan(voc_ap_per_class(["im"], [0.5], [A], gt).ap)
    assert np.isnan(voc_ap_per_class([], [], np.zeros((0, 4)), {}).ap)


def test_11_point_threshold_exact_tenths():
    # Recall exactly 3/10 must count for t = 0.3: t in {0, .1, .2, .3} -> 4/11.
    assert voc_ap_11point([3 / 10], [1.0]) == pytest.approx(4 / 11)
    assert voc_ap_11point([6 / 20], [1.0]) == pytest.approx(4 / 11)
    assert voc_ap_11point([], []) == 0.0
    assert voc_ap_area([], []) == 0.0


# ---------------------------------------------------------------------------
# Brute-force reference: the devkit loop written naively, exact fractions.
# ---------------------------------------------------------------------------


def _reference_ap(ids, scores, boxes, gt):
    """Returns (11-point AP, area AP) as Fractions, or None if npos == 0."""
    npos = sum(int((~d).sum()) for _, d in gt.values())
    detected = {k: [False] * len(v[0]) for k, v in gt.items()}
    order = sorted(range(len(scores)), key=lambda d: -scores[d])  # stable
    tp = fp = 0
    points = []  # (recall, precision) as exact fractions
    for d in order:
        gboxes, diff = gt.get(ids[d], (np.zeros((0, 4)), np.zeros(0, bool)))
        ovmax, jmax = -1.0, -1
        for j, g in enumerate(gboxes):
            ov = iou_voc(boxes[d], g)
            if ov > ovmax:
                ovmax, jmax = ov, j
        if ovmax >= 0.5:
            if diff[jmax]:
                continue
            if not detected[ids[d]][jmax]:
                detected[ids[d]][jmax] = True
                tp += 1
            else:
                fp += 1
        else:
            fp += 1
        points.append((Fraction(tp, npos) if npos else None, Fraction(tp, tp + fp)))
    if npos == 0:
        return None
    ap11 = Fraction(0)
    for k in range(11):
        reached = [p for r, p in points if r >= Fraction(k, 10)]
        ap11 += max(reached) if reached else 0
    ap11 /= 11
    # Area: for each recall level reached, (level - previous level) times
    # the best precision at any recall >= that level.
    area, prev = Fraction(0), Fraction(0)
    for level in sorted({r for r, _ in points}):
        if level > prev:
            area += (level - prev) * max(p for r, p in points if r >= level)
            prev = level
    return ap11, area


def _random_dataset(rng, num_images=6):
    gt = {}
    for i in range(num_images):
        n = int(rng.integers(0, 5))
        xy = rng.integers(0, 60, (n, 2))
        wh = rng.integers(5, 30, (n, 2))
        gt[f"img{i}"] = (np.concatenate([xy, xy + wh - 1], 1), rng.random(n) < 0.25)
    ids, boxes = [], []
    for _ in range(int(rng.integers(0, 40))):
        image = f"img{int(rng.integers(0, num_images + 1))}"  # may be an image with no gt entry
        gboxes = gt.get(image, (np.zeros((0, 4), int), None))[0]
        if len(gboxes) and rng.random() < 0.7:  # a jittered copy of a gt box
            box = gboxes[rng.integers(0, len(gboxes))] + rng.integers(-4, 5, 4)
        else:
            xy = rng.integers(0, 60, 2)
            box = np.concatenate([xy, xy + rng.integers(5, 30, 2) - 1])
        ids.append(image)
        boxes.append(box)
    scores = rng.integers(0, 8, len(ids)) / 8  # coarse scores -> ties
    return ids, scores, np.array(boxes, float).reshape(-1, 4), gt


def test_matches_brute_force_reference_on_random_cases():
    rng = np.random.default_rng(2024)
    for case in range(200):
        ids, scores, boxes, gt = _random_dataset(rng)
        ref = _reference_ap(ids, list(scores), boxes.tolist(), gt)
        got07 = voc_ap_per_class(ids, scores, boxes, gt).ap
        got10 = voc_ap_per_class(ids, scores, boxes, gt, use_07_metric=False).ap
        if ref is None:
            assert np.isnan(got07) and np.isnan(got10), case
        else:
            assert got07 == pytest.approx(float(ref[0]), abs=1e-12), case
            assert got10 == pytest.approx(float(ref[1]), abs=1e-12), case


def test_mean_ap_over_classes():
    gt = {
        "a": {"boxes": [A, B], "labels": ["cat", "dog"], "difficult": [False, False]},
        "b": ([B, FAR], ["cat", "bird"], [False, True]),  # bird only difficult -> NaN
        "c": (np.zeros((0, 4)), [], []),  # an image with no objects
    }
    detections = {
        "cat": (["a", "b", "c"], [0.9, 0.8, 0.95], [A, B, A]),
        "dog": (["a"], [0.5], [A]),  # IoU(A, B) = 0 -> FP, AP 0
        "bird": (["b"], [0.5], [FAR]),
    }
    aps, m = mean_ap(detections, gt)
    assert list(aps) == ["bird", "cat", "dog"]
    assert np.isnan(aps["bird"])
    # cat: FP (.95), TP, TP -> recall 1/2, 1 with precision 1/2, 2/3 -> 11-point AP 2/3.
    assert aps["cat"] == pytest.approx(2 / 3)
    assert aps["dog"] == 0.0
    assert m == pytest.approx((2 / 3 + 0) / 2)
    # Explicit class list; a class with no detections gets AP 0.
    aps, m = mean_ap({"cat": detections["cat"]}, gt, classes=["dog", "cat"])
    assert list(aps) == ["dog", "cat"] and aps["dog"] == 0.0
    # No class with positives at all -> NaN mAP.
    assert np.isnan(mean_ap({}, {"x": ([FAR], ["bird"], [True])})[1])


def test_detections_by_class_round_trip():
    det = Detections(
        boxes=np.array([A, B, FAR], float),
        scores=np.array([0.9, 0.8, 0.0]),
        classes=np.array([1, 0, -1]),
        indices=np.array([4, 2, -1]),
        valid=np.array([True, True, False]),
    )
    grouped = detections_by_class({"im1": det, "im2": (np.array([B]), np.array([0.7]), np.array([1]))})
    assert sorted(grouped) == [0, 1]
    ids, scores, boxes = grouped[1]
    assert ids == ["im1", "im2"]
    np.testing.assert_allclose(scores, [0.9, 0.7])
    np.testing.assert_allclose(boxes, [A, B])
    gt = {"im1": ([A, B], [1, 0], [False, False]), "im2": ([B], [1], [False])}
    aps, m = mean_ap(grouped, gt)
    assert aps == {0: 1.0, 1: 1.0} and m == 1.0
