import numpy as np

from spp_jax.detection.bbox_reg import fit_ridge, regression_samples, train_bbox_regressors
from spp_jax.detection.cache import CachedImage


def test_ridge_recovers_known_map_primal_and_dual():
    rng = np.random.default_rng(0)
    d = 20
    W = rng.normal(size=(d, 4))
    b = rng.normal(size=4)
    X = rng.normal(size=(200, d))
    T = X @ W + b
    Wh, bh = fit_ridge(X, T, lam=1e-6)  # primal (N >= D)
    np.testing.assert_allclose(Wh, W, atol=1e-4)
    np.testing.assert_allclose(bh, b, atol=1e-4)
    # dual path (N < D) equals the primal solution at the same lambda
    X2 = rng.normal(size=(15, 40))
    T2 = rng.normal(size=(15, 4))
    Wd, bd = fit_ridge(X2, T2, lam=3.0)
    Xc, Tc = X2 - X2.mean(0), T2 - T2.mean(0)
    Wp = np.linalg.solve(Xc.T @ Xc + 3.0 * np.eye(40), Xc.T @ Tc)
    np.testing.assert_allclose(Wd, Wp, atol=1e-4)
    # larger lambda shrinks the weights
    assert np.abs(fit_ridge(X, T, lam=4000.0)[0]).sum() < np.abs(Wh).sum()


def test_train_and_refine_recovers_boxes():
    """Features that linearly encode the targets -> regressors move windows onto the GT."""
    rng = np.random.default_rng(1)
    gt = np.array([[40, 40, 120, 100]], np.float32)
    entries = []
    for _ in range(6):
        jitter = rng.integers(-6, 7, (40, 4)).astype(np.float32)
        boxes = gt + jitter
        rows, cls, t = regression_samples(boxes, gt, np.array([2]))
        feats = np.zeros((len(boxes), 10), np.float32)
        feats[rows, :4] = t
        feats[:, 4:] = rng.normal(0, 0.01, (len(boxes), 6))
        entries.append(CachedImage(boxes, 0, feats, np.zeros(len(boxes), np.int64), gt, np.array([2]),
                                   np.zeros(1, bool), np.array([200, 200])))
    reg = train_bbox_regressors(entries, num_classes=3, feat_scale=1.0, lam=1e-3)
    assert reg.trained.tolist() == [False, False, True]
    e = entries[0]
    rows, cls, t = regression_samples(e.boxes, gt, np.array([2]))
    out = reg.refine(e.pool5[rows], e.boxes[rows], cls, (200, 200))
    np.testing.assert_allclose(out, np.repeat(gt, len(rows), 0), atol=0.5)
    # untrained classes leave boxes unchanged (after clipping)
    same = reg.refine(e.pool5[rows][:2], e.boxes[rows][:2], np.array([0, 1]), (200, 200))
    np.testing.assert_allclose(same, e.boxes[rows][:2])
