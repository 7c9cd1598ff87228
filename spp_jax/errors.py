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
