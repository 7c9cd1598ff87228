"""XLA compile options of the library's compiled programs: the one place they are chosen.

On CPU this jaxlib hands convolutions, dots and reductions to its YNN library
(``xla_cpu_experimental_ynn_fusion_type``, by default its individual convolutions and dots
and its reductions). Its convolutions barely use a second core, so the library keeps only
YNN's dots and reductions (``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`` and ``_REDUCE``) and lets
XLA's own convolutions run:

- dropping YNN's convolutions made conv1's weight gradient ~2x and the embedded train
  step ~1.25-1.4x faster on a 2-core machine (2026-12-05, bench rows 3-4);
- keeping its dots and reductions (they had been dropped with the convolutions until
  2026-12-06) is another 1.08x / 1.14x on the embedded step at 224 / 180 px, 1.12x on
  the full-width ZF-5 SGD step (batch 8) and 1.53x on Overfeat-7's (batch 4, its fc6 is a
  large dot); XLA's own max reductions ran ``spp_jax.pool``'s forward 2.6-4.5x slower
  (measured in one process, alternated pairs, 2026-12-06).

Other backends get no options.

A jaxlib that does not know an option (older or newer than the one pinned) would refuse
the whole compile, so every option is tried once on a tiny program per backend; unknown
ones are dropped with one log line, and everything compiles with the defaults.

    from spp_jax import xla_options
    step = xla_options.jit(fn, donate_argnums=0)   # jax.jit with the options
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# Per platform: option -> value (strings, as XLA's debug options take them).
OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type":
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
}


def _accepted(name: str, value: Any) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
            jnp.zeros((), jnp.float32)).compile()
        return True
    except Exception as e:  # jaxlib raises its own runtime error type (INVALID_ARGUMENT)
        log.warning("XLA compile option %s=%r not accepted by this jaxlib (%s); compiling "
                    "without it", name, value, str(e).splitlines()[0][:120])
        return False


@functools.cache
def _resolved(backend: str) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in OPTIONS.get(backend, {}).items() if _accepted(k, v))


def compiler_options() -> dict[str, Any]:
    """The options for JAX's default backend that this jaxlib accepts (tried once per process)."""
    return dict(_resolved(jax.default_backend()))


class _Jit:
    """``jax.jit`` created at the first call, so importing a module that uses :func:`jit`
    neither starts a backend nor compiles the option probe."""

    def __init__(self, fun: Callable, kwargs: dict):
        self._fun, self._kwargs, self._jitted = fun, kwargs, None
        functools.update_wrapper(self, fun)

    def _get(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=compiler_options() or None,
                                   **self._kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._get().lower(*args, **kwargs)


def jit(fun: Callable | None = None, **kwargs):
    """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options`; usable as a decorator
    (``@functools.partial(xla_options.jit, static_argnames=...)``). Offers call and ``lower``."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _Jit(fun, kwargs)
