"""Transfer classification metrics and splits: VOC classification AP, Caltech101 sampling, SVMs."""
import numpy as np
import pytest

from spp_jax.transfer import classify


def test_voc_cls_ap_hand_computed():
    # Ranking: +, -, +, -, -  (2 positives).  After each image: recall 0.5, 0.5, 1, 1, 1;
    # precision 1, 1/2, 2/3, 2/4, 2/5.  11-point: t = 0..0.5 -> 1 (6 points), t = 0.6..1 -> 2/3 (5 points).
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    gt = np.array([1, -1, 1, -1, -1])
    assert classify.voc_cls_ap(scores, gt) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # Input order does not matter, only the ranking.
    perm = np.array([3, 0, 4, 2, 1])
    assert classify.voc_cls_ap(scores[perm], gt[perm]) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # Perfect and worst rankings.
    assert classify.voc_cls_ap([3, 2, 1, 0], [1, 1, -1, -1]) == pytest.approx(1.0)
    # worst: positives last: recall 0.5 at precision 1/3, recall 1 at 2/4
    assert classify.voc_cls_ap([3, 2, 1, 0], [-1, -1, 1, 1]) == pytest.approx(11 * 0.5 / 11)


def test_voc_cls_ap_ignores_difficult_and_handles_ties():
    # A "difficult only" (0) image ranked first is neither TP nor FP.
    assert classify.voc_cls_ap([5, 4, 3], [0, 1, -1]) == pytest.approx(1.0)
    # Same with it ranked between: + 0 - +: precision 1 at recall 0.5, 2/3 at recall 1.
    assert classify.voc_cls_ap([4, 3, 2, 1], [1, 0, -1, 1]) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # Ties keep the input order (stable sort, as the devkit's MATLAB sort).
    assert classify.voc_cls_ap([1, 1], [-1, 1]) == pytest.approx(0.5)
    assert classify.voc_cls_ap([1, 1], [1, -1]) == pytest.approx(1.0)
    assert np.isnan(classify.voc_cls_ap([1, 2], [-1, -1]))
    ap, m = classify.voc_cls_map(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1, -1], [-1, -1]]))
    assert ap[0] == 1.0 and np.isnan(ap[1]) and m == 1.0


def test_voc_cls_ap_matches_sklearn_style_reference():
    # Against an independent 11-point computation with explicit loops.
    rng = np.random.default_rng(0)
    s, g = rng.normal(size=50), rng.choice([-1, 1, 0], size=50, p=[0.6, 0.3, 0.1])
    order = np.argsort(-s, kind="stable")
    tp = fp = 0
    pts = []
    for i in order:
        tp += g[i] == 1
        fp += g[i] == -1
        pts.append((tp / (g == 1).sum(), tp / max(tp + fp, 1e-300)))
    ref = np.mean([max([p for r, p in pts if r >= t / 10] or [0]) for t in range(11)])
    assert classify.voc_cls_ap(s, g) == pytest.approx(ref)


def test_caltech_split_sampling():
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate([31, 40, 95, 60])])
    rng.shuffle(labels)
    tr, te = classify.sample_split(labels, 4, 30, 50, seed=3)
    assert len(np.intersect1d(tr, te)) == 0
    for c, n in enumerate([31, 40, 95, 60]):
        assert np.sum(labels[tr] == c) == 30
        assert np.sum(labels[te] == c) == min(50, n - 30)
    tr2, te2 = classify.sample_split(labels, 4, 30, 50, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)  # deterministic per seed
    tr3, _ = classify.sample_split(labels, 4, 30, 50, seed=4)
    assert not np.array_equal(tr, tr3)
    with pytest.raises(ValueError, match="fewer than 31"):
        classify.sample_split(np.array([0] * 30 + [1] * 40), 2, 30, 50)


def test_svms_separate_easy_classes():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 20)) * 3
    labels = np.repeat(np.arange(3), 40)
    X = centers[labels] + rng.normal(size=(120, 20))
    out = classify.caltech_classification(X, labels, 3, splits=2, train_per_class=10, test_per_class=50, C=10.0)
    assert out["mean"] > 0.95 and len(out["accuracy"]) == 2
    y = np.where(np.eye(3, dtype=bool)[labels], 1, -1).astype(np.int8)
    r = classify.voc_classification(X[::2], y[::2], X[1::2], y[1::2], C=10.0)
    assert r["map"] > 0.95 and r["ap"].shape == (3,)
    assert classify.mean_class_accuracy([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((1 + 2 / 3) / 2)


def test_svms_in_row_space_equal_direct_solve():
    # D > N: the SVMs are solved on an orthonormal basis of the training rows; same models.
    from spp_jax.svm import l2_normalize, train_linear_svms

    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(60, 400))).astype(np.float32)
    Y = np.where(rng.random((3, 60)) < 0.3, 1, -1).astype(np.int8)
    X[:, :10] += 2.0 * (Y[0] > 0)[:, None]
    got = classify.train_svms(X, Y, C=1.0)
    ref = train_linear_svms(l2_normalize(X), Y, C=1.0, pos_weight=1.0, bias_value=1.0,
                            **classify.SOLVER_DEFAULTS)
    np.testing.assert_allclose(got.weights, ref.weights, atol=1e-4)
    np.testing.assert_allclose(got.biases, ref.biases, atol=1e-4)
    Q = classify.row_space_basis(X)
    assert Q.shape == (400, 60)
    np.testing.assert_allclose(Q.T @ Q, np.eye(60), atol=1e-4)
