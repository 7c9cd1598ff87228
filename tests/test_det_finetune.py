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


def test_blocks_of_steps_equal_single_steps(monkeypatch):
    """The compiled blocks of steps (scan) give the floats of one step per dispatch, dropout
    included, and end on the evaluation points; a hand-written loop of the same steps is the
    reference."""
    import jax
    import jax.numpy as jnp
    import optax
    from spp_jax.detection import finetune as F
    from spp_jax.models import Head
    rng = np.random.default_rng(1)
    d, k, n, fc_dim = 24, 3, 300, 16
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k + 1, n).astype(np.int32)
    pre = {name: {"kernel": rng.normal(0, 0.2, shape).astype(np.float32), "bias": np.zeros(shape[1], np.float32)}
           for name, shape in (("fc6", (d, fc_dim)), ("fc7", (fc_dim, fc_dim)))}
    cfg = FinetuneConfig(lrs=(1e-2, 1e-3), eval_every=10, batch=16, dropout=0.5)
    assert F._block_len(10, 16, d) == 10 and F._block_len(500, 128, 1600) == 50  # 64 MiB blocks
    res = finetune_arrays(X, y, pre, k + 1, iters=(17, 6), config=cfg)  # blocks of 10, 10, 3
    assert [h["iter"] for h in res.history] == [10, 20, 23] and res.best_iter == 23

    head = Head(k + 1, fc_dim, cfg.dropout)
    tx, _ = F.two_step_sgd(cfg.lrs, 17, cfg.weight_decay, cfg.momentum)
    params = F.new_head_params(pre, k + 1, cfg.seed)
    opt_state, key, r = tx.init(params), jax.random.PRNGKey(cfg.seed), np.random.default_rng(cfg.seed)
    fg, bg = np.flatnonzero(y > 0), np.flatnonzero(y == 0)

    def loss(p, xb, yb, sub):
        logits = head.apply({"params": p}, xb, train=True, rngs={"dropout": sub})["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    for _ in range(23):
        idx = sample_batch(r, fg, bg, cfg.batch, cfg.fg_fraction)
        key, sub = jax.random.split(key)
        g = jax.grad(loss)(params, jnp.asarray(X[idx]), jnp.asarray(y[idx]), sub)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), res.params,
                 jax.tree.map(np.asarray, params))
