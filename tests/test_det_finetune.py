import numpy as np

from spp_jax.detection.finetune import (FinetuneConfig, finetune_arrays, sample_batch, window_labels,
                                        default_iters)


def test_window_labels_hand_case():
    gt = np.array([[0, 0, 9, 9]], np.float32)
    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 4], [0, 0, 9, 1], [50, 50, 60, 60]], np.float32)
    lab, iou = window_labels(boxes, gt, np.array([3]))
    np.testing.assert_allclose(iou, [1.0, 0.5, 0.2, 0.0])
    np.testing.assert_array_equal(lab, [4, 4, 0, -1])
    lab0, _ = window_labels(boxes, np.zeros((0, 4)), np.zeros(0))
    assert (lab0 == -1).all()


def test_batch_composition():
    rng = np.random.default_rng(0)
    fg, bg = np.arange(100), np.arange(100, 1000)
    idx = sample_batch(rng, fg, bg, 128, 0.25)
    assert len(idx) == 128 and (idx < 100).sum() == 32
    few = sample_batch(rng, fg[:5], bg, 128, 0.25)
    assert (few < 100).sum() == 5 and len(few) == 128
    assert default_iters(5011) == (250_000, 50_000)


def test_loss_decreases_on_separable_toy():
    rng = np.random.default_rng(0)
    d, k, n = 40, 3, 600
    centers = rng.normal(0, 3, (k + 1, d))
    y = rng.integers(0, k + 1, n).astype(np.int32)
    X = (centers[y] + rng.normal(0, 1, (n, d))).astype(np.float32)
    fc_dim = 32
    pre = {"fc6": {"kernel": rng.normal(0, np.sqrt(2 / d), (d, fc_dim)).astype(np.float32),
                   "bias": np.zeros(fc_dim, np.float32)},
           "fc7": {"kernel": rng.normal(0, np.sqrt(2 / fc_dim), (fc_dim, fc_dim)).astype(np.float32),
                   "bias": np.zeros(fc_dim, np.float32)}}
    cfg = FinetuneConfig(lrs=(1e-2, 1e-3), eval_every=20, batch=64, dropout=0.0)
    res = finetune_arrays(X[:500], y[:500], pre, k + 1, X_hold=X[500:], y_hold=y[500:], iters=(50, 10),
                          config=cfg)
    h = res.history
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"]
    assert h[-1]["holdout_acc"] > 0.8
    assert res.params["fc8"]["kernel"].shape == (fc_dim, k + 1)
    assert res.best_iter == min(h, key=lambda r: r["holdout_loss"])["iter"]
