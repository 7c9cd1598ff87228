"""Atomic file writes: the one helper behind every table, config, cache and network file.

A reader, or a run killed mid-write and started again, finds either the old file or the
whole new one, never half of one: the content goes to a temporary file next to the target
(same directory, so the same filesystem and an atomic rename), which replaces the target
only once it is complete.

    with atomic.path("runs/x/eval.json") as tmp:     # any writer that takes a path
        np.savez(tmp, ...)
    atomic.write_text("runs/x/eval.md", markdown)
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def path(target: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write ``target``'s new content to; on a clean exit it replaces
    ``target``, on an exception it is deleted and ``target`` is left as it was.

    The temporary name keeps ``target``'s extension (``numpy.save`` / ``savez`` append theirs
    to a name without it, and matplotlib picks the image format from it) and holds the
    process id, so two processes writing one target do not share a temporary file.  The
    parent directory is created if needed.
    """
    target = os.fspath(target)
    parent = os.path.dirname(target)
    if parent:
        os.makedirs(parent, exist_ok=True)
    stem, ext = os.path.splitext(target)
    tmp = f"{stem}.tmp-{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``target`` atomically; returns the path."""
    with path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return os.fspath(target)


def write_text(target: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``target`` atomically; returns the path."""
    return write_bytes(target, text.encode("utf-8"))
