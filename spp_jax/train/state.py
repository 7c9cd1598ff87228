"""Train state (step, params, optimizer state) and the SGD optimizer of the paper."""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from spp_jax.train.config import TrainConfig


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree (checkpointed as is).

    ``step`` counts optimizer updates; the dropout key of a step is derived from
    (seed, step) so a resumed run draws the same masks.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def decay_mask(params):
    """True for leaves that get weight decay: conv / dense kernels only.

    Biases are not decayed, as in the usual Caffe solver definitions (``decay_mult: 0``
    on bias blobs); decaying them buys nothing and pulls ReLU units towards dead.
    """
    def is_kernel(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(learning_rate: float | Callable, momentum: float = 0.9,
                   weight_decay: float = 5e-4, optimizer: str = "sgd") -> optax.GradientTransformation:
    """SGD with momentum (the paper) or Adam, L2 weight decay on kernels, hyperparameters injected.

    ``learning_rate`` is a float or an optax schedule of the step count.  The applied
    rate is ``learning_rate(step) * lr_scale``; ``lr_scale`` lives in
    ``opt_state.hyperparams`` so a host-side controller (the plateau schedule) can
    change it between steps without recompiling (see :func:`set_lr_scale`).

    Update: v <- momentum * v + (g + wd * w);  w <- w - lr * v.  (Caffe keeps the rate
    inside the velocity, v <- m v + lr (g + wd w); the two agree while lr is constant.)

    ``optimizer="adam"`` (the embedded preset only, see config.py) feeds the same
    decayed gradient g + wd * w to Adam (b1 = ``momentum``, b2 = 0.999): plain L2, not
    AdamW, so weight decay means the same loss term under both optimizers.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}; valid: {', '.join(OPTIMIZERS)}")

    def factory(learning_rate, lr_scale, momentum, weight_decay):
        rate = learning_rate * lr_scale
        step = (optax.sgd(rate, momentum=momentum) if optimizer == "sgd"
                else optax.adam(rate, b1=momentum))
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), step)
    return optax.inject_hyperparams(factory)(
        learning_rate=learning_rate, lr_scale=1.0, momentum=momentum, weight_decay=weight_decay)


def optimizer_from_config(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    from spp_jax.train.schedule import learning_rate_schedule
    return make_optimizer(learning_rate_schedule(cfg, steps_per_epoch), cfg.momentum, cfg.weight_decay,
                          cfg.optimizer)


def create_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def get_lr_scale(state: TrainState) -> float:
    return float(state.opt_state.hyperparams["lr_scale"])


def set_lr_scale(state: TrainState, scale: float) -> TrainState:
    """Replace the injected ``lr_scale`` (same shape, dtype and sharding: no recompile)."""
    old = state.opt_state.hyperparams["lr_scale"]
    new = jax.device_put(jnp.asarray(scale, old.dtype), old.sharding)
    hp = dict(state.opt_state.hyperparams, lr_scale=new)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))
