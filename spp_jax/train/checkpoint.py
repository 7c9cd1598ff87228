"""Checkpoints: the train state and a JSON record per step, verified on every restore.

Each checkpoint (directory ``<workdir>/checkpoints/<step>``) holds two orbax items:

* ``state``: the :class:`~spp_jax.train.state.TrainState` pytree (StandardSave);
* ``meta``: a JSON dict -- epoch and position in the epoch, the data iterator's state
  (whatever JSON-able dict ``get_state()`` gave), the seed, the plateau controller, ...
  and ``integrity``: the path, shape, dtype and SHA-256 of every array of the state,
  taken from the host copy at save time (orbax itself checksums nothing).

Writing (:class:`Checkpointer`) is for the trainer alone, which holds the workdir lock
(:mod:`spp_jax.train.workdir`).  Saving is asynchronous (the arrays are copied to host
before ``save`` returns, so the caller may donate the state to the next step); orbax
writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a process
killed mid-save leaves no half checkpoint under a step name.  A state with a NaN or an
infinity is never saved.

Reading (:func:`read_checkpoint`: eval, transfer, detection backbones; and the trainer's
:meth:`Checkpointer.restore`) takes the steps newest first and, for each:

1. compares the stored array paths, shapes and dtypes with the expected state: a
   difference means the checkpoint belongs to another config -> ``CheckpointMismatch``
   (nothing is moved; the message names the arrays);
2. restores it and checks every array's SHA-256 against ``integrity``: an unreadable
   file or a wrong digest is corruption -> a warning, and the previous step is tried
   (the trainer also moves the corrupt one to ``<workdir>/corrupt_checkpoints/``; a
   reader never moves, deletes or creates anything);
3. checks that every array is finite -> ``NonFiniteError`` otherwise.

Checkpoints written before ``integrity`` existed get checks 1 and 3 only (logged).
This module imports nothing of the training loop: readers use it alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from spp_jax.errors import CheckpointMismatch, CorruptCheckpoint, NoCheckpoint, NonFiniteError

log = logging.getLogger(__name__)

INTEGRITY_KEY = "integrity"
CORRUPT_DIR = "corrupt_checkpoints"  # beside checkpoints/, where the trainer sets corrupt ones aside


class _Unusable(Exception):
    """One checkpoint failed its integrity check (internal: the caller falls back)."""


# ---------------------------------------------------------------------------------------
# Arrays: names, host copies, digests

def _leaf_name(path) -> str:
    """'params/backbone/conv1/kernel' for a pytree key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _named_leaves(tree) -> dict[str, Any]:
    return {_leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _spec(x) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))


def _host(x) -> np.ndarray:
    """A host copy of a (replicated) array: this process's replica when others hold the rest."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # the state is replicated: one local replica is all of it
    return np.asarray(x)


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _non_finite(arrays: dict[str, np.ndarray]) -> list[str]:
    return [n for n, a in arrays.items()
            if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all()]


def integrity_record(arrays: dict[str, np.ndarray]) -> dict:
    """``{"sha256": {name: hex digest}, "spec": {name: [shape, dtype]}}`` of host arrays."""
    return {"sha256": {n: _digest(a) for n, a in arrays.items()},
            "spec": {n: [list(a.shape), str(a.dtype)] for n, a in arrays.items()}}


def _spec_diff(stored: dict, expected: dict, limit: int = 3) -> list[str]:
    """Human-readable differences between two {name: (shape, dtype)} tables."""
    out = [f"{n}: stored {stored[n][0]} {stored[n][1]}, expected {expected[n][0]} {expected[n][1]}"
           for n in expected if n in stored and tuple(stored[n]) != tuple(expected[n])]
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing:
        out.append(f"missing {', '.join(missing[:limit])}" + (" ..." if len(missing) > limit else ""))
    if extra:
        out.append(f"unexpected {', '.join(extra[:limit])}" + (" ..." if len(extra) > limit else ""))
    return out[:limit + 2]


# ---------------------------------------------------------------------------------------
# Reading

def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the finished checkpoints in ``directory``, oldest first.

    Only directories named by their step count: in-flight saves
    (``<step>.orbax-checkpoint-tmp-*``) are neither listed nor touched.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _stored_specs(step_dir: str) -> dict[str, tuple]:
    try:
        tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")
    except Exception as e:  # noqa: BLE001 -- any unreadable metadata is corruption
        raise _Unusable(f"its array metadata is unreadable ({type(e).__name__}: {str(e)[:200]})")
    tree = getattr(tree, "tree", tree)
    return {n: _spec(x) for n, x in _named_leaves(tree).items()}


def _read_meta(step_dir: str) -> dict:
    try:
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise _Unusable(f"its metadata is unreadable ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(meta, dict) or "epoch" not in meta:
        raise _Unusable("its metadata is missing or incomplete")
    return meta


def _check_specs(step_dir: str, step: int, abstract_state, meta: dict) -> None:
    """CheckpointMismatch if the stored arrays are another network's (``_Unusable`` if the
    array metadata disagrees with the checkpoint's own integrity record)."""
    stored = _stored_specs(step_dir)
    expected = {n: _spec(x) for n, x in _named_leaves(abstract_state).items()}
    if stored == expected:
        return
    record = (meta.get(INTEGRITY_KEY) or {}).get("spec")
    if record is not None and {n: (tuple(s), d) for n, (s, d) in record.items()} != stored:
        raise _Unusable("its array metadata disagrees with its integrity record")
    raise CheckpointMismatch(
        f"checkpoint {step} in {os.path.dirname(step_dir)} holds another network than the config "
        f"describes ({'; '.join(_spec_diff(stored, expected))}): use the config it was trained "
        f"with (its workdir's config.json)")


def _restore_arrays(step_dir: str, abstract_state):
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        return ckptr.restore(epath.Path(step_dir) / "state", args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # noqa: BLE001 -- tensorstore raises assorted errors on bad files
        raise _Unusable(f"its arrays could not be read ({type(e).__name__}: {str(e)[:200]})")
    finally:
        ckptr.close()


def _read_step(step_dir: str, step: int, abstract_state):
    """``(state, meta)`` of one checkpoint, verified (see the module docstring)."""
    meta = _read_meta(step_dir)
    _check_specs(step_dir, step, abstract_state, meta)
    state = _restore_arrays(step_dir, abstract_state)
    arrays = {n: _host(x) for n, x in _named_leaves(state).items()}
    record = meta.get(INTEGRITY_KEY)
    if record is None:
        log.info("checkpoint %d predates integrity records: shapes and finiteness checked only", step)
    else:
        digests = record.get("sha256", {})
        bad = sorted(n for n, a in arrays.items() if digests.get(n) != _digest(a))
        if bad or set(digests) != set(arrays):
            raise _Unusable(f"{len(bad) or 'some'} arrays fail their SHA-256 check "
                            f"({', '.join(bad[:3]) or 'names differ'})")
    bad = _non_finite(arrays)
    if bad:
        raise NonFiniteError(
            f"checkpoint {step} in {os.path.dirname(step_dir)} holds NaN or infinite values "
            f"({', '.join(bad[:3])}): the run it comes from diverged; move {step_dir} out of the "
            f"way to use the checkpoint before it")
    return state, meta


def _restore_newest(directory: str, abstract_state, step: int | None, set_aside=None):
    steps = [step] if step is not None else checkpoint_steps(directory)[::-1]
    if not steps:
        raise NoCheckpoint(f"no checkpoints in {directory}")
    corrupt = []
    for s in steps:
        step_dir = os.path.join(directory, str(s))
        if not os.path.isdir(step_dir):
            if step is not None:
                raise NoCheckpoint(f"no checkpoint {s} in {directory} (steps: {checkpoint_steps(directory)})")
            log.info("checkpoint %d vanished while being read (rotated out by the trainer)", s)
            continue
        try:
            state, meta = _read_step(step_dir, s, abstract_state)
            return state, meta, s
        except _Unusable as e:
            if not os.path.isdir(step_dir):  # rotated out by a running trainer while we read it
                continue
            corrupt.append(s)
            msg = (f"checkpoint {s} in {directory} is corrupt: {e}; "
                   + ("moving it to " + CORRUPT_DIR + "/ and " if set_aside else "skipping it and ")
                   + "falling back to the previous checkpoint")
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
            if set_aside is not None:
                set_aside(s)
    raise CorruptCheckpoint(
        f"no intact checkpoint in {directory}: {', '.join(map(str, corrupt)) or 'none'} failed "
        f"their integrity checks (see the warnings)")


def read_checkpoint(directory: str | os.PathLike, abstract_state, *, step: int | None = None):
    """The newest intact checkpoint in ``directory`` (or exactly ``step``), verified; read only.

    Args:
      directory: a ``checkpoints/`` directory of a training workdir.
      abstract_state: the expected TrainState as a pytree of ``jax.ShapeDtypeStruct``
        (``jax.eval_shape`` of the initialiser; with shardings to restore sharded).
      step: restore this step only (no fallback).
    Returns:
      ``(state, meta, step)``: the restored TrainState (arrays of ``abstract_state``'s
      shapes and dtypes, all finite), its JSON metadata dict, its step.
    Raises (all ``spp_jax.errors.UserError``):
      NoCheckpoint: no finished checkpoint (or no ``step``);
      CheckpointMismatch: the stored arrays are another network's (another config);
      NonFiniteError: the newest intact checkpoint holds NaN / inf;
      CorruptCheckpoint: every checkpoint failed its integrity check.
    Corrupt checkpoints are skipped with a ``RuntimeWarning``.  Nothing in ``directory``
    is created, moved, deleted or cleaned (a running trainer's in-flight
    ``*.orbax-checkpoint-tmp-*`` directories are left alone), so it is safe while a
    trainer writes there.
    """
    return _restore_newest(os.path.abspath(os.fspath(directory)), abstract_state, step)


# ---------------------------------------------------------------------------------------
# Writing (the trainer)

class Checkpointer:
    """The trainer's checkpoints: orbax ``CheckpointManager`` writes, verified restores.

    Only the process holding the workdir lock may create one (it removes stale
    ``*.orbax-checkpoint-tmp-*`` directories of its own earlier, killed runs).  Close it
    on every path (``with Checkpointer(...) as ckpt:`` or ``close()`` in a finally):
    orbax's background threads otherwise keep the process alive.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def all_steps(self) -> list[int]:
        self.manager.reload()  # re-read the directory (another process may have written)
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, meta: dict[str, Any]) -> bool:
        """Start saving ``state`` and ``meta`` (plus its integrity record) as checkpoint
        ``step``; skipped if it exists.  Raises NonFiniteError for a NaN / inf state."""
        if step in self.manager.all_steps():
            return False
        t0 = time.perf_counter()
        arrays = {n: _host(x) for n, x in _named_leaves(state).items()}
        bad = _non_finite(arrays)
        if bad:
            raise NonFiniteError(f"refusing to save checkpoint {step}: NaN or infinite values in "
                                 f"{', '.join(bad[:3])}")
        meta = dict(meta, **{INTEGRITY_KEY: integrity_record(arrays)})
        ok = self.manager.save(int(step), force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        log.info("checkpoint %d: save started (%.2f s blocking)", step, time.perf_counter() - t0)
        return ok

    def restore(self, abstract_state, step: int | None = None):
        """``(state, meta, step)`` of the newest intact checkpoint (or ``step``), or None if
        there is none.  As :func:`read_checkpoint`, but a corrupt checkpoint is moved to
        ``<workdir>/corrupt_checkpoints/`` (with a warning) before the previous one is tried."""
        try:
            return _restore_newest(self.directory, abstract_state, step, set_aside=self._set_aside)
        except NoCheckpoint:
            return None

    def _set_aside(self, step: int) -> None:
        src = os.path.join(self.directory, str(step))
        dst_dir = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
        if os.path.isdir(src) and jax.process_index() == 0:
            os.makedirs(dst_dir, exist_ok=True)
            shutil.move(src, os.path.join(dst_dir, f"{step}-{int(time.time())}"))
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then stop orbax's threads (also when a save failed)."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()
