"""Which devices JAX runs on: multi-host start-up and the start-up log line.

Nothing in spp_jax chooses a device: JAX takes its default backend (a GPU or TPU when
the matching jax plugin is installed and finds one, else the CPU), and every program
runs there. Entry points call :func:`log_devices` once at start-up so a run's log
says which backend it actually got (with no GPU plugin installed, JAX falls back to the
CPU with only a warning, even on a GPU machine).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax

from spp_jax import host_memory
from spp_jax.errors import ConfigError

log = logging.getLogger(__name__)

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


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """The backend and devices of this process, as JAX sees them."""

    backend: str                    # jax.default_backend(): "cpu", "gpu" or "tpu"
    local_devices: tuple[str, ...]  # this process's devices, e.g. ("cuda:0", "cuda:1")
    kinds: tuple[str, ...]          # their distinct device kinds, e.g. ("NVIDIA H100 80GB HBM3",)
    device_count: int               # devices over all processes
    process_index: int
    process_count: int
    jax_version: str

    def line(self) -> str:
        return (f"JAX backend: {self.backend}; {len(self.local_devices)} local device(s) "
                f"[{', '.join(self.local_devices)}] ({', '.join(self.kinds)}) of {self.device_count} "
                f"in all; process {self.process_index} of {self.process_count}; jax {self.jax_version}")


def device_report() -> DeviceReport:
    """What :func:`log_devices` logs (initialises JAX's backends if nothing has yet)."""
    local = jax.local_devices()
    return DeviceReport(
        backend=jax.default_backend(),
        local_devices=tuple(str(d) for d in local),
        kinds=tuple(dict.fromkeys(d.device_kind for d in local)),
        device_count=jax.device_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        jax_version=jax.__version__,
    )


def log_devices(distributed: bool = False) -> DeviceReport:
    """Start JAX (multi-host first when ``distributed`` or ``$SPP_JAX_DISTRIBUTED=1``) and
    log one line naming the default backend and the devices, and one saying whether the
    host allocator keeps freed memory (:mod:`spp_jax.host_memory`); returns the first."""
    maybe_initialize_distributed(distributed)  # must precede the first device query
    report = device_report()
    log.info("%s", report.line())
    if report.backend == "cpu":
        log.info("%s", host_memory.describe())
    return report
