"""SPP window features: conv maps once per image and scale, pool5 per window (SPP_FACTS section 6).

A thin user of the serving layer (:class:`spp_jax.serve.Server`). For one image:

1. For each scale s some window needs, the image is resized to shorter side s,
   minus the mean (the constant 128 by default, Appendix A), padded at the
   bottom/right to a bucket shape (the longer side rounded up to a multiple of
   s/2: at most 5 shapes per scale, so at most 5 compiled conv programs per scale)
   and its conv map computed once, masked to the image so every cell equals the
   unpadded network's.
2. Each window gets one scale (:func:`spp_jax.detection.scales.choose_scales`), is
   scaled into that image's pixels and projected with the model's geometry onto
   the valid map of the resized image.
3. Windows of one scale that project to the same cells are pooled once (the
   released code's trick) in fixed-size chunks (one program per bucket map shape).

fc6 / fc7 of pool5 come later, from the cache (:func:`spp_jax.serve.fc_layers`).
pool5 is ``C * 50`` wide (12,800 for the full ZF-5), float32 in memory.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from spp_jax.bins import output_dim
from spp_jax.detection.boxes import scale_boxes
from spp_jax.detection.scales import choose_scales
from spp_jax.serve import Maps, Server

__all__ = ["SPPExtractor", "resize_for_scale"]


def resize_for_scale(image: np.ndarray, side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize so the shorter side is ``side``; return the image and (sy, sx) box factors."""
    from spp_jax.data.augment import resize_shorter
    out = resize_shorter(image, side)
    return out, (out.shape[0] / image.shape[0], out.shape[1] / image.shape[1])


class SPPExtractor:
    """pool5 features of image windows with SPP (conv once per image per scale).

    Args:
      server: the network, its variables and mean (:class:`~spp_jax.serve.Server`; its
        ``pool_chunk`` windows per pooling call, ``bucket_step`` the bucket granularity).
      scales: shorter sides in pixels, e.g. (688,) or (480, 576, 688, 864, 1200).
      rule: per-window scale rule, "area" (paper) or "released" (208 rule).
    """

    kind = "spp"

    def __init__(self, server: Server, scales: Sequence[int] = (688,), rule: str = "area"):
        if not server.model.spp:
            raise ValueError("SPP window features need an SPP model (spp=True)")
        self.server, self.model = server, server.model
        self.scales, self.rule = tuple(int(s) for s in scales), rule
        self.levels = tuple(self.model.levels)
        self.stats = {"images": 0, "conv_s": 0.0, "pool_s": 0.0, "windows": 0, "unique": 0}

    @property
    def dim(self) -> int:
        """pool5 length: channels x sum(n^2) over the levels (12,800 for the full ZF-5)."""
        return output_dim(self.model.channels, self.levels)

    def key(self) -> dict:
        """Everything that changes the features (for cache keys)."""
        return {"kind": "spp", "net": self.server.fingerprint, "scales": list(self.scales), "rule": self.rule}

    def conv_map(self, image: np.ndarray, scale: int) -> tuple[Maps, tuple[float, float]]:
        """Conv map of uint8 ``image`` at one scale: (maps of a batch of one, (sy, sx) box factors)."""
        resized, factors = resize_for_scale(image, scale)
        sv = self.server
        view = sv.subtract_mean(resized)
        return sv.conv(sv.batch([view], sv.bucket(view.shape[0], view.shape[1], scale))), factors

    def pool5(self, image: np.ndarray, boxes, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """pool5 of windows of one image.

        Args:
          image: uint8 (H, W, 3) RGB.
          boxes: (R, 4) windows in ``image`` pixels (0-based inclusive), R >= 1.
          flip: compute on the left-right flipped image (``boxes`` are then
            windows of the *flipped* image).
        Returns:
          pool5 (R, D) float32, scale_idx (R,) int64 (index into ``scales``).
        """
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            raise ValueError("no windows to pool (empty box list)")
        if flip:
            image = image[:, ::-1]
        sidx = choose_scales(boxes, image.shape[:2], self.scales, self.rule)
        out = np.zeros((len(boxes), self.dim), np.float32)
        t_conv = t_pool = 0.0
        n_unique = 0
        for si, s in enumerate(self.scales):
            sel = np.flatnonzero(sidx == si)
            if sel.size == 0:
                continue  # no window wants this scale: skip its conv map
            t0 = time.perf_counter()
            maps, factors = self.conv_map(image, s)
            maps.fmap.block_until_ready()
            t1 = time.perf_counter()
            cells = self.server.cells(scale_boxes(boxes[sel], factors), maps.hw[0])
            uniq, inv = np.unique(cells, axis=0, return_inverse=True)
            out[sel] = self.server.pool_windows(maps, [uniq.astype(np.int32)])[0][inv.reshape(-1)]
            n_unique += len(uniq)
            t_conv += t1 - t0
            t_pool += time.perf_counter() - t1
        st = self.stats
        st["images"] += 1
        st["conv_s"] += t_conv
        st["pool_s"] += t_pool
        st["windows"] += len(boxes)
        st["unique"] += n_unique
        return out, sidx

    def describe(self) -> str:
        progs = sorted(p for p in self.server.programs if p[0] == "conv")
        return (f"SPP {self.model.arch} width {self.model.width} scales {self.scales} rule {self.rule}: "
                f"{len(progs)} conv program(s) {[p[1] for p in progs]}, "
                f"{sum(p[0] == 'windows' for p in self.server.programs)} pooling program(s)")
