"""Learning-rate schedules (step decay, plateau) and the per-epoch input-size schedule."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import optax

from spp_jax.train.config import TrainConfig

log = logging.getLogger(__name__)


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """Step decay: ``learning_rate`` times ``decay_factor`` at each of ``decay_epoch_list``
    (converted to optimizer steps).  With ``lr_schedule="plateau"`` the base rate is
    constant and :class:`PlateauController` scales it from the host."""
    if cfg.lr_schedule == "plateau":
        return cfg.learning_rate
    boundaries = {int(e) * steps_per_epoch: cfg.decay_factor
                  for e in cfg.decay_epoch_list if 0 < e < cfg.num_epochs}
    return optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)


def lr_at(cfg: TrainConfig, steps_per_epoch: int, step: int, scale: float = 1.0) -> float:
    """The learning rate applied at optimizer step ``step`` (host side, plain Python floats,
    the same rule as :func:`learning_rate_schedule`)."""
    lr = cfg.learning_rate
    if cfg.lr_schedule == "step":
        for e in cfg.decay_epoch_list:
            if 0 < e < cfg.num_epochs and step >= int(e) * steps_per_epoch:
                lr *= cfg.decay_factor
    return lr * scale


@dataclasses.dataclass
class PlateauController:
    """Divide the learning rate by 1/factor when validation error stops improving.

    After each validation: if ``error < best - min_delta`` the best is updated and the
    patience counter reset; otherwise the counter grows, and at ``patience`` the scale is
    multiplied by ``factor`` (at most ``max_decays`` times) and the counter reset.
    Its state is a JSON-able dict saved with checkpoints.
    """

    factor: float = 0.1
    patience: int = 3
    min_delta: float = 0.001
    max_decays: int = 2
    scale: float = 1.0
    best: float = float("inf")
    bad_epochs: int = 0
    decays: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "PlateauController":
        return cls(cfg.decay_factor, cfg.plateau_patience, cfg.plateau_min_delta, cfg.max_decays)

    def update(self, error: float) -> bool:
        """Record a validation error; True if the scale changed."""
        if error < self.best - self.min_delta:
            self.best, self.bad_epochs = error, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience and self.decays < self.max_decays:
            self.scale *= self.factor
            self.decays += 1
            self.bad_epochs = 0
            log.info("validation error plateaued (best %.4f): learning-rate scale -> %g",
                     self.best, self.scale)
            return True
        return False

    def get_state(self) -> dict:
        best = None if not np.isfinite(self.best) else float(self.best)
        return {"scale": self.scale, "best": best, "bad_epochs": self.bad_epochs,
                "decays": self.decays}

    def set_state(self, st: dict) -> None:
        self.scale = float(st["scale"])
        self.best = float("inf") if st["best"] is None else float(st["best"])
        self.bad_epochs = int(st["bad_epochs"])
        self.decays = int(st["decays"])


def size_schedule(cfg: TrainConfig) -> list[int]:
    """The input size of every epoch.

    multi: ``sizes`` in turn (180, 224, 180, ... for the default (180, 224));
    single: ``max(sizes)``; random: uniform integers in [min, max] from ``seed``
    (drawn for all epochs up front, so a resumed run sees the same sizes).
    """
    n = cfg.num_epochs
    if cfg.size_schedule == "multi":
        return [int(cfg.sizes[e % len(cfg.sizes)]) for e in range(n)]
    if cfg.size_schedule == "single":
        return [int(max(cfg.sizes))] * n
    rng = np.random.default_rng([cfg.seed, 0x5123])
    lo, hi = int(min(cfg.sizes)), int(max(cfg.sizes))
    return [int(s) for s in rng.integers(lo, hi + 1, size=n)]
