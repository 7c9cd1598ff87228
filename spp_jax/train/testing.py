"""Tiny configs and data for tests and smoke runs, and a command line to run one in a
subprocess (used by the checkpoint-resume and multi-device tests)::

    python -m spp_jax.train.testing WORKDIR [--out params.npz] [--delay S] [key=value ...]

Set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in the environment (before
Python starts) to run on N fake CPU devices; set ``SPP_JAX_DISTRIBUTED=1``,
``JAX_COORDINATOR_ADDRESS``, ``SPP_JAX_NUM_PROCESSES`` and ``SPP_JAX_PROCESS_ID`` to run
one of several processes (spp_jax.train.sharding.maybe_initialize_distributed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from spp_jax.train.config import TrainConfig, apply_overrides, get_config
from spp_jax.train.data import InMemoryData

# One persistent compilation cache shared by the test processes (programs are keyed by
# their HLO, so sharing is safe); cold, the tiny train steps take a few seconds each.
TEST_CACHE_DIR = os.environ.get("SPP_JAX_TEST_CACHE",
                                os.path.join(tempfile.gettempdir(), "spp_jax_train_test_cache"))

TINY = dict(model="zf5", width=0.05, fc_dim=32, init_scheme="he", sizes=(48, 64), eval_size=64,
            batch_size=8, eval_batch_size=16, epochs=3, decay_epochs=(2,), log_every=1,
            checkpoint_every=2, keep_checkpoints=3, progress=False, plot=False, seed=0,
            compile_cache_dir=TEST_CACHE_DIR)


def tiny_config(**kwargs) -> TrainConfig:
    return get_config(**{**TINY, **kwargs})


def tiny_data(**kwargs) -> InMemoryData:
    return InMemoryData(**{**dict(num_train=24, num_val=16, num_classes=4), **kwargs})


class HookedData:
    """``data`` (an :class:`InMemoryData`) whose training batches pass through
    ``hook(epoch, position, batch) -> batch``, ``position`` counting this epoch's batches
    fetched so far (this one included): tests inject interrupts or bad values with it."""

    def __init__(self, data: InMemoryData, hook):
        self.data, self.hook, self.num_classes = data, hook, data.num_classes
        self.train_channels = data.train_channels

    def steps_per_epoch(self, batch_size):
        return self.data.steps_per_epoch(batch_size)

    def eval_batches(self, *args, **kwargs):
        return self.data.eval_batches(*args, **kwargs)

    def train_iter(self, epoch, *args, **kwargs):
        return _HookedIterator(self.data.train_iter(epoch, *args, **kwargs), epoch, self.hook)


class _HookedIterator:
    def __init__(self, it, epoch, hook):
        self.it, self.epoch, self.hook = it, epoch, hook

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        return self.hook(self.epoch, self.it.position, batch)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def flat_params(params) -> dict[str, np.ndarray]:
    import jax
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workdir")
    ap.add_argument("--out", help="write the final params (npz) and metrics summary here")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds per training batch")
    ap.add_argument("--num-train", type=int, default=24)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("spp_jax").setLevel(logging.INFO)
    from spp_jax.train.loop import train
    cfg = apply_overrides(tiny_config(), a.overrides)
    data = tiny_data(delay=a.delay, num_train=a.num_train)
    r = train(cfg, a.workdir, data)
    if a.out:
        np.savez(a.out, **flat_params(r.state.params))
        with open(a.out + ".json", "w") as f:
            json.dump({"resumed_from": r.resumed_from, "step": int(r.state.step),
                       "compile_seconds": {str(k): v for k, v in r.compile_seconds.items()},
                       "train_indices": data.loaded}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
