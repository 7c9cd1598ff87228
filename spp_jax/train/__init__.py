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

The names are resolved lazily (PEP 562): importing ``spp_jax.train.config`` to read a
workdir (spp_jax.pretrained) does not import the training loop.
"""
import importlib

_EXPORTS = {
    "checkpoint": ("Checkpointer", "read_checkpoint"),
    "config": ("PRESETS", "TrainConfig", "apply_overrides", "build_model", "get_config", "load_config"),
    "data": ("InMemoryData", "TrainData", "TrainIterator"),
    "loop": ("TrainResult", "evaluate", "plot_curves", "train"),
    "memory": ("check_memory", "estimate_train_bytes"),
    "schedule": ("PlateauController", "learning_rate_schedule", "lr_at", "size_schedule"),
    "sharding": ("batch_sharding", "check_batch_size", "global_batch", "make_mesh",
                 "maybe_initialize_distributed", "replicated"),
    "state": ("TrainState", "create_state", "decay_mask", "get_lr_scale", "make_optimizer",
              "optimizer_from_config", "set_lr_scale"),
    "steps": ("CompiledSteps", "dropout_key", "enable_compilation_cache", "init_key", "make_eval_step",
              "make_train_step"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"spp_jax.train.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'spp_jax.train' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
