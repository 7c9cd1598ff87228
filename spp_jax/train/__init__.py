"""Training library for SPP-net classifiers (SPP_FACTS.md section 4).

  train(config, workdir, data) -> TrainResult     the epoch loop (loop.py)
  TrainConfig, get_config, apply_overrides, PRESETS   configs as code (config.py)
  TrainData, InMemoryData                         the data protocol and a synthetic set (data.py)
  TrainState, make_optimizer, set_lr_scale        state and SGD (state.py)
  learning_rate_schedule, PlateauController, size_schedule   (schedule.py)
  make_train_step, make_eval_step, CompiledSteps, enable_compilation_cache   (steps.py)
  make_mesh, batch_sharding, replicated, global_batch, maybe_initialize_distributed (sharding.py)
  Checkpointer, read_checkpoint                   verified orbax checkpoints; the read-only reader (checkpoint.py)
  training_workdir, WorkdirLock, RESUMABLE_KEYS   one writer per workdir, resume check, overwrite (workdir.py)
"""
from spp_jax.train.checkpoint import Checkpointer, read_checkpoint
from spp_jax.train.config import (PRESETS, TrainConfig, apply_overrides, build_model, get_config,
                                  load_config)
from spp_jax.train.data import InMemoryData, TrainData, TrainIterator
from spp_jax.train.loop import TrainResult, evaluate, plot_curves, train
from spp_jax.train.memory import check_memory, estimate_train_bytes
from spp_jax.train.schedule import PlateauController, learning_rate_schedule, lr_at, size_schedule
from spp_jax.train.sharding import (batch_sharding, check_batch_size, global_batch, make_mesh,
                                    maybe_initialize_distributed, replicated)
from spp_jax.train.state import (TrainState, create_state, decay_mask, get_lr_scale,
                                 make_optimizer, optimizer_from_config, set_lr_scale)
from spp_jax.train.steps import (CompiledSteps, dropout_key, enable_compilation_cache, init_key,
                                 make_eval_step, make_train_step)
from spp_jax.train.workdir import RESUMABLE_KEYS, WorkdirLock, training_workdir

__all__ = [
    "Checkpointer", "CompiledSteps", "InMemoryData", "PRESETS", "PlateauController", "RESUMABLE_KEYS",
    "TrainConfig", "TrainData", "TrainIterator", "TrainResult", "TrainState", "WorkdirLock",
    "apply_overrides", "batch_sharding",
    "build_model", "check_batch_size", "check_memory", "create_state", "decay_mask", "dropout_key",
    "enable_compilation_cache", "estimate_train_bytes", "evaluate", "get_config", "get_lr_scale",
    "global_batch", "init_key", "load_config", "learning_rate_schedule", "lr_at", "make_eval_step", "make_mesh",
    "make_optimizer", "make_train_step", "maybe_initialize_distributed", "optimizer_from_config",
    "plot_curves", "read_checkpoint", "replicated", "set_lr_scale", "size_schedule", "train",
    "training_workdir",
]
