"""Data parallelism with jax.sharding: a 1-D mesh over all devices, axis ``"data"``.

The batch is split along its first axis (``NamedSharding(mesh, P("data"))``); parameters
and optimizer state are replicated (``P()``), so XLA inserts the gradient all-reduce.
With several hosts each process loads only its share of the global batch and
:func:`global_batch` assembles the global array with
``jax.make_array_from_process_local_data``.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spp_jax.devices import (DISTRIBUTED_ENV, HEARTBEAT_ENV, NUM_PROCESSES_ENV,  # noqa: F401
                             PROCESS_ID_ENV, maybe_initialize_distributed)  # (re-exported)

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
    """Validate a global batch against devices and processes; returns the per-process batch."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if batch_size % n_dev:
        lo, hi = batch_size - batch_size % n_dev, batch_size + n_dev - batch_size % n_dev
        raise ValueError(
            f"{what}={batch_size} is not divisible by the number of devices ({n_dev}); the "
            f"data-parallel step splits the batch evenly over the mesh axis '{DATA_AXIS}'. "
            f"Use e.g. {what}={lo or hi} or {hi}.")
    if batch_size % n_proc:
        raise ValueError(f"{what}={batch_size} is not divisible by the number of processes "
                         f"({n_proc}).")
    return batch_size // n_proc


def global_batch(local: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
    """Per-process numpy batch -> global jax arrays sharded along the batch axis."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        shape = (global_batch_size,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out
