"""Fine-tuning fc6, fc7 and a new (K+1)-way fc8 on cached pool5 features (SPP_FACTS section 6).

The conv layers are never fine-tuned, so training needs only the cached pool5
vectors of the windows. Window labels (:func:`window_labels`): the class + 1
of the ground-truth box with the highest IoU when that IoU >= 0.5; background
0 when the highest IoU is in [0.1, 0.5); other windows are not used.

Mini-batches: 128 windows, 25% foreground (fewer if the data has fewer), the
rest background, drawn uniformly from all windows of the training images.
SGD with momentum 0.9, weight decay 5e-4 on the kernels, dropout 0.5 on fc6
and fc7; learning rate 1e-4 then 1e-5 (the paper's 250k + 50k iterations on
VOC 2007's 5011 trainval images, scaled by default to the number of training
images: :func:`default_iters`). A held-out part of trainval (never test) is
evaluated every ``eval_every`` iterations; the parameters with the lowest
held-out loss are returned.

Memory: the features of all foreground windows and of the background windows
(at most ``max_bg_per_image`` per image, uniformly sampled) are loaded into
RAM as float32.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax.detection.boxes import pairwise_iou
from spp_jax.models import Head

log = logging.getLogger(__name__)

FG_IOU = 0.5
BG_IOU = (0.1, 0.5)
PAPER_ITERS = (250_000, 50_000)
PAPER_IMAGES = 5011  # VOC 2007 trainval

__all__ = ["FinetuneConfig", "FinetuneResult", "window_labels", "default_iters", "sample_batch",
           "gather_windows", "new_head_params", "two_step_sgd", "finetune", "finetune_arrays"]


def window_labels(boxes, gt_boxes, gt_labels, fg_iou: float = FG_IOU,
                  bg_iou: tuple[float, float] = BG_IOU) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tuning label of every window.

    Args:
      boxes: (R, 4) windows; gt_boxes: (G, 4); gt_labels: (G,) 0-based classes.
    Returns:
      labels (R,) int32: class + 1 (foreground), 0 (background) or -1 (unused);
      max_iou (R,) float32.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(gt_boxes) == 0:
        iou = np.zeros(len(boxes), np.float32)
        lab = np.where(iou >= bg_iou[0], 0, -1).astype(np.int32)  # no object: nothing >= 0.1
        return lab, iou
    ious = pairwise_iou(boxes, np.asarray(gt_boxes, np.float32))  # (R, G)
    j = ious.argmax(1)
    iou = ious[np.arange(len(boxes)), j].astype(np.float32)
    lab = np.full(len(boxes), -1, np.int32)
    lab[(iou >= bg_iou[0]) & (iou < bg_iou[1])] = 0
    fg = iou >= fg_iou
    lab[fg] = np.asarray(gt_labels)[j[fg]] + 1
    return lab, iou


def default_iters(n_images: int, scale: float = 1.0) -> tuple[int, int]:
    """The paper's (250k, 50k) iterations scaled by ``n_images / 5011`` (and ``scale``), >= (10, 2)."""
    f = scale * n_images / PAPER_IMAGES
    return max(10, round(PAPER_ITERS[0] * f)), max(2, round(PAPER_ITERS[1] * f))


@dataclasses.dataclass
class FinetuneConfig:
    """Settings (defaults: the paper / released code)."""

    batch: int = 128
    fg_fraction: float = 0.25
    lrs: tuple[float, float] = (1e-4, 1e-5)
    iters: tuple[int, int] | None = None  # None: default_iters(n_train_images, iter_scale)
    iter_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    holdout_fraction: float = 0.1
    eval_every: int = 500
    max_bg_per_image: int | None = None
    seed: int = 0


@dataclasses.dataclass
class FinetuneResult:
    """params: {"fc6", "fc7", "fc8"} of the chosen checkpoint (fc8 is (K+1)-way);
    best_iter: its iteration; history: dicts (iter, lr, train_loss, holdout_loss, holdout_acc);
    seconds: wall time."""

    params: dict
    best_iter: int
    history: list
    seconds: float


def sample_batch(rng: np.random.Generator, fg_idx: np.ndarray, bg_idx: np.ndarray, batch: int = 128,
                 fg_fraction: float = 0.25, replace: bool = True) -> np.ndarray:
    """Indices of one mini-batch: round(batch * fg_fraction) foreground (fewer if fewer exist), rest background.

    ``replace=True`` (fine-tuning on cached windows): always ``batch`` indices, drawn without
    replacement when a pool is large enough, else with (and all foreground when there is no
    background). ``replace=False`` (one image's windows, :mod:`~spp_jax.detection.finetune_conv`):
    never a window twice, so fewer than ``batch`` indices when the image has too few windows;
    the foreground share stays capped at ``fg_fraction``.
    """
    if len(fg_idx) == 0 and len(bg_idx) == 0:
        raise ValueError("no foreground or background windows to sample from")
    n_fg = min(int(round(batch * fg_fraction)), len(fg_idx))
    n_bg = batch - n_fg
    if not replace:
        n_bg = min(n_bg, len(bg_idx))
    elif len(bg_idx) == 0:
        n_fg, n_bg = batch, 0
    parts = []
    for pool, n in ((fg_idx, n_fg), (bg_idx, n_bg)):
        if n:
            parts.append(rng.choice(pool, n, replace=replace and len(pool) < n))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def gather_windows(entries, max_bg_per_image: int | None = None, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Foreground + background windows of cached images -> (X (N, D) float32, y (N,) int32).

    ``entries``: iterable of :class:`~spp_jax.detection.cache.CachedImage`.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for e in entries:
        lab, _ = window_labels(e.boxes, e.gt_boxes, e.gt_labels)
        fg = np.flatnonzero(lab > 0)
        bg = np.flatnonzero(lab == 0)
        if max_bg_per_image is not None and len(bg) > max_bg_per_image:
            bg = rng.choice(bg, max_bg_per_image, replace=False)
        keep = np.concatenate([fg, bg])
        xs.append(e.pool5[keep])
        ys.append(lab[keep])
    if not xs:
        raise ValueError("no images to fine-tune on")
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int32)


def new_head_params(pretrained: dict, num_classes: int, seed: int = 0) -> dict:
    """fc6, fc7 copied from ``pretrained`` (a Head's params) + a new fc8 (Gaussian std 0.01, zero bias)."""
    fc_dim = pretrained["fc7"]["kernel"].shape[1]
    rng = np.random.default_rng(seed)
    fc8 = {"kernel": jnp.asarray(rng.normal(0, 0.01, (fc_dim, num_classes)), jnp.float32),
           "bias": jnp.zeros((num_classes,), jnp.float32)}
    return {"fc6": jax.tree.map(jnp.asarray, pretrained["fc6"]),
            "fc7": jax.tree.map(jnp.asarray, pretrained["fc7"]), "fc8": fc8}


BLOCK_BYTES = 64 << 20  # the mini-batches of one compiled block of steps, gathered on the host


def _make_fns(head: Head, tx):
    def loss_fn(params, x, y, key, train):
        out = head.apply({"params": params}, x, train=train, rngs={"dropout": key} if train else None)
        logits = out["logits"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return loss.mean(), (logits.argmax(-1) == y).mean()

    @jax.jit
    def steps(params, opt_state, key, xs, ys):
        """L steps, one per (batch, D) slice of ``xs`` (L, batch, D) / ``ys`` (L, batch): one
        dispatch instead of L (15 % faster per step on fc6/fc7 of the embedded ZF-5; the same
        floats as separate steps). The dropout key splits as a loop of steps would."""
        def body(carry, xy):
            p, o, k = carry
            k, sub = jax.random.split(k)
            (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, xy[0], xy[1], sub, True)
            updates, o = tx.update(g, o, p)
            return (optax.apply_updates(p, updates), o, k), loss
        (params, opt_state, key), losses = jax.lax.scan(body, (params, opt_state, key), (xs, ys))
        return params, opt_state, key, losses

    @jax.jit
    def evaluate(params, x, y, w):
        out = head.apply({"params": params}, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"].astype(jnp.float32), y)
        correct = (out["logits"].argmax(-1) == y)
        return (loss * w).sum(), (correct * w).sum()

    return steps, evaluate


def _block_len(eval_every: int, batch: int, dim: int) -> int:
    """Steps per compiled block: the largest divisor of ``eval_every`` whose mini-batches fit
    in :data:`BLOCK_BYTES` (so blocks end on evaluation points), at least 1."""
    cap = max(1, BLOCK_BYTES // max(1, batch * dim * 4))
    return max(d for d in range(1, min(cap, eval_every) + 1) if eval_every % d == 0)


def two_step_sgd(lrs: Sequence[float], n1: int, weight_decay: float, momentum: float):
    """(optax transform, lr schedule): SGD with momentum at ``lrs[0]`` for ``n1`` iterations, then
    ``lrs[1]``; L2 weight decay on kernels only (biases are not decayed, as in the released code).
    Shared by the fc fine-tuning here and the end-to-end one (:mod:`.finetune_conv`)."""
    sched = optax.piecewise_constant_schedule(lrs[0], {int(n1): lrs[1] / lrs[0]})
    kernels = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731 - kernels only
        lambda path, _: jax.tree_util.keystr(path).endswith("['kernel']"), p)
    return optax.chain(optax.add_decayed_weights(weight_decay, kernels),
                       optax.sgd(sched, momentum=momentum)), sched


def finetune_arrays(X: np.ndarray, y: np.ndarray, pretrained: dict, num_classes: int, *,
                    X_hold: np.ndarray | None = None, y_hold: np.ndarray | None = None,
                    iters: Sequence[int], config: FinetuneConfig = FinetuneConfig(),
                    log_fn: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune on in-memory windows.

    Args:
      X: (N, D) float32 pool5; y: (N,) int labels in 0..num_classes-1 (0 = background).
      pretrained: Head params with fc6, fc7 (fc8 is replaced).
      num_classes: K + 1.
      X_hold, y_hold: held-out windows (None: pick the last iteration).
      iters: (n1, n2) iterations at lrs[0], lrs[1].
    """
    t0 = time.perf_counter()
    c = config
    fc_dim = pretrained["fc7"]["kernel"].shape[1]
    head = Head(num_classes, fc_dim, c.dropout)
    n1, n2 = int(iters[0]), int(iters[1])
    tx, sched = two_step_sgd(c.lrs, n1, c.weight_decay, c.momentum)
    params = new_head_params(pretrained, num_classes, c.seed)
    opt_state = tx.init(params)
    steps, evaluate = _make_fns(head, tx)
    rng = np.random.default_rng(c.seed)
    key = jax.random.PRNGKey(c.seed)
    fg_idx, bg_idx = np.flatnonzero(y > 0), np.flatnonzero(y == 0)
    log_fn = log_fn or log.info
    log_fn(f"fine-tuning: {len(fg_idx)} fg / {len(bg_idx)} bg windows, {n1} + {n2} iterations, "
           f"batch {c.batch} ({c.fg_fraction:.0%} fg)")

    def hold_metrics(p):
        if X_hold is None or len(X_hold) == 0:
            return float("nan"), float("nan")
        bs, tot_l, tot_a = 512, 0.0, 0.0
        for i in range(0, len(X_hold), bs):
            xb, yb = X_hold[i:i + bs], y_hold[i:i + bs]
            w = np.ones(bs, np.float32)
            if len(xb) < bs:  # pad to one static shape, zero weight on padding
                pad = bs - len(xb)
                w[len(xb):] = 0
                xb = np.concatenate([xb, np.zeros((pad, xb.shape[1]), np.float32)])
                yb = np.concatenate([yb, np.zeros(pad, np.int32)])
            l, a = evaluate(p, jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(w))
            tot_l += float(l)
            tot_a += float(a)
        return tot_l / len(X_hold), tot_a / len(X_hold)

    best = (float("inf"), 0, params)
    history, run_loss = [], []
    total = n1 + n2
    block = _block_len(c.eval_every, c.batch, X.shape[1])
    it = 0
    while it < total:
        n = min(block, total - it)  # a shorter last block: one more compiled length
        idx = np.stack([sample_batch(rng, fg_idx, bg_idx, c.batch, c.fg_fraction) for _ in range(n)])
        params, opt_state, key, losses = steps(params, opt_state, key, jnp.asarray(X[idx]),
                                               jnp.asarray(y[idx]))
        run_loss.append(losses)
        it += n
        if it % c.eval_every == 0 or it == total:
            hl, ha = hold_metrics(params)
            tl = float(np.mean(np.concatenate([np.asarray(v) for v in run_loss]), dtype=np.float64))
            run_loss = []
            history.append({"iter": it, "lr": float(sched(it - 1)), "train_loss": tl,
                            "holdout_loss": hl, "holdout_acc": ha})
            log_fn(f"finetune iter {it}/{total}: train loss {tl:.4f}, held-out loss {hl:.4f}, acc {ha:.3f}")
            score = hl if not math.isnan(hl) else -it  # no hold-out: the last checkpoint
            if score <= best[0]:
                best = (score, it, params)
    return FinetuneResult(jax.tree.map(np.asarray, best[2]), best[1], history, time.perf_counter() - t0)


def finetune(cache, pretrained: dict, num_classes: int, config: FinetuneConfig = FinetuneConfig(),
             flips: bool = False, log_fn: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune fc6/fc7/fc8 on a trainval :class:`~spp_jax.detection.cache.FeatureCache`.

    A random ``holdout_fraction`` of the cached images (at least one when there
    are >= 2) is held out for checkpoint selection. ``flips``: also train on the
    cached flipped copies of the training images. ``num_classes`` = K + 1.
    """
    ids = list(cache.ids)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(ids))
    n_hold = min(len(ids) - 1, max(1, int(round(config.holdout_fraction * len(ids))))) if len(ids) > 1 else 0
    hold = [ids[i] for i in order[:n_hold]]
    train = [ids[i] for i in order[n_hold:]]
    load = lambda i, fl=False: cache.load(i, fl)  # noqa: E731
    entries = [load(i) for i in train] + ([load(i, True) for i in train if cache.has(i, True)]
                                          if flips else [])
    X, y = gather_windows(entries, config.max_bg_per_image, config.seed)
    Xh = yh = None
    if hold:
        Xh, yh = gather_windows([load(i) for i in hold], config.max_bg_per_image, config.seed + 1)
    iters = config.iters or default_iters(len(train), config.iter_scale)
    return finetune_arrays(X, y, pretrained, num_classes, X_hold=Xh, y_hold=yh, iters=iters,
                           config=config, log_fn=log_fn)
