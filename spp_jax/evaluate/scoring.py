"""Scoring test views with the serving layer: crops through the whole net, windows on conv maps.

* ``score_crops``: (N, S, S, 3) crops -> (N, classes) softmax probabilities.
* ``score_windows``: an image and its flip in one bucket-padded batch, conv maps once
  (exact: masked to the image), then window pyramid pooling and the fc layers per
  window (the paper's multi-view testing on feature maps, and the "full" view when
  the window is the whole map).
"""
from __future__ import annotations

import numpy as np

from spp_jax.serve import Server


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Scorer:
    """Scores views of images with one :class:`~spp_jax.serve.Server` (network, variables, mean).

    ``compiled_shapes``: the programs used (the server's), kept few by buckets.
    """

    def __init__(self, server: Server):
        self.server = server

    @property
    def compiled_shapes(self) -> set:
        return self.server.programs

    def score_crops(self, x: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) mean-subtracted float crops -> (N, classes) probabilities."""
        s = self.server
        return softmax(s.head(s.pooled(s.conv(s.batch(np.asarray(x, np.float32)))))["logits"])

    def score_full(self, image: np.ndarray, padded_shape: tuple[int, int]) -> np.ndarray:
        """The whole image as one view (the "1 full" view, without its flip).

        (h, w, 3) mean-subtracted float image, static (H, W) bucket >= (h, w) ->
        (classes,) probabilities: the pyramid of the valid conv map (masked, exact: the
        same as the unpadded image), then the fc layers.
        """
        if self.server.model.spp is False:
            raise ValueError("the full view of an arbitrary-size image needs an SPP model (spp=True)")
        s = self.server
        return softmax(s.head(s.pooled(s.conv(s.batch([image], padded_shape))))["logits"])[0]

    def score_windows(self, image: np.ndarray, boxes: np.ndarray, padded_shape: tuple[int, int],
                      num_slots: int, include_full: bool = False) -> np.ndarray:
        """Windows on the conv maps of an image and of its horizontal flip.

        Args:
          image: (h, w, 3) mean-subtracted float image (one scale).
          boxes: (K, 4) windows in that image's pixels (the same positions are
            used on the flipped image; the view sets used are flip-symmetric).
            K <= num_slots.
          padded_shape: static (H, W) bucket, >= (h, w).
          num_slots: static number of window slots (windows are padded by
            repeating the last one, so one program serves every K).
          include_full: append the "full" view: the whole valid conv map.
        Returns:
          (2, K (+1), classes) probabilities: [original, flipped] x windows (x full).
        """
        if self.server.model.spp is False:
            raise ValueError("window views on feature maps need an SPP model (spp=True)")
        k = len(boxes) + int(include_full)
        if not 1 <= k <= num_slots:
            raise ValueError(f"need 1..{num_slots} windows, got {k}")
        s = self.server
        maps = s.conv(s.batch([image, image[:, ::-1]], padded_shape))
        mh, mw = maps.hw[0]
        cells = s.cells(boxes, (mh, mw))
        if include_full:
            cells = np.concatenate([cells, [[0, 0, mw - 1, mh - 1]]]).astype(np.int32)
        pooled = s.pool_windows(maps, [cells, cells], chunk=num_slots)
        return softmax(s.head(np.concatenate(pooled))["logits"]).reshape(2, k, -1)
