"""Errors a user can cause: a bad option, file, input or workdir state.

Entry points print these as one ``error: ...`` line and exit non-zero; any other
exception escaping an entry point is a bug and keeps its traceback.  Library code
raises the most specific subclass, whose message says what is wrong and how to fix it.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for or gave (the message names it and the way out)."""


class ConfigError(UserError, ValueError):
    """A config key, value or config file that cannot be used (a ValueError, as before)."""


class InputError(UserError, ValueError):
    """An input array or file that cannot be used: wrong shape, type or values (a ValueError)."""


class CheckpointMismatch(UserError, ValueError):
    """A workdir or checkpoint was written with another config than the one asked for
    (the message names the differing keys, old -> new, and the ways out)."""


class CorruptCheckpoint(UserError, ValueError):
    """A checkpoint failed its integrity check (checksum, unreadable file) and no intact
    one was left to fall back to."""


class NoCheckpoint(UserError, FileNotFoundError):
    """A workdir holds no checkpoint to read (a FileNotFoundError, as before)."""


class WorkdirLocked(UserError):
    """Another process is training in the workdir (the message names its PID)."""


class NonFiniteError(UserError, ValueError):
    """Training produced, or a checkpoint holds, NaN or infinite values."""
