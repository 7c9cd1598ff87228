"""Per-image input normalisation ahead of conv1 (an option; the paper has none).

``gray_std`` turns each image into its channel mean (a gray image) shifted and scaled to
zero mean and unit standard deviation over the image's own pixels, the same in the three
input channels (passed on as one channel; conv1 folds its kernel, see :func:`gray_level`).
Why it exists: on the embedded shapes data the class is the silhouette alone, while
colour, fill, background and brightness are random; with the raw colour input the embedded
Overfeat-7 sits at chance for 3-5 epochs (README, "Why the plateau remains"), and this
input left the plateau 2.3 epochs sooner over 3 seeds at equal error. It is not the paper's
input, so the default is ``none``; the embedded training preset uses it.

With a padded batch (``valid_hw``) the statistics use each image's valid pixels only, so
a padded image normalises exactly as it would alone (up to float summation order).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from spp_jax.models import masking as M

INPUT_NORMS = ("none", "gray_std")
_EPS = 1e-6  # in squared input units; an image of one colour maps to zeros, not NaN


def check_input_norm(name: str) -> str:
    if name not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {name!r}; valid: {', '.join(INPUT_NORMS)}")
    return name


def takes_gray_batches(name: str) -> bool:
    """Whether a net with input norm ``name`` may be trained on gray (B, S, S, 1) batches
    without a colour offset: true for ``gray_std``, which averages the channels and removes
    any per-image offset itself."""
    return check_input_norm(name) == "gray_std"


def gray_level(x, valid_hw=None):
    """(B, H, W, 3) (or already gray (B, H, W, 1)) images -> (B, H, W, 1): per image, gray =
    mean over channels, then (gray - mean) / std over the image's pixels (the top-left ``valid_hw[b]`` = (h, w) of
    image b when given, (B, 2) int; else all H x W).

    One channel standing for three equal ones: the backbone's conv1 then convolves it
    with its kernel summed over the input channels (:class:`spp_jax.models.sppnet.InputConv`),
    the same function with a third of conv1's work. Cells outside an image's valid region
    hold unmasked values; the backbone zeroes them.
    """
    g = jnp.mean(x, axis=-1, keepdims=True)
    if valid_hw is None:
        mu = jnp.mean(g, axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(g - mu), axis=(1, 2, 3), keepdims=True)
    else:
        n = (valid_hw[:, 0] * valid_hw[:, 1]).astype(x.dtype)[:, None, None, None]
        mu = jnp.sum(M.mask_beyond(g, valid_hw), axis=(1, 2, 3), keepdims=True) / n
        var = jnp.sum(M.mask_beyond(jnp.square(g - mu), valid_hw), axis=(1, 2, 3), keepdims=True) / n
    return (g - mu) * lax.rsqrt(var + _EPS)


def gray_standardise(x, valid_hw=None):
    """(B, H, W, 3) images -> (B, H, W, 3): :func:`gray_level` in all 3 channels."""
    return jnp.broadcast_to(gray_level(x, valid_hw), x.shape)


def normalise_input(x, name: str, valid_hw=None):
    """Apply the named input normalisation: ``none`` returns ``x`` (B, H, W, 3) unchanged;
    ``gray_std`` returns :func:`gray_level`'s (B, H, W, 1), one channel for three equal ones."""
    return gray_level(x, valid_hw) if name == "gray_std" else x
