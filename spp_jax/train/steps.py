"""Compiled train / eval steps, one program per input size, built ahead of time.

All programs share one parameter pytree: SPP makes the fc6 input length independent of
the image size, so the 180- and 224-networks are the same parameters with different
compiled conv shapes (the paper's multi-size training).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax import xla_options
from spp_jax.train.state import TrainState

log = logging.getLogger(__name__)


def enable_compilation_cache(path: str | os.PathLike | None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``path`` (created if needed).

    The size / time thresholds are set to cache everything: CPU programs of small models
    compile in well under JAX's default 1 s minimum and would otherwise never be cached.
    If a cache directory was already configured in this process, it is kept (JAX reads
    the setting once, at the first compile).
    """
    if not path:
        return None
    path = os.path.abspath(os.fspath(path))
    current = jax.config.jax_compilation_cache_dir
    if current and os.path.abspath(current) != path:
        log.info("persistent compilation cache already at %s; keeping it", current)
        return current
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def init_key(seed: int) -> jax.Array:
    """Parameter-initialisation key (disjoint from the dropout keys)."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def dropout_key(seed: int, step) -> jax.Array:
    """Dropout key of optimizer step ``step``: fold_in(fold_in(key(seed), 1), step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), step)


def make_train_step(model, tx, seed: int) -> Callable:
    """``step(state, batch) -> (state, metrics)``; batch ``{"image", "label"}``; ``tx`` the optax optimizer.

    metrics: ``loss``, ``accuracy``, ``grad_norm`` (global L2 norm of the gradient) and
    ``ok`` (bool, the NaN guard). A step whose loss or gradient is not finite is not applied:
    the state comes back unchanged, ``ok`` False. ``ok`` is also False when an applied update
    left a parameter non-finite (an overflow from a finite gradient); the loop then stops
    before saving anything, and the checkpointer refuses such a state too.

    The dropout key is ``dropout_key(seed, state.step)``: the same for a given step in
    any run, resumed or not, on any number of devices (JAX's partitionable threefry
    makes the random bits independent of the sharding).
    """
    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        key = dropout_key(seed, state.step)

        def loss_fn(params):
            logits = model.apply({"params": params}, batch["image"], train=True,
                                 rngs={"dropout": key})
            return cross_entropy(logits, batch["label"]), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)

        def apply(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        # NaN guard (the loop stops on ``ok``: spp_jax.train.loop). Why a cond rather than
        # computing the update and selecting old or new per element: the select could only
        # follow a reduction over the new parameters, so it cost a pass over every parameter
        # and optimizer buffer (3.8 of the embedded Overfeat-7 step's 100 ms at 180 px, its
        # 3200 x 1024 fc6 alone; 2 % of the step, 2026-12-06).
        new = jax.lax.cond(finite, apply, lambda _: state, None)
        ok = finite & jnp.isfinite(optax.tree.norm(new.params))
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        return new, {"loss": loss, "accuracy": acc, "grad_norm": gnorm, "ok": ok}
    return step


def make_eval_step(model) -> Callable:
    """``eval_step(params, batch) -> sums``: top-1/top-5 correct, loss sum, count.

    ``batch["image"]`` is (B, S, S, 3), or (B, V, S, S, 3) for V views whose softmax
    outputs are averaged; an optional boolean ``mask`` (B,) drops padded samples.
    """
    def eval_step(params, batch):
        images, labels = batch["image"], batch["label"]
        mask = batch.get("mask", jnp.ones(labels.shape, bool)).astype(jnp.float32)
        if images.ndim == 5:
            b, v = images.shape[:2]
            logits = model.apply({"params": params}, images.reshape((b * v,) + images.shape[2:]),
                                 train=False)
            probs = jax.nn.softmax(logits.astype(jnp.float32)).reshape(b, v, -1).mean(1)
        else:
            probs = jax.nn.softmax(model.apply({"params": params}, images, train=False)
                                   .astype(jnp.float32))
        safe = jnp.maximum(labels, 0)
        nll = -jnp.log(jnp.take_along_axis(probs, safe[:, None], 1)[:, 0] + 1e-12)
        k = min(5, probs.shape[-1])
        _, top = jax.lax.top_k(probs, k)
        hit = top == safe[:, None]
        return {"top1": jnp.sum(hit[:, 0] * mask), "top5": jnp.sum(hit.any(-1) * mask),
                "loss": jnp.sum(nll * mask), "count": jnp.sum(mask)}
    return eval_step


def abstract_with_sharding(tree, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class CompiledSteps:
    """Ahead-of-time compiled train steps keyed by input size, plus a jitted eval step.

    Both are compiled with :mod:`spp_jax.xla_options` (on CPU: XLA's own convolutions).

    ``build(size)`` lowers and compiles ``step`` for exactly (global batch, size, size,
    ``channels``) float32 images (3, or 1 for gray batches) and (batch,) int32 labels with
    the given shardings, donating the train state, and records the compile time
    (``compile_seconds``).
    """

    def __init__(self, train_step, eval_step, abstract_state, batch_size: int,
                 state_sharding, batch_sharding, channels: int = 3):
        self.abstract_state = abstract_with_sharding(abstract_state, state_sharding)
        self.batch_size, self.channels = batch_size, channels
        self.batch_sharding = batch_sharding
        self.state_sharding = state_sharding
        self._jit = xla_options.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                                    out_shardings=(state_sharding, state_sharding), donate_argnums=0)
        self._eval = xla_options.jit(eval_step, in_shardings=(state_sharding, batch_sharding),
                                     out_shardings=state_sharding)
        self.compiled: dict[int, Any] = {}
        self.compile_seconds: dict[int, float] = {}

    def build(self, size: int):
        if size in self.compiled:
            return self.compiled[size]
        batch = {
            "image": jax.ShapeDtypeStruct((self.batch_size, size, size, self.channels), jnp.float32,
                                          sharding=self.batch_sharding),
            "label": jax.ShapeDtypeStruct((self.batch_size,), jnp.int32, sharding=self.batch_sharding),
        }
        t0 = time.perf_counter()
        compiled = self._jit.lower(self.abstract_state, batch).compile()
        dt = time.perf_counter() - t0
        self.compiled[size], self.compile_seconds[size] = compiled, dt
        log.info("compiled train step for %dx%d inputs (batch %d) in %.2f s", size, size,
                 self.batch_size, dt)
        return compiled

    def __call__(self, size: int, state, batch):
        return self.build(size)(state, batch)

    def evaluate(self, params, batch):
        return self._eval(params, batch)


def pad_eval_batch(batch: dict, size: int) -> dict:
    """Pad a (possibly short) local eval batch to ``size`` samples with mask False."""
    n = len(batch["label"])
    mask = np.asarray(batch.get("mask", np.ones(n, bool)), bool)
    out = {"image": np.asarray(batch["image"], np.float32),
           "label": np.asarray(batch["label"], np.int32), "mask": mask}
    if n > size:
        raise ValueError(f"eval batch of {n} samples exceeds the per-process eval batch {size}")
    if n < size:
        out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
               for k, v in out.items()}
    return out
