"""Rendering the shapes data in worker processes, in index order: the embedded data's build.

``rendered(variant, split, num_examples, seed, processes)`` yields
``shapes.generate(variant, split, i, seed)`` for ``i = 0 .. num_examples - 1``, in order,
rendered by ``processes`` workers (worker ``k`` renders the indices ``k, k + processes,
...``).  Each sample is a pure function of its index, so the output is the serial
loop's, bit for bit.

The workers are plain ``python -m spp_jax.data.shapes_workers`` subprocesses writing
pickled samples to a pipe, not ``multiprocessing``: its "spawn" start re-imports the
caller's main module, so an unguarded script that builds the data would run again in
every worker (and wait forever on the build lock its parent holds), and "fork" is unsafe
once JAX's and OpenCV's threads run in the parent.

Worker command line (internal)::

    python -m spp_jax.data.shapes_workers VARIANT SPLIT SEED FIRST STOP STEP
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

# Pipe capacity asked for (Linux; the default 64 KB holds a fifth of one image): a worker
# can then run a few images ahead of the reader instead of waiting on every write.
_PIPE_BYTES = 1 << 20


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(variant: str, split: str, seed: int, first: int, stop: int, step: int) -> subprocess.Popen:
    env = dict(os.environ)
    # The worker must import this spp_jax (a source checkout is not always on sys.path).
    env["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in [env.get("PYTHONPATH")] if p])
    args = [sys.executable, "-m", "spp_jax.data.shapes_workers", variant, split, str(seed),
            str(first), str(stop), str(step)]
    # Own session: a Ctrl-C in the terminal interrupts the caller alone (which then stops
    # the workers), not each worker with a traceback of its own.  Orphaned by a killed
    # caller, a worker ends at its next write to the closed pipe.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        import fcntl
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, AttributeError, OSError):  # not Linux, or above the system's limit
        pass
    return proc


def rendered(variant: str, split: str, num_examples: int, seed: int, processes: int
             ) -> Iterator[dict[str, Any]]:
    """``shapes.generate(variant, split, i, seed)`` for i in range(num_examples), in order,
    from ``processes`` >= 1 worker processes (see the module doc).

    Raises RuntimeError when a worker stops early (its traceback is on stderr).  Closing
    the generator early stops the workers.
    """
    procs = [_start(variant, split, seed, k, num_examples, processes) for k in range(processes)]
    try:
        for i in range(num_examples):
            proc = procs[i % processes]
            try:
                yield pickle.load(proc.stdout)
            except EOFError:
                code = proc.wait()
                raise RuntimeError(f"shapes render worker {i % processes} stopped before sample {i} "
                                   f"of {variant}/{split} (exit code {code}; its error is above)") from None
    finally:
        for proc in procs:
            proc.kill()  # a no-op for workers that finished
            proc.wait()
            proc.stdout.close()


def _worker(argv: list[str]) -> None:
    variant, split, seed, first, stop, step = argv
    import cv2

    from spp_jax.data import shapes

    cv2.setNumThreads(1)  # one core per worker: the build runs one worker per core
    out = os.fdopen(os.dup(1), "wb")  # the pipe, kept for the samples alone:
    os.dup2(2, 1)  # a stray write to stdout (Python's or a C library's) goes to stderr
    for i in range(int(first), int(stop), int(step)):
        pickle.dump(shapes.generate(variant, split, i, int(seed)), out, protocol=pickle.HIGHEST_PROTOCOL)
    out.close()


if __name__ == "__main__":
    _worker(sys.argv[1:])
