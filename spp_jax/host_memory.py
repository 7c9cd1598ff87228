"""Host memory: keep freed buffers mapped, so a CPU train step does not page-fault its
working memory back in on every call.

Why: XLA's CPU convolutions (Eigen) allocate their packing buffers per call, up to the
whole patch matrix (227 MB for conv1's weight gradient in the embedded Overfeat-7 step
at batch 32, 224 px). Requested from a worker thread, glibc serves them with ``mmap``
(a thread arena holds at most 64 MB, whatever ``M_MMAP_THRESHOLD`` says) and returns
them with ``munmap``, so every step faulted ~180 MB back in: 46,000 minor page faults and
~80 ms of kernel time per 250 ms step on the 2-core CPU. With every thread on glibc's main
arena, ``mmap`` off and trimming off, freed buffers stay in the heap and are reused: no
page faults, and the embedded train step 1.2x faster at 224 and 180 (embedded ZF-5:
1.35x; ``make bench``, row "3 host memory": two processes that differ only in this
setting, alternated).

The cost: a process keeps its peak heap (memory goes back to the system only when more
than 2 GiB sit free at the top of the heap), and all threads share one arena.

Only glibc's start-up tunables do it: ``mallopt`` at run time comes too late once any
thread has its own arena (numpy's BLAS threads make some at import), and later threads
then share those. So the command-line entry points call :func:`restart_with_kept_memory`
first thing, which re-executes the same command once with ``$GLIBC_TUNABLES`` set (a
second or two of imports). Set ``$SPP_JAX_KEEP_FREED_MEMORY=0`` to leave the allocator
alone; other C libraries (macOS, musl) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from typing import Mapping

log = logging.getLogger(__name__)

ENV = "SPP_JAX_KEEP_FREED_MEMORY"
TUNABLES_ENV = "GLIBC_TUNABLES"
RESTARTED_ENV = "SPP_JAX_RESTARTED_FOR_MALLOC"  # never restart twice, whatever the loader did
# glibc.malloc tunables: one arena (the main one, which grows with brk and keeps what is
# freed), no mmap for large blocks, trim only past 2 GiB free at the heap top.
SETTINGS = (("glibc.malloc.arena_max", "1"), ("glibc.malloc.mmap_max", "0"),
            ("glibc.malloc.trim_threshold", str(2**31)))


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """False when ``$SPP_JAX_KEEP_FREED_MEMORY`` is 0 / false / no."""
    return environ.get(ENV, "1").strip().lower() not in ("0", "false", "no")


@functools.cache
def is_glibc() -> bool:
    """Whether this process's C library is glibc (it has ``gnu_get_libc_version``)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").gnu_get_libc_version  # noqa: B018
        return True
    except (OSError, AttributeError):
        return False


def _parse(tunables: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in tunables.split(":") if "=" in kv)


def with_kept_memory(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` whose ``$GLIBC_TUNABLES`` has :data:`SETTINGS` added (a
    setting the user already made is kept as it is)."""
    env = dict(environ)
    have = _parse(env.get(TUNABLES_ENV, ""))
    add = [f"{k}={v}" for k, v in SETTINGS if k not in have]
    env[TUNABLES_ENV] = ":".join(filter(None, [env.get(TUNABLES_ENV, "")] + add))
    return env


def with_glibc_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` for a child that starts with glibc's allocator defaults and does
    not restart (no ``$GLIBC_TUNABLES``, no restart marker, ``$SPP_JAX_KEEP_FREED_MEMORY=0``)."""
    env = {k: v for k, v in environ.items() if k not in (TUNABLES_ENV, RESTARTED_ENV)}
    env[ENV] = "0"
    return env


def is_kept(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process started with the settings (glibc reads them only at start)."""
    have = _parse(environ.get(TUNABLES_ENV, ""))
    return is_glibc() and all(k in have for k, _ in SETTINGS)


def restart_with_kept_memory() -> None:
    """Re-execute this command (same interpreter and arguments) with :data:`SETTINGS` in
    ``$GLIBC_TUNABLES``, unless they are there already, disabled, or not glibc. Call it
    first in a ``__main__`` block, before any work: the process is replaced."""
    if not enabled() or not is_glibc() or is_kept() or os.environ.get(RESTARTED_ENV):
        return
    env = with_kept_memory(os.environ)
    env[RESTARTED_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def describe() -> str:
    """One line for a run's log: whether this process keeps freed memory."""
    if is_kept():
        return "host malloc: freed memory kept for reuse (one arena, no mmap; spp_jax.host_memory)"
    why = (f"${ENV}=0" if not enabled() else "not glibc" if not is_glibc()
           else "not started through an entry point that sets it")
    return f"host malloc: glibc defaults ({why}); CPU steps page-fault their buffers on every call"
