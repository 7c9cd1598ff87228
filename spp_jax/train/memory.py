"""A rough training-memory estimate, checked against available RAM before compiling on CPU."""
from __future__ import annotations

import logging
import os

from spp_jax import bins as B
from spp_jax.models import layers as L
from spp_jax.models.sppnet import scaled_specs

log = logging.getLogger(__name__)

# Bytes kept per forward activation value during a training step: the activation itself
# (saved for the backward pass), its gradient, and XLA temporaries (padding, ReLU masks,
# LRN intermediates, conv workspace) -- ~3 float32 values is what CPU memory profiles of
# these nets show, rounded up.
_BYTES_PER_ACTIVATION = 4 * 3


def estimate_train_bytes(model: str, width: float, fc_dim: int, levels, num_classes: int,
                         size: int, batch_size: int, spp: bool = True) -> int:
    """Activations of one device's batch plus params, gradients and momentum (float32)."""
    specs = scaled_specs(model, width)
    side, channels, act, n_params = size, 3, size * size * 3, 0
    for s in specs:
        side = L.spec_out_size(side, s)
        if isinstance(s, L.Conv):
            n_params += s.kernel * s.kernel * channels * s.features + s.features
            channels = s.features
            act += 2 * side * side * channels  # conv output and ReLU output
        else:
            act += (3 if isinstance(s, L.LRN) else 1) * side * side * channels
    pooled = B.output_dim(channels, tuple(levels)) if spp else channels * 36
    n_params += pooled * fc_dim + fc_dim * fc_dim + fc_dim * num_classes + 2 * fc_dim + num_classes
    act += pooled + 4 * fc_dim + num_classes
    return int(batch_size * act * _BYTES_PER_ACTIVATION + n_params * 4 * 3)


def available_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(mode: str, *, model, width, fc_dim, levels, num_classes, sizes,
                 per_device_batch, devices_per_host, spp=True) -> int:
    """Warn (``mode="warn"``) or raise MemoryError (``"error"``) if the estimate for the
    largest size exceeds the available RAM; returns the estimate in bytes."""
    if mode == "off":
        return 0
    size = max(sizes)
    est = devices_per_host * estimate_train_bytes(model, width, fc_dim, levels, num_classes,
                                                  size, per_device_batch, spp)
    avail = available_ram_bytes()
    log.info("estimated training memory at %dx%d: %.2f GiB per host (available RAM: %s)", size,
             size, est / 2**30, "unknown" if avail is None else f"{avail / 2**30:.2f} GiB")
    if avail is not None and est > 0.8 * avail:
        msg = (f"a training step of {model} (width {width}) at {size}x{size} with "
               f"{per_device_batch} images per device x {devices_per_host} local devices needs "
               f"roughly {est / 2**30:.1f} GiB, but only {avail / 2**30:.1f} GiB of RAM is "
               f"available: it will probably run out of memory. Reduce batch_size, the input "
               f"sizes, width or fc_dim (e.g. the 'embedded' preset), or set memory_check=off.")
        if mode == "error":
            raise MemoryError(msg)
        log.warning(msg)
    return est
