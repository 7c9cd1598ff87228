"""Native CPU kernels, built from source on first use and registered as XLA FFI targets.

What: ``conv.cc`` (convolutions and their kernel gradients, :mod:`spp_jax.native.conv`) and
``pool.cc`` (spatial pyramid max pooling and its gradient, :mod:`spp_jax.native.pool`),
sharing ``parallel.h``. Why native: XLA's CPU convolutions are the train step's bound, and
its uneven pyramid bins the slowest part of ``pool`` (README "How it is fast"); these kernels
are direct loops that XLA calls like its own ops inside a compiled step.

How: :func:`build` compiles them into one library once per machine with the system C++ compiler
(``$CXX``, else ``c++``; ``-O3 -march=native``, so it is built where it runs) against the FFI
headers that ship with jaxlib, into ``$SPP_JAX_NATIVE_CACHE`` (default
``~/.cache/spp_jax/native``) under a name hashing the source, the flags, the jaxlib version
and the CPU's feature flags; the file is written atomically (parallel test workers may build
it at once). Nothing is downloaded.

Fallback: :func:`available` is False, and every caller keeps XLA's own ops, when the backend
is not the CPU, ``SPP_JAX_NATIVE=0`` is set, the CPU lacks AVX-512 (:func:`cpu_supported`),
or the build fails (no compiler: one warning line, the reason, once per process).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess

import jax

from spp_jax import atomic

log = logging.getLogger(__name__)

_HERE = os.path.dirname(__file__)
SOURCES = tuple(os.path.join(_HERE, f) for f in ("conv.cc", "pool.cc", "winograd.cc"))
HEADERS = (os.path.join(_HERE, "parallel.h"),)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
#: FFI target name -> exported handler symbol of the library
TARGETS = {"spp_conv_forward": "SppConvForward", "spp_conv_kernel_grad": "SppConvKernelGrad",
           "spp_pyramid_max": "SppPyramidMax", "spp_pyramid_max_grad": "SppPyramidMaxGrad",
           "spp_winograd_input": "SppWinogradInput", "spp_winograd_input_grad": "SppWinogradInputGrad",
           "spp_winograd_output": "SppWinogradOutput",
           "spp_winograd_output_grad": "SppWinogradOutputGrad"}


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds for them), '' where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> str:
    return os.environ.get("SPP_JAX_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "spp_jax", "native")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not on PATH; set CXX)")
    return cxx


def build() -> str:
    """Path of the compiled library, building it first unless the cache holds it."""
    src = []
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            src.append(f.read())
    cxx = _compiler()
    key = hashlib.sha256(b"\0".join([*src, " ".join((cxx,) + FLAGS).encode(),
                                     jax.__version__.encode(), _cpu_flags().encode()]))
    target = os.path.join(_cache_dir(), f"spp_native-{key.hexdigest()[:16]}.so")
    if os.path.exists(target):
        return target
    with atomic.path(target) as tmp:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", "-o", tmp, *SOURCES, "-lpthread"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    log.info("built %s", target)
    return target


@functools.cache
def _load() -> bool:
    lib = ctypes.CDLL(build())
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def cpu_supported() -> bool:
    """Whether this CPU has AVX-512 (``avx512f``). Why required: the kernels' tiles keep up to
    24 accumulators and their operands in vector registers, sized for AVX-512's 32, and were
    measured only there (AMD Zen 4); with AVX2's 16 narrower ones they would spill, so other
    CPUs keep XLA's convolutions."""
    return "avx512f" in _cpu_flags().split()


def available() -> bool:
    """True when the native kernels can run here (see the module docstring); builds and
    registers them on the first call."""
    if os.environ.get("SPP_JAX_NATIVE", "1") == "0" or jax.default_backend() != "cpu":
        return False
    return _cpu_ok() and _try_load()


def usable() -> bool:
    """:func:`available`, and JAX sees one device. Why: XLA does not partition an FFI call, so
    in a program sharded over several devices each would gather and compute the whole op."""
    return jax.device_count() == 1 and available()


@functools.cache
def _cpu_ok() -> bool:
    if not cpu_supported():
        log.warning("native CPU kernels unavailable, using XLA's ops: this CPU has no "
                    "AVX-512 (avx512f), where they were built and measured")
        return False
    return True


@functools.cache
def _try_load() -> bool:
    try:
        return _load()
    except Exception as e:  # no compiler, a failed build, an unloadable library
        log.warning("native CPU kernels unavailable, using XLA's ops: %s",
                    str(e).splitlines()[0][:300])
        return False
