"""A training workdir: one writer (an OS lock), the saved config checked before resuming,
and starting over deliberately.

:func:`training_workdir` is what ``train`` and ``make train`` hold while they run:

1. if the workdir holds a run (a checkpoint or a metrics record) whose ``config.json``
   differs from the new config in a key outside :data:`RESUMABLE_KEYS`, it raises
   ``CheckpointMismatch`` naming the keys (old -> new) and the ways out -- before any
   file is created, written or moved;
2. it takes an exclusive ``fcntl.flock`` on ``<workdir>/.lock`` (the OS drops it when the
   process exits or dies); a second writer gets ``WorkdirLocked`` naming the holder's PID;
3. with ``overwrite=true`` the old run's files move into ``<workdir>/previous-<time>/``
   (nothing is deleted; the generated data and the compilation cache stay, they are
   keyed by their own settings);
4. it writes ``config.json``.

Readers (eval, transfer, detection backbones) take no lock and never write here.
With several processes (``jax.distributed``), process 0 does all of this and the others
follow its verdict.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import time

import jax
import numpy as np

from spp_jax.errors import CheckpointMismatch, UserError, WorkdirLocked
from spp_jax.train.checkpoint import checkpoint_steps
from spp_jax.train.config import TrainConfig, load_config, save_config

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"

# Keys that may differ between a workdir's config.json and a run resuming it (or an eval of
# it): they change how the run is watched, logged, checkpointed, placed or tested at the
# end, not the parameters it produces.  ``epochs`` may change too (extend or shorten a
# run) as long as the learning-rate decay epochs and the size of every epoch stay the same.
# Every other key (the model, the data, the optimiser, the schedules, the seeds) is fixed.
RESUMABLE_KEYS = frozenset({
    "progress", "plot", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "async_checkpointing", "compile_cache_dir", "memory_check", "distributed", "data_threads",
    "data_cache_gb",
    "data_dir", "protocols", "eval_limit", "multiview_limit", "eval_batch_size", "eval_size",
    "epochs", "overwrite"})

# What `overwrite=true` moves aside: everything a run writes, except the caches.
RUN_FILES = ("config.json", "checkpoints", "corrupt_checkpoints", "metrics.jsonl", "train.log",
             "curves.png", "eval.md", "eval.json", "run_summary.json", "mean_image.npy")


def _same(a, b) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return both_nan or a == b


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def config_changes(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """``["width 0.0625 -> 0.125", ...]``: the fixed keys in which ``new`` differs from ``saved``."""
    out = [f"{f.name} {_show(getattr(saved, f.name))} -> {_show(getattr(new, f.name))}"
           for f in dataclasses.fields(TrainConfig)
           if f.name not in RESUMABLE_KEYS and not _same(getattr(saved, f.name), getattr(new, f.name))]
    if saved.num_epochs != new.num_epochs and not out:
        from spp_jax.train.schedule import size_schedule
        n = min(saved.num_epochs, new.num_epochs)
        decays = [tuple(e for e in c.decay_epoch_list if 0 < e < c.num_epochs) for c in (saved, new)]
        if saved.lr_schedule == "step" and decays[0] != decays[1]:
            out.append(f"decay epochs {_show(decays[0])} -> {_show(decays[1])} (derived from epochs; "
                       f"set decay_epochs={_show(decays[0]) or 'none'} to keep them)")
        if size_schedule(saved)[:n] != size_schedule(new)[:n]:
            out.append("the input size of past epochs (random size schedule, drawn per epoch count)")
    return out


def holds_run(workdir: str) -> bool:
    """Whether ``workdir`` holds (part of) a training run: a checkpoint or a metrics record."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    return bool(checkpoint_steps(os.path.join(workdir, "checkpoints"))
                or (os.path.exists(metrics) and os.path.getsize(metrics) > 0))


def run_changes(workdir: str, cfg: TrainConfig) -> list[str]:
    """:func:`config_changes` from the run ``workdir`` holds to ``cfg``; ``[]`` when it holds
    no run (or no config.json). Reads only."""
    if not holds_run(workdir) or not os.path.exists(os.path.join(workdir, "config.json")):
        return []
    return config_changes(load_config(workdir), cfg)


def check_resumable(workdir: str, cfg: TrainConfig) -> None:
    """CheckpointMismatch if ``workdir`` holds a run of another config (reads only)."""
    changes = run_changes(workdir, cfg)
    if changes:
        raise CheckpointMismatch(
            f"{workdir} holds a run trained with another config ({'; '.join(changes)}): rerun "
            f"with its config ({os.path.join(workdir, 'config.json')}), or train in a new "
            f"--workdir, or add overwrite=true to move the old run into "
            f"{os.path.join(workdir, 'previous-<time>')}/ and start over")


class WorkdirLock:
    """An exclusive ``fcntl.flock`` on ``<workdir>/.lock`` (holding this process's PID).

    Re-entrant within a process; released on exit from the outermost ``with``, and by
    the OS when the process exits or is killed.
    """

    _held: dict[str, list] = {}  # lock path -> [file descriptor, depth]

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)

    def __enter__(self):
        if self.path in self._held:
            self._held[self.path][1] += 1
            return self
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirLocked(
                f"{self.workdir} is being trained by another process (PID {holder}, lock "
                f"{self.path}): wait for it to finish or stop it, or train in another --workdir "
                f"(eval and the other readers work meanwhile)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._held[self.path] = [fd, 1]
        return self

    def __exit__(self, *exc):
        entry = self._held[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[self.path]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])
        return False


def move_run_aside(workdir: str) -> str:
    """Move the run's files (:data:`RUN_FILES`) into ``<workdir>/previous-<time>/``; its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = os.path.join(workdir, f"previous-{stamp}"), 1
    while os.path.exists(dest):
        dest, n = os.path.join(workdir, f"previous-{stamp}-{n}"), n + 1
    os.makedirs(dest)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(workdir, name)):
            os.rename(os.path.join(workdir, name), os.path.join(dest, name))
    return dest


def _write_config(workdir: str, cfg: TrainConfig) -> None:
    # overwrite is an action, not a property of the run: a rerun of the same command resumes
    save_config(dataclasses.replace(cfg, overwrite=False), workdir)


@contextlib.contextmanager
def _open_here(workdir: str, cfg: TrainConfig):
    if not cfg.overwrite:
        check_resumable(workdir, cfg)  # before any file is touched
    with WorkdirLock(workdir):
        if cfg.overwrite and holds_run(workdir):
            dest = move_run_aside(workdir)
            log.warning("overwrite=true: moved the previous run's files to %s", dest)
        else:
            check_resumable(workdir, cfg)  # again, now that no other writer can change it
        _write_config(workdir, cfg)
        yield


@contextlib.contextmanager
def training_workdir(workdir: str | os.PathLike, cfg: TrainConfig):
    """Hold ``workdir`` for training ``cfg`` (see the module docstring); re-entrant."""
    workdir = os.path.abspath(os.fspath(workdir))
    if jax.process_count() == 1:
        with _open_here(workdir, cfg):
            yield
        return
    from jax.experimental import multihost_utils
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(_open_here(workdir, cfg))
            except UserError as e:
                error = e
        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if error is not None:
            raise error
        if failed:
            raise UserError(f"process 0 could not open {workdir} for training (see its error)")
        yield
