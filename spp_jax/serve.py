"""One path from images to SPP-net features: :class:`Server`.

Everything that runs a trained network on images goes through here: the testing
protocols (:mod:`spp_jax.evaluate`), transfer features (:mod:`spp_jax.transfer`),
detection's SPP features and its R-CNN mode (:mod:`spp_jax.detection`)::

    uint8 image --prepare--> float view (shorter side resized, maybe centre-cropped, mean subtracted)
      --batch--> (B, H, W, 3) padded at the bottom/right to a bucket shape + each image's (h, w)
      --conv / conv_layers--> conv maps masked to each image + each image's valid map size
      --pooled / pool_whole--> the pyramid (or no-SPP pool) of each image's valid map
      --cells + pool_windows--> image windows projected onto the map, pyramid-pooled
      --head / fc_layers--> fc6, fc7, logits through the model's own Head

Static shapes, on purpose: images of any size share a few bucket shapes per scale
(:func:`bucket_shape`), batches have a caller-chosen fixed size, windows come in
fixed-size chunks and fc rows are padded to a few sizes, so there is one compiled
program per shape actually used (``Server.programs`` lists them). The padding is
exact: the model masks every layer to each image's extent
(:mod:`spp_jax.models.masking`), so every valid cell, pyramid and window equals what
the unpadded network gives for that image alone.

One fingerprint (:attr:`Server.fingerprint`) identifies network, parameters and
mean for on-disk feature caches.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import xla_options
from spp_jax.data import augment
from spp_jax.data.pipeline import MeanCache
from spp_jax.geometry import project_boxes
from spp_jax.models import Head, SPPNet, scaled_specs
from spp_jax.models import layers as L
from spp_jax.models import masking as M
from spp_jax.pooling import pool as spp_pool
from spp_jax.pooling import transposed_layout
from spp_jax.roi import roi_pool_cells

__all__ = ["Batch", "Maps", "Server", "bucket_shape", "fc_call_rows", "fc_layers", "params_fingerprint", "unique_rows"]

FC_CHUNK = 512  # rows per fc call; fewer rows are padded to a multiple of FC_CHUNK // 8


def bucket_shape(h: int, w: int, scale: int, step: float = 0.5) -> tuple[int, int]:
    """Padded (H, W) for an image resized to shorter side ``scale``.

    The longer side is rounded up to a multiple of ``step * scale`` so images of
    any aspect ratio share a few static shapes per scale (one compiled program
    each): with step 0.5 and aspect ratios up to 2, the shapes are s x s,
    s x 1.5s, s x 2s and their transposes.
    """
    q = max(1, int(round(step * scale)))
    ph, pw = -(-h // q) * q, -(-w // q) * q
    return max(ph, h), max(pw, w)


def params_fingerprint(tree: Any) -> str:
    """A short hash of every array (path, shape, dtype, values) of a pytree."""
    h = hashlib.sha1()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: str(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode() + str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Prepared images of one bucket.

    pixels: (B, H, W, 3) float32, each image at the top-left, zero elsewhere.
    hw: (B, 2) int32 each image's (height, width).
    count: the real images; slots ``count..B-1`` repeat the last one (a fixed batch size).
    """

    pixels: np.ndarray
    hw: np.ndarray
    count: int


@dataclasses.dataclass(frozen=True)
class Maps:
    """Conv maps of a batch: ``fmap`` (B, h, w, C) jax array, zero outside each image's
    valid ``hw`` (B, 2) int32 cells (the unpadded image's map size)."""

    fmap: jax.Array
    hw: np.ndarray

    @property
    def whole(self) -> bool:
        """True when no map is padded (every image filled its slot)."""
        return bool((self.hw == np.asarray(self.fmap.shape[1:3])).all())


@functools.partial(xla_options.jit, static_argnames=("model", "taps"))
def _conv(model, variables, images, valid_hw, taps):
    """(B, H, W, 3), (B, 2) or None -> last conv map, {tap: conv map} (see Server.conv_layers)."""
    if taps:
        out, state = model.apply(variables, images, valid_hw=valid_hw, method=SPPNet.conv_map,
                                 mutable=["intermediates"])
        inter = state["intermediates"]["backbone"]
    else:
        out, inter = model.apply(variables, images, valid_hw=valid_hw, method=SPPNet.conv_map), {}
    fmap = out if valid_hw is None else out[0]  # with valid_hw: (map, map_hw)
    return fmap, {t: inter[t + "_out"][0] for t in taps}


@jax.jit
def _swap_hw(fmap):
    """(B, h, w, C) -> (B, w, h, C)."""
    return jnp.swapaxes(fmap, 1, 2)


@functools.partial(xla_options.jit, static_argnames=("levels", "mode"))
def _pool_windows(fmap, cells, levels, mode):
    """(B, h, w, C), (B, K, 4) inclusive cells -> (B, K, D)."""
    return jax.vmap(lambda f, c: roi_pool_cells(f, c, levels, mode))(fmap, cells)


@functools.partial(xla_options.jit, static_argnames=("model",))
def _model_pool(model, fmap):
    return model.apply({}, fmap, method=SPPNet.pool_map)


@functools.partial(xla_options.jit, static_argnames=("head", "logits"))
def _head(head, params, x, logits):
    return head.apply({"params": params}, x, method=None if logits else Head.features)


def unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> first (U,) int64, inverse (N,) int64: the first row of each set of equal rows,
    in order, and each row's index in ``first``, so ``x[first][inverse]`` equals ``x``.

    Rows are grouped by a hash of every 16th value (exact integer arithmetic on the bits) and
    kept together only when equal to their group's first row (``==``, so NaN rows are never
    merged); a row whose hash collides with an unequal row's stays on its own. Why not
    ``np.unique(axis=0)``: it sorts whole rows, 0.6 s for 1,996 rows of 12,800 floats; a
    Python dict of row keys took 6 ms for 1,996 rows of 1,600 floats, this 3 ms.
    """
    x = np.ascontiguousarray(np.asarray(x)).reshape(len(x), -1)
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bits = np.ascontiguousarray(x[:, ::16]).view(f"u{x.itemsize}").astype(np.uint64)
    mult = np.random.default_rng(0).integers(1, 2**63, bits.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):  # the hash wraps modulo 2**64 on purpose
        h = (bits * mult).sum(axis=1, dtype=np.uint64)
    _, group_first, group = np.unique(h, return_index=True, return_inverse=True)
    rep = group_first[group.reshape(-1)]
    cand = np.flatnonzero(rep != np.arange(n))  # rows whose hash an earlier row shares
    unequal = cand[~(x[cand] == x[rep[cand]]).all(axis=1)]
    rep[unequal] = unequal
    first = np.unique(rep)
    return first.astype(np.int64), np.searchsorted(first, rep).astype(np.int64)


def fc_call_rows(n: int, chunk: int = FC_CHUNK) -> list[int]:
    """Rows each call of :func:`fc_layers` computes for ``n`` distinct rows: ``chunk`` per call,
    the last call's rows zero-padded up to a multiple of ``chunk // 8`` (one call of
    ``chunk // 8`` rows when n is 0).

    Why the tail is padded to its own multiple, not to ``chunk``: 1,576 windows padded to
    4 x 512 rows wasted 23 % of fc6/fc7's matmuls (bench row 4)."""
    step = max(1, chunk // 8)
    full, tail = divmod(max(n, 0), chunk)
    return [chunk] * full + ([-(-max(tail, 1) // step) * step] if tail or not full else [])


def fc_layers(params: dict, pooled, *, logits: bool = True, dtype=jnp.float32,
              chunk: int = FC_CHUNK) -> dict[str, np.ndarray]:
    """fc6, fc7 (after ReLU) and logits of pooled vectors, through :class:`~spp_jax.models.Head`.

    Equal rows are computed once (:func:`unique_rows`): windows that cover the same conv5
    cells pool to the same vector (21 % of 1,996 selective-search windows of a 688 x 917
    image at one scale), and fc6 + fc7 are most of a detection image's feature time.

    Args:
      params: Head params {"fc6", "fc7", "fc8"}: ``variables["params"]["classifier"]`` of an
        SPPNet, or a fine-tuned head (any fc8 width); fc8 may be absent with ``logits=False``.
      pooled: (N, D) float pooled vectors (numpy or jax).
      logits: also run fc8 (False: fc6 and fc7 only).
      chunk: rows per call; the last call's rows (all of them when fewer than ``chunk``) are
        zero-padded up to a multiple of ``chunk // 8``, so images with 150, 170, 190 windows
        share programs (at most 8 shapes per head) and at most ``chunk // 8 - 1`` padded rows
        are computed per call of this function.
    Returns:
      {"fc6": (N, F), "fc7": (N, F)[, "logits": (N, K)]} float32 numpy.
    """
    classes = int(params["fc8"]["kernel"].shape[1]) if "fc8" in params else 1
    head = Head(num_classes=classes, fc_dim=int(params["fc7"]["kernel"].shape[1]), dtype=dtype)
    keys = ("fc6", "fc7", "logits") if logits else ("fc6", "fc7")
    pooled = np.asarray(pooled, np.float32)
    first, inverse = unique_rows(pooled)
    pooled = pooled[first]
    n = int(pooled.shape[0])
    parts = []
    for i, size in zip(range(0, max(n, 1), chunk), fc_call_rows(n, chunk)):
        x = jnp.asarray(pooled[i:i + chunk])
        if x.shape[0] < size:
            x = jnp.concatenate([x, jnp.zeros((size - x.shape[0], x.shape[1]), x.dtype)])
        parts.append(_head(head, params, x, logits))
    return {k: np.concatenate([np.asarray(p[k]) for p in parts])[:n][inverse] for k in keys}


class Server:
    """Runs one network (model, variables, mean) on images; see the module doc.

    Args:
      model: an :class:`~spp_jax.models.SPPNet`; variables: its {"params": ...}.
      mean: subtracted from every pixel (0..255 units): None (nothing), a number
        (the paper's 128 for transfer and detection), a (3,) colour, or a (Hm, Wm, 3)
        mean image, warped to each input's size (as in training).
      bucket_step: full images are padded to multiples of ``bucket_step * side``.
      pool_chunk: windows per pooling call (fixed, so one program per map shape).
    """

    def __init__(self, model: SPPNet, variables: Any, mean=None, *, bucket_step: float = 0.5,
                 pool_chunk: int = 256):
        self.model, self.variables = model, variables
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        if self.mean is not None and not (self.mean.ndim == 0 or self.mean.shape == (3,)
                                          or (self.mean.ndim == 3 and self.mean.shape[-1] == 3)):
            raise ValueError(f"mean must be a number, (3,) or (H, W, 3), got shape {self.mean.shape}")
        self.bucket_step, self.pool_chunk = bucket_step, pool_chunk
        self.specs = scaled_specs(model.arch, model.width)
        self.convs = tuple(s.name for s in self.specs if isinstance(s, L.Conv))
        self.programs: set[tuple] = set()  # (kind, shapes...) of every compiled program used
        self._mean_for = MeanCache(self.mean)
        self.fingerprint = hashlib.sha1(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]

    def key(self) -> dict:
        """Everything about the network that changes its features (for cache keys)."""
        m = self.model
        # input_norm joins the key only when set: a net without it keeps the key (hence the
        # fingerprint and every feature cache on disk) it had before the option existed.
        norm = {} if m.input_norm == "none" else {"input_norm": m.input_norm}
        return {"arch": m.arch, "width": m.width, "fc_dim": m.fc_dim, "spp": m.spp, "levels": list(m.levels),
                "input_scale": m.input_scale, **norm, "pool_mode": m.pool_mode,
                "mean": "none" if self.mean is None else params_fingerprint(self.mean),
                "params": params_fingerprint(self.variables)}

    @property
    def mean_colour(self) -> np.ndarray:
        """The mean as one RGB colour (a mean image's average; 0 without a mean): what fills
        pixels outside an image, so that they are zero after :meth:`subtract_mean`."""
        if self.mean is None:
            return np.zeros(3, np.float32)
        return np.broadcast_to(self.mean.reshape(-1, 3).mean(0) if self.mean.ndim == 3 else self.mean, (3,))

    # ---- preparation ------------------------------------------------------------------------
    def subtract_mean(self, view: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 or float view -> float32 minus the mean."""
        return view.astype(np.float32) - self._mean_for(view.shape[:2])

    def prepare(self, image: np.ndarray, side: int, crop: int | None = None) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 view minus the mean: the shorter side resized to ``side``,
        then with ``crop`` its centre ``crop`` x ``crop`` square."""
        view = augment.resize_shorter(image, side)
        if crop is not None:
            view = augment.crop(view, augment.crop_box(view.shape[0], view.shape[1], crop, "center"))
        return self.subtract_mean(view)

    def bucket(self, h: int, w: int, side: int) -> tuple[int, int]:
        """The padded shape of an (h, w) view at shorter side ``side`` (:func:`bucket_shape`)."""
        return bucket_shape(h, w, side, self.bucket_step)

    def batch(self, views: Sequence[np.ndarray], shape: tuple[int, int] | None = None,
              size: int | None = None) -> Batch:
        """Float views -> one padded :class:`Batch` of ``shape`` (default: the views' common shape)
        with ``size`` slots (default: one per view; extra slots repeat the last view). An
        (N, H, W, 3) array that fills the batch is used as it is (no copy)."""
        if not len(views):
            raise ValueError("no images to batch")
        shape = tuple(shape or views[0].shape[:2])
        size = size or len(views)
        if isinstance(views, np.ndarray) and views.shape == (size, *shape, 3):  # crops: nothing to pad
            return Batch(np.asarray(views, np.float32), np.tile(np.int32(shape), (size, 1)), size)
        if size < len(views):
            raise ValueError(f"{len(views)} views do not fit a batch of {size}")
        pixels = np.zeros((size, *shape, 3), np.float32)
        hw = np.zeros((size, 2), np.int32)
        for i in range(size):
            v = views[min(i, len(views) - 1)]
            if v.shape[0] > shape[0] or v.shape[1] > shape[1]:
                raise ValueError(f"a {v.shape[0]}x{v.shape[1]} view does not fit the {shape} bucket")
            pixels[i, :v.shape[0], :v.shape[1]] = v
            hw[i] = v.shape[:2]
        return Batch(pixels, hw, len(views))

    # ---- conv maps ----------------------------------------------------------------------------
    def conv(self, batch: Batch) -> Maps:
        """The last conv map of every image (masked, exact)."""
        return self.conv_layers(batch, self.convs[-1:])[self.convs[-1]]

    def conv_layers(self, batch: Batch, names: Sequence[str]) -> dict[str, Maps]:
        """Conv maps (after ReLU, masked to each image) of the conv layers ``names``, one pass.

        Raises ValueError when an image is too small for the network.
        """
        bad = [n for n in names if n not in self.convs]
        if bad:
            raise ValueError(f"{bad} are not conv layers of {self.model.arch}; it has {self.convs}")
        extents = dict(zip((s.name for s in self.specs), M.valid_extents(self.specs, batch.hw)))
        taps = tuple(n for n in names if n != self.convs[-1])
        # Nothing padded (crops): the plain network, no masks to compute (exact either way).
        padded = not (batch.hw == np.asarray(batch.pixels.shape[1:3])).all()
        fmap, tapped = _conv(self.model, self.variables, jnp.asarray(batch.pixels),
                             jnp.asarray(batch.hw) if padded else None, taps)
        self.programs.add(("conv", batch.pixels.shape, taps))
        out = {t: Maps(tapped[t], extents[t]) for t in taps}
        out[self.convs[-1]] = Maps(fmap, extents[self.convs[-1]])
        return {n: out[n] for n in names}

    # ---- pooling ------------------------------------------------------------------------------
    def pooled(self, maps: Maps) -> jax.Array:
        """The model's own fc6 input per image, (B, pooled_dim): the pyramid of each valid map,
        or (no-SPP nets, unpadded 224 inputs only) the last max pool to 6x6."""
        if self.model.spp:
            return self.pool_whole(maps)
        if not maps.whole:
            raise ValueError(f"the no-SPP {self.model.arch} takes unpadded 224 crops only")
        self.programs.add(("pool", tuple(maps.fmap.shape), "no-spp"))
        return _model_pool(self.model, maps.fmap)

    def pool_whole(self, maps: Maps, levels: Sequence[int] | None = None) -> jax.Array:
        """Each image's valid map pooled with ``levels`` (default the model's), (B, C * sum(n^2)):
        the same bins as :func:`spp_jax.pool` of the unpadded map."""
        levels, mode = tuple(levels or self.model.levels), self.model.pool_mode
        if maps.whole:  # nothing padded: the whole-map pooling, cheaper to compile
            self.programs.add(("pool", tuple(maps.fmap.shape), levels))
            return spp_pool(maps.fmap, levels, mode=mode)
        whole = np.concatenate([np.zeros_like(maps.hw), maps.hw[:, ::-1] - 1], axis=1)[:, None]
        return self._windows(maps.fmap, whole, levels, ("pool", levels))[:, 0]

    def _windows(self, fmap, cells: np.ndarray, levels: tuple[int, ...], program: tuple):
        """(B, h, w, C) maps, (B, K, 4) int cells -> (B, K, D) window pyramids; ``program``:
        (kind, detail) of the compiled program, for :attr:`programs`.

        A map taller than wide is pooled as its transpose (cells swapped, the bins swapped
        back by :func:`spp_jax.pooling.transposed_layout`): a bucket and its transposed
        bucket, e.g. 360 x 540 and 540 x 360 images, then share one compiled program, which
        is most of what a window program costs the first time (0.3-0.6 s each; 12 of the 28
        programs of the multi-view testing pass of ``make train``).
        """
        tall = fmap.shape[1] > fmap.shape[2]
        if tall:
            fmap, cells = _swap_hw(fmap), cells[..., [1, 0, 3, 2]]
        self.programs.add((program[0], tuple(fmap.shape), program[1]))
        out = _pool_windows(fmap, jnp.asarray(cells, jnp.int32), levels, self.model.pool_mode)
        # Swapped back on the host: a few KB per window, no program per shape for the swap.
        return transposed_layout(np.asarray(out), fmap.shape[-1], levels) if tall else out

    def map_hw(self, hw) -> np.ndarray:
        """(B, 2) int image sizes (as :attr:`Batch.hw`) -> (B, 2) int32 valid last-conv map sizes.

        Raises ValueError when an image is too small for the network."""
        return M.valid_extents(self.specs, hw)[[s.name for s in self.specs].index(self.convs[-1])]

    def cells(self, boxes, map_hw: Sequence[int]) -> np.ndarray:
        """(R, 4) image-pixel windows -> (R, 4) int32 inclusive cells on a valid map of size ``map_hw``
        (:func:`spp_jax.project_boxes` with the model's geometry)."""
        return project_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), self.model.geometry,
                             tuple(int(v) for v in map_hw), xp=np).astype(np.int32)

    def pool_windows(self, maps: Maps, cells: Sequence[np.ndarray], chunk: int | None = None
                     ) -> list[np.ndarray]:
        """Pyramid-pool windows given in map cells, per image of the batch.

        Args:
          maps: conv maps of B images; cells: B arrays (R_i, 4) of inclusive cells on each
            image's valid map (:meth:`cells`), R_i >= 1.
          chunk: windows per call (default ``pool_chunk``); each image's windows are padded
            (repeating its last) to a multiple of it, so one program serves every count.
        Returns:
          B float32 arrays (R_i, C * sum(n^2)).
        """
        chunk = chunk or self.pool_chunk
        if len(cells) != maps.fmap.shape[0] or any(len(c) == 0 for c in cells):
            raise ValueError(f"need one non-empty cell array per image ({maps.fmap.shape[0]}), got "
                             f"{[len(c) for c in cells]}")
        levels = tuple(self.model.levels)
        rounds = max(-(-len(c) // chunk) for c in cells)
        padded = [np.concatenate([c, np.repeat(c[-1:], rounds * chunk - len(c), axis=0)]) for c in cells]
        parts = [np.asarray(self._windows(maps.fmap, np.stack([p[r * chunk:(r + 1) * chunk] for p in padded]),
                                          levels, ("windows", chunk))) for r in range(rounds)]
        out = np.concatenate(parts, axis=1)
        return [out[i, :len(c)] for i, c in enumerate(cells)]

    # ---- fully connected layers -------------------------------------------------------------
    def head(self, pooled, params: dict | None = None, logits: bool = True) -> dict[str, np.ndarray]:
        """fc6, fc7 (and logits) of pooled vectors (:func:`fc_layers`); ``params`` defaults to
        this model's head."""
        params = self.variables["params"]["classifier"] if params is None else params
        return fc_layers(params, pooled, logits=logits, dtype=self.model.dtype)
