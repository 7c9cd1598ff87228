"""Feature extraction for transfer classification (the paper's Tables 6-8).

A :class:`Setting` says how an image is shown to a pretrained network:

* ``crop``: the image resized to shorter side ``resize`` (default: ``size``),
  then its centre ``size`` x ``size`` crop (the paper's "crop 224");
* ``full``: the whole image resized to shorter side ``size`` (the paper's
  "full 224" / "full 392"), for SPP nets only.

and through which network: the SPP net (``spp=True``) or a no-SPP net (a
workdir trained with ``spp=false``, whose fc6 only accepts a 6x6 pool5).

Layers (``LAYERS``), all taken after the ReLU where the layer has one:

``conv4``, ``conv5``
    The last two conv maps (conv4/conv5 of ZF-5 and Overfeat-5, conv6/conv7
    of Overfeat-7), each max-pooled to a fixed ``g x g`` grid, ``g`` = the
    map side of a 224 input (13 for ZF-5, 18 for Overfeat).  For a 224 crop
    this *is* the flattened map (every bin is one cell); for a full image it
    is a single ``g x g`` pyramid level over the image's valid map region,
    so crop and full features have the same length.
``pool5``
    "pool5 (6x6)": the no-SPP net's last max pool (3x3, stride 2 for ZF-5),
    or for an SPP net the 6x6 level of the pyramid alone (as in the paper's
    Tables 6-7).
``spp_pool5``
    the SPP net's full pyramid, e.g. (6, 3, 2, 1): fc6's input (SPP nets only).
``fc6``, ``fc7``
    the fully connected layers of the pretrained head, fed with the net's
    own pooled vector (the pyramid, or the no-SPP 6x6 pool5).

Full images of any size share a few compiled programs: each image is
zero-padded at the bottom/right to a bucket shape
(:func:`spp_jax.evaluate.views.bucket_shape`) and pooled only over the cells
of its own (unpadded) map; batches hold images of one bucket and are padded
to a fixed batch size, so there is one program per (bucket, batch size).

:meth:`FeatureExtractor.extract` processes a split in chunks of images, each
saved atomically as an ``.npz`` in a cache directory keyed by the network's
parameters, the setting, the layers and the data: an interrupted run resumes
at the first missing chunk, and a second run reads everything from disk.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.data import augment
from spp_jax.evaluate.views import bucket_shape, pad_image
from spp_jax.models import NO_SPP_POOL
from spp_jax.models import layers as L
from spp_jax.models.sppnet import Backbone, SPPNet, map_size, scaled_specs
from spp_jax.pooling import pool as spp_pool
from spp_jax.roi import roi_pool_cells

LAYERS: tuple[str, ...] = ("conv4", "conv5", "pool5", "spp_pool5", "fc6", "fc7")
LAYER_TITLES: dict[str, str] = {"conv4": "conv4", "conv5": "conv5", "pool5": "pool5 (6×6)",
                                "spp_pool5": "SPP pool5", "fc6": "fc6", "fc7": "fc7"}
VIEWS: tuple[str, ...] = ("crop", "full")
_SETTING_RE = re.compile(r"^(spp|nospp)_(crop|full)(\d+)(?:r(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Setting:
    """How images are fed to which network (see the module doc).

    ``key`` strings: ``spp_crop224``, ``nospp_crop224``, ``spp_full224``, ``spp_full392``...;
    ``spp_crop224r256``: the centre 224 crop of the image resized to shorter side 256.
    """

    spp: bool
    view: str
    size: int
    resize: int | None = None  # crop only: shorter side before the centre crop (None: size)

    def __post_init__(self):
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.view == "full" and not self.spp:
            raise ValueError("a no-SPP net only takes fixed-size crops (view='crop')")
        if self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.size}")

    @property
    def key(self) -> str:
        base = f"{'spp' if self.spp else 'nospp'}_{self.view}{self.size}"
        return base if self.resize in (None, self.size) else f"{base}r{self.resize}"

    @property
    def title(self) -> str:
        return f"{'SPP' if self.spp else 'no SPP'} {self.view} {self.size}"

    @classmethod
    def parse(cls, text: str) -> "Setting":
        m = _SETTING_RE.match(text.strip())
        if not m:
            raise ValueError(f"bad setting {text!r}: expected e.g. spp_crop224, nospp_crop224, "
                             "spp_full224, spp_full392")
        return cls(m.group(1) == "spp", m.group(2), int(m.group(3)),
                   int(m.group(4)) if m.group(4) else None)


def layers_for(model: SPPNet) -> tuple[str, ...]:
    """The layers a network provides (no-SPP nets have no ``spp_pool5``)."""
    return LAYERS if model.spp else tuple(n for n in LAYERS if n != "spp_pool5")


def params_fingerprint(variables: Any) -> str:
    """A short hash of a parameter pytree (identifies a checkpoint for the cache)."""
    h = hashlib.sha1()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(variables), key=lambda kv: str(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(path).encode())
        h.update(str(a.shape).encode() + str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


@functools.partial(jax.jit, static_argnames=("model", "specs", "grid", "layers", "whole"))
def _forward(model, specs, grid, variables, bb_params, images, cells4, cells5, layers, whole=False):
    """The compiled pass: (B, H, W, 3) inputs + valid map cells -> {layer: (B, D)}.

    ``whole``: every input fills its batch slot (crops), so whole maps are pooled
    with :func:`spp_jax.pool` (the same bins as window pooling over the whole map,
    cheaper to compile); otherwise each map is pooled over its valid cells.
    Module level with the model static, so every extractor of the same network
    shape shares the compiled programs (one per input shape and layer set).
    """
    m = model
    x = images * m.input_scale if m.input_scale != 1.0 else images
    c4 = Backbone(specs[0], m.init_scheme, m.dtype).apply(bb_params[0], x)
    c5 = Backbone(specs[1], m.init_scheme, m.dtype).apply(bb_params[1], c4)

    def roi(fmap, cells, levels):
        if whole:
            return spp_pool(fmap, levels)
        out = jax.vmap(lambda f, c: roi_pool_cells(f, c[None], levels=levels))(fmap, cells)
        return out.reshape(out.shape[0], -1)

    out = {}
    if "conv4" in layers:
        out["conv4"] = roi(c4, cells4, (grid,))
    if "conv5" in layers:
        out["conv5"] = roi(c5, cells5, (grid,))
    if m.spp:
        pooled = roi(c5, cells5, tuple(m.levels))
        if "spp_pool5" in layers:
            out["spp_pool5"] = pooled
        if "pool5" in layers:  # the 6x6 level: a slice of the pyramid when it comes first
            out["pool5"] = (pooled[:, :36 * c5.shape[-1]] if tuple(m.levels)[0] == 6
                            else roi(c5, cells5, (6,)))
    else:
        p = L.max_pool(c5, NO_SPP_POOL[m.arch])
        pooled = p.reshape(p.shape[0], -1)
        if "pool5" in layers:
            out["pool5"] = pooled
    if "fc6" in layers or "fc7" in layers:
        head = m.apply(variables, pooled, method=SPPNet.head)
        out.update({k: head[k] for k in ("fc6", "fc7") if k in layers})
    return out


class FeatureExtractor:
    """Transfer features of one pretrained network (SPP or no-SPP).

    Args:
      model: the :class:`SPPNet` (its ``spp`` flag decides which layers exist).
      variables: ``{"params": ...}`` of the model.
      mean: the training mean image (Hm, Wm, 3) warped to each input, a (3,)
        channel mean, or None; 0..255 units.
      batch_size: images per compiled batch for crops; ``full_batch_size``
        for full images (a bucket's last batch is padded, so keep it small).
      bucket_step: full images are padded to multiples of ``bucket_step * size``.
    """

    def __init__(self, model: SPPNet, variables: Any, mean: np.ndarray | None = None, *,
                 batch_size: int = 16, full_batch_size: int = 4, bucket_step: float = 0.5,
                 fingerprint: str | None = None):
        self.model, self.variables = model, variables
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.batch_size, self.full_batch_size, self.bucket_step = batch_size, full_batch_size, bucket_step
        self.fingerprint = fingerprint or params_fingerprint(variables)
        self.layers = layers_for(model)
        self.compiled_shapes: set[tuple] = set()  # (input shape, layers) of every program run
        self.programs: dict[str, set] = {}          # the same per setting key
        self._mean_cache: dict[tuple[int, int], np.ndarray] = {}
        specs = scaled_specs(model.arch, model.width)
        convs = [i for i, s in enumerate(specs) if isinstance(s, L.Conv)]
        cut = convs[-2] + 1  # after the second-to-last conv ("conv4")
        self._specs = (specs[:cut], specs[cut:])
        self.grid = map_size(model.arch, 224)
        params = variables["params"]["backbone"]
        names = [[s.name for s in part if isinstance(s, L.Conv)] for part in self._specs]
        self._bb_params = tuple({"params": {n: params[n] for n in ns}} for ns in names)

    # ---- geometry -------------------------------------------------------------------------
    def map_hw(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(conv4 map (h, w), conv5 map (h, w)) of an unpadded h x w input."""
        def size(side, specs):
            for s in specs:
                side = L.spec_out_size(side, s)
            return side
        h4, w4 = size(h, self._specs[0]), size(w, self._specs[0])
        return (h4, w4), (size(h4, self._specs[1]), size(w4, self._specs[1]))

    def _run(self, batch: np.ndarray, hw: Sequence[tuple[int, int]], layers: tuple[str, ...],
             whole: bool = False):
        """(B, H, W, 3) padded inputs + each one's unpadded (h, w) -> dict of (B, D) arrays.

        ``whole``: no input is padded (crops), pool whole maps."""
        if whole and any(tuple(x) != tuple(batch.shape[1:3]) for x in hw):
            raise ValueError("whole=True needs unpadded inputs")
        c4, c5 = [], []
        for h, w in hw:
            (h4, w4), (h5, w5) = self.map_hw(h, w)
            c4.append([0, 0, w4 - 1, h4 - 1])
            c5.append([0, 0, w5 - 1, h5 - 1])
        if not self.model.spp:
            got = self.map_hw(*batch.shape[1:3])[1]
            if L.spec_out_size(got[0], NO_SPP_POOL[self.model.arch]) != 6 or \
                    L.spec_out_size(got[1], NO_SPP_POOL[self.model.arch]) != 6:
                raise ValueError(f"the no-SPP {self.model.arch} needs inputs whose map pools to 6x6 "
                                 f"(224 crops); got {batch.shape[1]}x{batch.shape[2]}")
        self.compiled_shapes.add((tuple(batch.shape), layers, whole))
        out = _forward(self.model, self._specs, self.grid, self.variables, self._bb_params, jnp.asarray(batch),
                       jnp.asarray(c4, jnp.int32), jnp.asarray(c5, jnp.int32), layers=layers, whole=whole)
        return out

    # ---- preprocessing --------------------------------------------------------------------
    def _mean_for(self, hw: tuple[int, int]) -> np.ndarray | float:
        if self.mean is None:
            return 0.0
        if self.mean.ndim == 1:
            return self.mean
        if hw not in self._mean_cache:
            if len(self._mean_cache) > 64:
                self._mean_cache.clear()
            self._mean_cache[hw] = augment.resize_to(self.mean, hw)
        return self._mean_cache[hw]

    def resize(self, img: np.ndarray, setting: Setting) -> np.ndarray:
        """uint8 image -> the setting's uint8 view (centre crop, or the resized full image)."""
        if setting.view == "crop":
            img = augment.resize_shorter(img, setting.resize or setting.size)
            return augment.crop(img, augment.crop_box(img.shape[0], img.shape[1], setting.size, "center"))
        return augment.resize_shorter(img, setting.size)

    def normalise(self, view: np.ndarray) -> np.ndarray:
        """uint8 view -> float32 minus the mean."""
        return view.astype(np.float32) - self._mean_for(view.shape[:2])

    def check(self, setting: Setting, layers: Sequence[str] | None = None) -> tuple[str, ...]:
        if setting.spp != bool(self.model.spp):
            raise ValueError(f"setting {setting.key} needs a{'n SPP' if setting.spp else ' no-SPP'} net, "
                             f"this extractor holds a{'n SPP' if self.model.spp else ' no-SPP'} one")
        layers = tuple(layers or self.layers)
        bad = [n for n in layers if n not in self.layers]
        if bad:
            raise ValueError(f"layers {bad} are not available; this net provides {self.layers}")
        return layers

    # ---- in-memory extraction -------------------------------------------------------------
    def features(self, images: Sequence[np.ndarray], setting: Setting,
                 layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Features of uint8 RGB images (any sizes): ``{layer: (N, D) float32}``."""
        layers = self.check(setting, layers)
        views = [self.resize(augment.load_image(im) if im.dtype != np.uint8 else im, setting)
                 for im in images]
        return self._views_features(views, setting, layers)

    def _views_features(self, views: list[np.ndarray], setting: Setting,
                        layers: tuple[str, ...]) -> dict[str, np.ndarray]:
        n = len(views)
        out = {k: None for k in layers}
        if n == 0:
            return {k: np.zeros((0, 0), np.float32) for k in layers}
        if setting.view == "crop":
            groups = {(setting.size, setting.size): list(range(n))}
            bs = self.batch_size
        else:
            groups: dict[tuple[int, int], list[int]] = {}
            for i, v in enumerate(views):
                groups.setdefault(bucket_shape(v.shape[0], v.shape[1], setting.size, self.bucket_step),
                                  []).append(i)
            bs = self.full_batch_size
        for shape, idx in sorted(groups.items()):
            for s in range(0, len(idx), bs):
                part = idx[s:s + bs]
                take = part + [part[-1]] * (bs - len(part))  # pad: one program per shape
                batch = np.stack([pad_image(self.normalise(views[i]), shape) for i in take])
                res = self._run(batch, [views[i].shape[:2] for i in take], layers,
                                whole=setting.view == "crop")
                self.programs.setdefault(setting.key, set()).add((batch.shape, layers))
                for k in layers:
                    a = np.asarray(res[k])[:len(part)]
                    if out[k] is None:
                        out[k] = np.zeros((n, a.shape[1]), np.float32)
                    out[k][part] = a
        return out

    # ---- cached, chunked extraction -------------------------------------------------------
    def cache_key(self, setting: Setting, layers: Sequence[str], data_id: str, n: int,
                  chunk_size: int) -> str:
        m = self.model
        desc = json.dumps({"fp": self.fingerprint, "setting": setting.key, "layers": list(layers),
                           "data": data_id, "n": n, "chunk": chunk_size, "arch": m.arch,
                           "levels": list(m.levels), "grid": self.grid, "step": self.bucket_step,
                           "mean": None if self.mean is None else float(self.mean.sum())},
                          sort_keys=True)
        return f"{setting.key}_{hashlib.sha1(desc.encode()).hexdigest()[:12]}"

    def extract(self, images: Any, setting: Setting, *, layers: Sequence[str] | None = None,
                cache_dir: str | None = None, data_id: str = "", chunk_size: int = 128,
                progress: bool = True, desc: str | None = None,
                on_chunk: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Features of every image of a random-access collection, cached chunk by chunk.

        Args:
          images: ``len`` + ``[i]`` -> uint8 RGB (H, W, 3) (or anything
            :func:`spp_jax.data.augment.load_image` accepts).
          setting: the view and network (must match this extractor's net).
          layers: subset of :attr:`layers` (default all).
          cache_dir: where chunks are stored (a sub-directory per network,
            setting, layers and ``data_id``); None keeps everything in memory.
          data_id: identifies the image collection in the cache key (e.g.
            ``"shapes-multilabel-test-300-seed0"``); the length is part of it too.
          chunk_size: images per cached chunk.
          on_chunk: called with the chunk index after each newly computed chunk
            (tests use it to interrupt a run).
        Returns:
          ``{layer: (N, D) float32}``.
        """
        from tqdm.auto import tqdm

        layers = self.check(setting, layers)
        n = len(images)
        path = None
        if cache_dir is not None:
            path = os.path.join(cache_dir, self.cache_key(setting, layers, data_id, n, chunk_size))
            os.makedirs(path, exist_ok=True)
            meta = os.path.join(path, "meta.json")
            if not os.path.exists(meta):
                with open(meta + ".tmp", "w") as f:
                    json.dump({"setting": setting.key, "layers": list(layers), "data": data_id, "n": n,
                               "chunk_size": chunk_size, "fingerprint": self.fingerprint}, f, indent=1)
                os.replace(meta + ".tmp", meta)
        starts = list(range(0, n, chunk_size))
        chunk_file = lambda s: os.path.join(path, f"chunk_{s:07d}_{min(n, s + chunk_size):07d}.npz")
        todo = [s for s in starts if path is None or not os.path.exists(chunk_file(s))]
        parts: dict[int, dict[str, np.ndarray]] = {}
        for s in starts:
            if s not in todo:
                with np.load(chunk_file(s)) as z:
                    parts[s] = {k: z[k] for k in layers}

        def load_views(s):
            out = []
            for i in range(s, min(n, s + chunk_size)):
                img = images[i]
                img = img if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 \
                    else augment.load_image(img)
                if img is None:
                    raise augment.BadImageError(f"image {i} of {data_id or 'the collection'} is unreadable")
                out.append(self.resize(img, setting))
            return out

        bar = tqdm(total=n, initial=n - sum(min(n, s + chunk_size) - s for s in todo),
                   desc=desc or setting.key, disable=not progress, unit="img", leave=False)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(load_views, todo[0]) if todo else None
            for j, s in enumerate(todo):
                views = nxt.result()
                nxt = pool.submit(load_views, todo[j + 1]) if j + 1 < len(todo) else None
                feats = self._views_features(views, setting, layers)
                parts[s] = feats
                if path is not None:
                    _atomic_savez(chunk_file(s), feats)
                bar.update(len(views))
                if on_chunk is not None:
                    on_chunk(starts.index(s))
        bar.close()
        self.last_seconds = time.perf_counter() - t0
        if n == 0:
            return {k: np.zeros((0, 0), np.float32) for k in layers}
        return {k: np.concatenate([parts[s][k] for s in starts]) for k in layers}
