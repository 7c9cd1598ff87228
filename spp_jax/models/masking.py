"""Exact padding: which cells of every layer belong to each image of a padded batch.

Images of different sizes run as one compiled program when they are zero-padded at
the bottom/right to one bucket shape. Past the first layer the padded region is not
zero any more (conv biases, windows that overlap the image's edge), and the pad-1
convolutions and ceil-mode pools next to the border would read it. Setting every
cell beyond the image's own extent to zero after each layer makes the valid cells
equal the unpadded network's, for every layer, size and bucket, because

* the unpadded network pads its convolutions and LRN windows with zeros, which is
  what the zeroed region then holds;
* max pools see activations after ReLU (and LRN, which keeps signs), all >= 0, so
  the extra zeros a window sees beside its real cells never win the max (a ceil-mode
  window hanging over the edge starts inside the image, so it has a real cell).

The extent after each layer uses the layer's own size arithmetic
(:func:`~spp_jax.models.layers.conv_out`, :func:`~spp_jax.models.layers.pool_out`,
Caffe ceil mode included), on Python ints or integer arrays alike.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from spp_jax.models import layers as L


def out_extent(spec, size):
    """Valid output length of one layer for valid input length(s) ``size`` (int or int array).

    No check: a too-small size gives a length < 1 (see :func:`valid_extents`).
    """
    if isinstance(spec, L.Conv):
        return L.conv_out(size, spec)
    if isinstance(spec, L.Pool):
        return L.pool_out(size, spec)
    return size  # LRN keeps the size


def valid_extents(specs: Sequence, hw) -> list[np.ndarray]:
    """Host-side extents: (B, 2) int image sizes -> [(B, 2) int32 after each layer of ``specs``].

    Raises ValueError when an image is too small for a layer (as the unpadded
    network would, :func:`~spp_jax.models.layers.spec_out_size`).
    """
    cur = np.asarray(hw, np.int64).reshape(-1, 2)
    out = []
    for s in specs:
        cur = np.vectorize(lambda v, s=s: L.spec_out_size(int(v), s), otypes=[np.int64])(cur) \
            if cur.size else cur
        out.append(cur.astype(np.int32))
    return out


def mask_beyond(x, valid_hw):
    """Zero every cell of (B, H, W, C) ``x`` outside its image's valid (h, w) (``valid_hw`` (B, 2) int)."""
    rows = jnp.arange(x.shape[1])[None, :] < valid_hw[:, :1]  # (B, H)
    cols = jnp.arange(x.shape[2])[None, :] < valid_hw[:, 1:]  # (B, W)
    keep = rows[:, :, None, None] & cols[:, None, :, None]
    return jnp.where(keep, x, jnp.zeros((), x.dtype))
