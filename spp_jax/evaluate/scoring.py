"""Compiled scoring of test views for an SPPNet: crops through the whole net, windows on maps.

Two jitted programs, each compiled once per input shape and reused:
  * ``score_crops``: (N, S, S, 3) crops -> (N, classes) softmax probabilities.
  * ``score_windows``: an image and its flip, padded to a bucket shape, plus the
    same (K, 4) windows in map cells -> (2, K, classes): conv maps once, then
    window pyramid pooling and fc layers per window (the paper's multi-view
    testing on feature maps, and the "full" view when the window is the map).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.evaluate.views import pad_image
from spp_jax.geometry import project_boxes
from spp_jax.models.sppnet import SPPNet, map_size
from spp_jax.roi import roi_pool_cells


class Scorer:
    """Scores views of images with one model and one set of variables.

    The number of compiled programs equals the number of distinct input shapes
    seen (``compiled_shapes``), which the caller keeps small with buckets.
    """

    def __init__(self, model: SPPNet, variables: Any):
        self.model = model
        self.variables = variables
        self.compiled_shapes: set[tuple] = set()

        @jax.jit
        def crops(v, x):
            return jax.nn.softmax(model.apply(v, x, train=False), axis=-1)

        @jax.jit
        def windows(v, images, cells):
            fmap = model.apply(v, images, method=SPPNet.conv_map)  # (2, h, w, C)
            pooled = jax.vmap(functools.partial(roi_pool_cells, levels=tuple(model.levels)))(fmap, cells)
            k = cells.shape[1]
            out = model.apply(v, pooled.reshape(2 * k, -1), method=SPPNet.head)
            return jax.nn.softmax(out["logits"], axis=-1).reshape(2, k, -1)

        self._crops, self._windows = crops, windows

    def score_crops(self, x: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) mean-subtracted float crops -> (N, classes) probabilities."""
        self.compiled_shapes.add(("crops",) + tuple(x.shape))
        return np.asarray(self._crops(self.variables, jnp.asarray(x, jnp.float32)))

    def score_windows(self, image: np.ndarray, boxes: np.ndarray, padded_shape: tuple[int, int],
                      num_slots: int, include_full: bool = False) -> np.ndarray:
        """Windows on the conv maps of an image and of its horizontal flip.

        Args:
          image: (h, w, 3) mean-subtracted float image (one scale).
          boxes: (K, 4) windows in that image's pixels (the same positions are
            used on the flipped image; the view sets used are flip-symmetric).
            ``None`` entries are not allowed; K <= num_slots.
          padded_shape: static (H, W) bucket, >= (h, w).
          num_slots: static number of window slots (windows are padded by
            repeating the last one, so one program serves every K).
          include_full: append the "full" view: the whole valid conv map.
        Returns:
          (2, K (+1), classes) probabilities: [original, flipped] x windows (x full).
        """
        if self.model.spp is False:
            raise ValueError("window views on feature maps need an SPP model (spp=True)")
        h, w = image.shape[:2]
        k = len(boxes) + int(include_full)
        if not 1 <= k <= num_slots:
            raise ValueError(f"need 1..{num_slots} windows, got {k}")
        both = np.stack([pad_image(image, padded_shape), pad_image(image[:, ::-1], padded_shape)])
        # The valid part of the padded map is the map of the unpadded image: windows are
        # projected and clamped to it, so padding cells are never pooled.
        valid_hw = (map_size(self.model.arch, h), map_size(self.model.arch, w))
        cells = np.asarray(project_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), self.model.geometry,
                                         valid_hw, xp=np)).reshape(-1, 4)
        if include_full:
            cells = np.concatenate([cells, [[0, 0, valid_hw[1] - 1, valid_hw[0] - 1]]]).astype(np.int32)
        cells = np.concatenate([cells, np.repeat(cells[-1:], num_slots - k, axis=0)])
        self.compiled_shapes.add(("windows",) + tuple(both.shape))
        out = self._windows(self.variables, jnp.asarray(both), jnp.asarray(np.stack([cells, cells])))
        return np.asarray(out)[:, :k]
