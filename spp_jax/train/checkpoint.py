"""Checkpoints with orbax's CheckpointManager: train state + JSON metadata per step.

Each checkpoint (directory ``<workdir>/checkpoints/<step>``) holds two items:

* ``state``: the :class:`~spp_jax.train.state.TrainState` pytree (StandardSave);
* ``meta``: a JSON dict -- epoch and position in the epoch, the data iterator's state
  (whatever JSON-able dict ``get_state()`` gave), the seed, the plateau controller, ...

Saving is asynchronous (the arrays are copied to host before ``save`` returns, so the
caller may donate the state to the next step); orbax writes into a temporary directory
and renames it when complete, so a process killed mid-save leaves no half checkpoint
under a step name.  Restoring walks the steps newest first: a checkpoint that fails to
restore (a truncated or deleted file) is moved to ``<workdir>/corrupt_checkpoints/`` with
a warning and the previous one is tried.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        self.manager.reload()  # re-read the directory (another process may have written)
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, meta: dict[str, Any]) -> bool:
        """Start saving ``state`` and ``meta`` as checkpoint ``step`` (skipped if it exists)."""
        if step in self.manager.all_steps():
            return False
        t0 = time.perf_counter()
        ok = self.manager.save(int(step), force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        log.info("checkpoint %d: save started (%.2f s blocking)", step, time.perf_counter() - t0)
        return ok

    def restore(self, abstract_state, step: int | None = None):
        """Restore ``(state, meta, step)`` from ``step`` or the newest loadable checkpoint.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings.
        Returns None if there is no usable checkpoint.
        """
        steps = [step] if step is not None else self.all_steps()[::-1]
        for s in steps:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                meta = out["meta"]
                if not isinstance(meta, dict) or "epoch" not in meta:
                    raise ValueError("metadata missing or incomplete")
                return out["state"], meta, s
            except Exception as e:  # noqa: BLE001 -- any failure means "unusable"
                msg = (f"checkpoint {s} in {self.directory} could not be restored "
                       f"({type(e).__name__}: {str(e)[:300]}); moving it aside and "
                       f"falling back to the previous checkpoint")
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log.warning(msg)
                self._quarantine(s)
                if step is not None:
                    return None
        return None

    def _quarantine(self, step: int) -> None:
        src = os.path.join(self.directory, str(step))
        dst_dir = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        if os.path.isdir(src):
            import jax
            if jax.process_index() == 0:
                os.makedirs(dst_dir, exist_ok=True)
                shutil.move(src, os.path.join(dst_dir, f"{step}-{int(time.time())}"))
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
