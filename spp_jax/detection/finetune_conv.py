"""End-to-end detection fine-tuning: conv layers from a chosen one up, with fc6, fc7 and a new fc8.

The paper fine-tunes fc6-fc8 only, on cached pool5 (:mod:`spp_jax.detection.finetune`), so its
conv layers never adapt to detection. ``roi_pool`` is differentiable, so here the loss of the
sampled windows flows back through window SPP into the conv layers (as Fast R-CNN later did):

* a mini-batch is ``images_per_batch`` whole images (default 2) at one scale drawn from the
  scale set, prepared by the :class:`~spp_jax.serve.Server` (shorter side resized, mean
  subtracted, padded at the bottom/right to a bucket shape with each image's ``valid_hw``, so
  every layer is masked to its image: exact features, and one compiled program per bucket);
* each image contributes ``windows_per_image`` windows (default 64) sampled by
  :func:`~spp_jax.detection.finetune.sample_batch` without replacement: 25 % foreground
  (IoU >= 0.5 with a ground-truth box, the class + 1), the rest background (best IoU in
  [0.1, 0.5)), labels from :func:`~spp_jax.detection.finetune.window_labels`. An image with
  fewer windows fills its slots with masked ones, which add exactly zero to loss and gradient;
* windows go through :func:`spp_jax.project_boxes` onto each image's valid conv map,
  :func:`spp_jax.roi_pool_cells` and the model's :class:`~spp_jax.models.Head` (dropout on,
  as in training); the loss is the mean softmax cross-entropy over the K + 1 classes of the
  unmasked windows;
* SGD with momentum 0.9 and weight decay 5e-4 on the kernels (as the fc fine-tuning), learning
  rate ``lrs[0]`` for ``iters[0]`` iterations, then ``lrs[1]`` for ``iters[1]``; by default
  Fast R-CNN's schedule (1e-3 for 30k iterations, 1e-4 for 10k, 2 images each, on VOC 2007's
  5011 trainval images) scaled to the number of training images (:func:`default_conv_iters`).

Conv layers below ``from_layer`` are frozen: they are a separate argument of the step, behind
``stop_gradient``, outside the optimiser, so no gradient is computed for them or for their
activations (the backward pass stops at ``from_layer``'s input) and they stay bit-identical.
The returned variables are a whole network (fc8 (K + 1)-way); serving them through a new
:class:`~spp_jax.serve.Server` gives a new fingerprint, hence new feature caches, so the
SVM, box-regression and test stages run unchanged on the fine-tuned features.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax import xla_options
from spp_jax.detection.boxes import flip_boxes_lr, scale_boxes
from spp_jax.detection.cache import valid_windows
from spp_jax.detection.finetune import new_head_params, sample_batch, two_step_sgd, window_labels
from spp_jax.errors import ConfigError
from spp_jax.models import Head, SPPNet
from spp_jax.roi import roi_pool_cells
from spp_jax.serve import Batch, Server

log = logging.getLogger(__name__)

NO_CONV = "fc6"  # from_layer value that trains fc6-fc8 only (on whole images)
# Fast R-CNN's VOC 2007 schedule (2 images per iteration): 30k at 1e-3, then 10k at 1e-4.
FAST_RCNN_ITERS = (30_000, 10_000)
VOC07_TRAINVAL = 5011

__all__ = ["NO_CONV", "default_conv_iters", "ConvFinetuneConfig", "ConvFinetuneResult", "ImageWindows", "WindowBatch",
           "trained_layers", "image_windows", "make_batch", "split_params", "merge_variables",
           "make_loss", "make_step", "finetune_conv"]


def default_conv_iters(n_images: int, scale: float = 1.0) -> tuple[int, int]:
    """Fast R-CNN's (30k, 10k) iterations scaled by ``n_images / 5011`` (and ``scale``), >= (2, 1):
    the same number of passes over the training images (16 at 2 images per iteration)."""
    f = scale * n_images / VOC07_TRAINVAL
    return max(2, round(FAST_RCNN_ITERS[0] * f)), max(1, round(FAST_RCNN_ITERS[1] * f))


@dataclasses.dataclass
class ConvFinetuneConfig:
    """Settings of end-to-end fine-tuning (see the module doc).

    from_layer: the lowest trained conv layer ("conv1".."conv5"), or "fc6" for fc6-fc8 only.
    """

    from_layer: str = "conv3"
    images_per_batch: int = 2
    windows_per_image: int = 64
    fg_fraction: float = 0.25
    scales: tuple[int, ...] = (688,)
    iters: tuple[int, int] | None = None  # None: default_conv_iters(training images, iter_scale)
    iter_scale: float = 1.0
    lrs: tuple[float, float] = (1e-3, 1e-4)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    flip: bool = False  # mirror each image of a batch with probability 1/2
    log_every: int = 50
    seed: int = 0

    def check(self) -> None:
        """ConfigError naming the first bad setting."""
        for name in ("images_per_batch", "windows_per_image", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.fg_fraction <= 1:
            raise ConfigError(f"fg_fraction must be in (0, 1], got {self.fg_fraction}")
        if self.iters is not None and (len(self.iters) != 2 or min(self.iters) < 0 or sum(self.iters) < 1):
            raise ConfigError(f"iters must be two counts >= 0, not both 0, got {self.iters}")
        if not self.iter_scale > 0:
            raise ConfigError(f"iter_scale must be > 0, got {self.iter_scale}")
        if len(self.lrs) != 2 or min(self.lrs) <= 0:
            raise ConfigError(f"lrs must be two rates > 0, got {self.lrs}")
        if not self.scales or min(self.scales) < 1:
            raise ConfigError(f"scales must be positive sides, got {self.scales}")


@dataclasses.dataclass
class ConvFinetuneResult:
    """model: the SPPNet with a (K + 1)-way fc8; variables: its {"params": {"backbone", "classifier"}};
    head: the fine-tuned {"fc6", "fc7", "fc8"}; trained: the trained conv layers (bottom up);
    history: dicts (iter, lr, train_loss, train_acc, seconds); seconds: wall time;
    seconds_per_iter: wall time per iteration after each bucket shape's first (compiling) one;
    shapes: the padded (B, H, W) batch shapes used (one compiled step each)."""

    model: SPPNet
    variables: dict
    head: dict
    trained: tuple[str, ...]
    history: list
    seconds: float
    seconds_per_iter: float
    shapes: list


@dataclasses.dataclass(frozen=True)
class ImageWindows:
    """One training image's windows: ``index`` into the records; boxes (R, 4) float32 (ground
    truth first, then proposals); labels (R,) int32 (class + 1, 0 background, -1 unused);
    hw the image's (height, width)."""

    index: int
    boxes: np.ndarray
    labels: np.ndarray
    hw: tuple[int, int]

    @property
    def fg(self) -> np.ndarray:
        return np.flatnonzero(self.labels > 0)

    @property
    def bg(self) -> np.ndarray:
        return np.flatnonzero(self.labels == 0)


@dataclasses.dataclass(frozen=True)
class WindowBatch:
    """A mini-batch: ``batch`` the padded images (B, H, W, 3) with their hw; cells (B, R, 4) int32
    inclusive cells on each image's valid conv map; labels (B, R) int32; mask (B, R) float32,
    1 for a sampled window and 0 for a padding slot (which holds a valid window, label 0)."""

    batch: Batch
    cells: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def trained_layers(convs: Sequence[str], from_layer: str) -> tuple[str, ...]:
    """The conv layers trained when fine-tuning from ``from_layer`` (bottom up; () for "fc6")."""
    if from_layer == NO_CONV:
        return ()
    if from_layer not in convs:
        raise ConfigError(f"from_layer must be one of {', '.join((*convs, NO_CONV))}, got {from_layer!r}")
    return tuple(convs[list(convs).index(from_layer):])


def image_windows(records, proposals: dict) -> list[ImageWindows]:
    """Every record with at least one usable window (label >= 0): ground truth + clipped proposals."""
    out = []
    for i in range(len(records)):
        rec = records[i]
        props, _ = valid_windows(proposals.get(rec["image_id"], np.zeros((0, 4))), rec["image"].shape[:2])
        boxes = np.concatenate([np.asarray(rec["boxes"], np.float32).reshape(-1, 4), props])
        labels, _ = window_labels(boxes, rec["boxes"], rec["labels"])
        if (labels >= 0).any():
            out.append(ImageWindows(i, boxes, labels, tuple(rec["image"].shape[:2])))
    return out


def _sample(rng: np.random.Generator, iw: ImageWindows, n: int, fg_fraction: float):
    """(n,) window indices of one image and their (n,) mask (padding repeats index 0, mask 0)."""
    idx = sample_batch(rng, iw.fg, iw.bg, n, fg_fraction, replace=False)
    mask = np.zeros(n, np.float32)
    mask[:len(idx)] = 1
    return np.concatenate([idx, np.full(n - len(idx), idx[0])]).astype(np.int64), mask


def make_batch(server: Server, records, items: Sequence[ImageWindows], scale: int,
               rng: np.random.Generator, config: ConvFinetuneConfig) -> WindowBatch:
    """Prepare ``items``' images at ``scale`` (one bucket shape for all) with sampled windows."""
    views, wins, labels, masks = [], [], [], []
    for it in items:
        image = records[it.index]["image"]
        boxes = it.boxes
        if config.flip and rng.random() < 0.5:
            image, boxes = np.ascontiguousarray(image[:, ::-1]), flip_boxes_lr(boxes, image.shape[1])
        view = server.prepare(image, scale)
        idx, mask = _sample(rng, it, config.windows_per_image, config.fg_fraction)
        factors = (view.shape[0] / image.shape[0], view.shape[1] / image.shape[1])
        views.append(view)
        wins.append(scale_boxes(boxes[idx], factors))
        labels.append(it.labels[idx])
        masks.append(mask)
    shape = tuple(np.max([server.bucket(v.shape[0], v.shape[1], scale) for v in views], axis=0))
    batch = server.batch(views, shape)
    map_hw = server.map_hw(batch.hw)
    cells = np.stack([server.cells(w, hw) for w, hw in zip(wins, map_hw)])
    labels = np.stack(labels).astype(np.int32)
    mask = np.stack(masks)
    return WindowBatch(batch, cells, np.where(mask > 0, labels, 0), mask)


def split_params(variables: dict, trained: Sequence[str], head: dict) -> tuple[dict, dict]:
    """(trainable {"backbone": the trained conv layers, "head": fc6-fc8}, frozen {the other conv layers})."""
    bb = variables["params"]["backbone"]
    train = {"backbone": {k: v for k, v in bb.items() if k in trained}, "head": head}
    return train, {k: v for k, v in bb.items() if k not in trained}


def merge_variables(train: dict, frozen: dict) -> dict:
    """The whole network's variables from :func:`split_params`' two halves."""
    return {"params": {"backbone": {**frozen, **train["backbone"]}, "classifier": train["head"]}}


def make_loss(model: SPPNet, head: Head) -> Callable:
    """loss(train, frozen, pixels, hw, cells, labels, mask, key) -> (mean loss, (correct, count)).

    Shapes: pixels (B, H, W, 3), hw (B, 2), cells (B, R, 4), labels and mask (B, R). ``key``
    None: dropout off (evaluation)."""
    levels, mode = tuple(model.levels), model.pool_mode

    def loss_fn(train, frozen, pixels, hw, cells, labels, mask, key):
        bb = {**jax.lax.stop_gradient(frozen), **train["backbone"]}
        fmap, _ = model.apply({"params": {"backbone": bb}}, pixels, valid_hw=hw, method=SPPNet.conv_map)
        pooled = jax.vmap(lambda f, c: roi_pool_cells(f, c, levels, mode))(fmap, cells)  # (B, R, D)
        x = pooled.reshape(-1, pooled.shape[-1])
        out = head.apply({"params": train["head"]}, x, train=key is not None,
                         rngs=None if key is None else {"dropout": key})
        logits = out["logits"].astype(jnp.float32)
        y, m = labels.reshape(-1), mask.reshape(-1) > 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        count = m.sum()
        # where, not a product: a masked slot adds an exact 0 whatever its logits are.
        loss = jnp.where(m, ce, 0.0).sum() / jnp.maximum(count, 1)
        correct = jnp.where(m, logits.argmax(-1) == y, False).sum()
        return loss, (correct, count)

    return loss_fn


def _optimizer(config: ConvFinetuneConfig, iters: Sequence[int]):
    return two_step_sgd(config.lrs, int(iters[0]), config.weight_decay, config.momentum)


def make_step(loss_fn: Callable, tx) -> Callable:
    """One jitted SGD step: (train, opt_state, frozen, WindowBatch arrays..., key) -> (train, opt_state,
    loss, correct, count). Gradients of ``train`` only: ``frozen`` is never differentiated. Compiled
    with :mod:`spp_jax.xla_options`, as the training and serving programs."""

    @xla_options.jit
    def step(train, opt_state, frozen, pixels, hw, cells, labels, mask, key):
        (loss, (correct, count)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            train, frozen, pixels, hw, cells, labels, mask, key)
        updates, opt_state = tx.update(g, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss, correct, count

    return step


def batch_arrays(wb: WindowBatch) -> tuple:
    """The step's array arguments of a :class:`WindowBatch`."""
    return (jnp.asarray(wb.batch.pixels), jnp.asarray(wb.batch.hw), jnp.asarray(wb.cells),
            jnp.asarray(wb.labels), jnp.asarray(wb.mask))


def _schedule(rng: np.random.Generator, items: Sequence[ImageWindows], per_batch: int):
    """Endless batches of image indices, a fresh permutation per pass. A batch takes the next
    image and then, where possible, the next ones of the same orientation (landscape or
    portrait), so that the batch's common bucket shape wastes little padding."""
    wide = np.array([it.hw[1] >= it.hw[0] for it in items])
    order: list = []
    while True:
        while len(order) < per_batch:
            order += rng.permutation(len(items)).tolist()
        first = order.pop(0)
        same = [i for i in order if wide[i] == wide[first]][:per_batch - 1]
        rest = [i for i in order if i not in same][:per_batch - 1 - len(same)]
        for i in same + rest:
            order.remove(i)
        yield [first, *same, *rest]


def finetune_conv(server: Server, records, proposals: dict, num_classes: int,
                  config: ConvFinetuneConfig = ConvFinetuneConfig(),
                  log_fn: Callable[[str], None] | None = None) -> ConvFinetuneResult:
    """Fine-tune ``server``'s network end to end on detection records.

    Args:
      server: the pretrained network, its variables and mean (images are prepared by it).
      records: a :class:`~spp_jax.detection.records.RecordSource` (or a list of record dicts).
      proposals: image_id -> (R, 4) proposal boxes (clipped here as the feature caches do).
      num_classes: K + 1 (background is class 0).
    Returns:
      the fine-tuned network (:class:`ConvFinetuneResult`); the last iterate (no hold-out).
    """
    c = config
    c.check()
    t0 = time.perf_counter()
    log_fn = log_fn or log.info
    model = server.model
    trained = trained_layers(server.convs, c.from_layer)
    items = image_windows(records, proposals)
    if not items:
        raise ValueError("no training image has a window with IoU >= 0.1 to a ground-truth box")
    head0 = new_head_params(server.variables["params"]["classifier"], num_classes, c.seed)
    train, frozen = split_params(server.variables, trained, head0)
    # Plain host copies: restored variables may carry a training mesh's sharding that the new
    # fc8 lacks; mixed, the step's outputs differ from its first inputs and each bucket shape
    # would compile twice.
    train, frozen = (jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), t) for t in (train, frozen))
    iters = tuple(c.iters or default_conv_iters(len(items), c.iter_scale))
    tx, sched = _optimizer(c, iters)
    fc_dim = int(head0["fc7"]["kernel"].shape[1])
    step = make_step(make_loss(model, Head(num_classes, fc_dim, c.dropout, dtype=model.dtype)), tx)
    opt_state = tx.init(train)
    rng, key = np.random.default_rng(c.seed), jax.random.PRNGKey(c.seed)
    order = _schedule(rng, items, c.images_per_batch)
    total = int(sum(iters))
    log_fn(f"conv fine-tuning: layers {', '.join(trained) or 'none'} + fc6-fc8, {len(items)} images, "
           f"{c.images_per_batch} x {c.windows_per_image} windows per batch ({c.fg_fraction:.0%} fg), "
           f"scales {tuple(c.scales)}, {iters[0]} + {iters[1]} iterations at {c.lrs}")
    history, shapes, warm = [], [], []
    run = np.zeros(3)  # loss sum, correct, count since the last log line
    for it in range(1, total + 1):
        ts = time.perf_counter()
        scale = int(c.scales[rng.integers(len(c.scales))])
        wb = make_batch(server, records, [items[i] for i in next(order)], scale, rng, c)
        key, sub = jax.random.split(key)
        train, opt_state, loss, correct, count = step(train, opt_state, frozen, *batch_arrays(wb), sub)
        run += (float(loss), float(correct), float(count))
        shape = tuple(wb.batch.pixels.shape[:3])
        if shape in shapes:
            warm.append(time.perf_counter() - ts)
        else:  # a new bucket shape: this iteration compiled its step
            shapes.append(shape)
        if it % c.log_every == 0 or it == total:
            n_steps = c.log_every if it % c.log_every == 0 else it % c.log_every
            history.append({"iter": it, "lr": float(sched(it - 1)), "train_loss": run[0] / n_steps,
                            "train_acc": run[1] / max(run[2], 1), "seconds": time.perf_counter() - t0})
            log_fn(f"conv finetune iter {it}/{total}: loss {history[-1]['train_loss']:.4f}, "
                   f"acc {history[-1]['train_acc']:.3f}, {np.mean(warm) if warm else float('nan'):.2f} "
                   f"s/iter, {len(shapes)} batch shape(s)")
            run[:] = 0
    variables = jax.tree.map(np.asarray, merge_variables(train, frozen))
    return ConvFinetuneResult(model.clone(num_classes=num_classes), variables,
                              variables["params"]["classifier"], trained, history,
                              time.perf_counter() - t0, float(np.mean(warm)) if warm else float("nan"),
                              shapes)
