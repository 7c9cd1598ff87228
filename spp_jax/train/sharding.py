"""Data parallelism with jax.sharding: a 1-D mesh over all devices, axis ``"data"``.

The batch is split along its first axis (``NamedSharding(mesh, P("data"))``); parameters
and optimizer state are replicated (``P()``), so XLA inserts the gradient all-reduce.
With several hosts each process loads only its share of the global batch and
:func:`global_batch` assembles the global array with
``jax.make_array_from_process_local_data``.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spp_jax.errors import ConfigError

log = logging.getLogger(__name__)

DATA_AXIS = "data"
DISTRIBUTED_ENV = "SPP_JAX_DISTRIBUTED"
NUM_PROCESSES_ENV, PROCESS_ID_ENV = "SPP_JAX_NUM_PROCESSES", "SPP_JAX_PROCESS_ID"
HEARTBEAT_ENV = "SPP_JAX_HEARTBEAT_TIMEOUT"
_initialized = False


def maybe_initialize_distributed(enabled: bool = False) -> None:
    """Call ``jax.distributed.initialize()`` once if ``enabled`` or ``$SPP_JAX_DISTRIBUTED=1``.

    Coordinator address, process count and id come from a cluster JAX detects (SLURM,
    Open MPI, Kubernetes, Cloud TPU) or, for a plain launch of one process per host, from
    ``$JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``$SPP_JAX_NUM_PROCESSES``
    and ``$SPP_JAX_PROCESS_ID``.  CPU processes exchange collectives over gloo (JAX's
    default).  When a process dies, the others stop with an error once it has missed
    heartbeats for ``$SPP_JAX_HEARTBEAT_TIMEOUT`` seconds (JAX's default: 100).  Must run
    before any other JAX call.
    """
    global _initialized
    env = os.environ.get(DISTRIBUTED_ENV, "").strip().lower() in ("1", "true", "yes")
    if (enabled or env) and not _initialized:
        kw = {}
        if NUM_PROCESSES_ENV in os.environ or PROCESS_ID_ENV in os.environ:
            kw = dict(num_processes=_env_int(NUM_PROCESSES_ENV), process_id=_env_int(PROCESS_ID_ENV))
        if HEARTBEAT_ENV in os.environ:
            kw["heartbeat_timeout_seconds"] = _env_int(HEARTBEAT_ENV)
        jax.distributed.initialize(**kw)
        _initialized = True
        log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"${name}={value!r}: expected an integer (set ${NUM_PROCESSES_ENV} and "
                          f"${PROCESS_ID_ENV} together)") from None


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
