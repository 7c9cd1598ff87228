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

Images go through the serving layer (:class:`spp_jax.serve.Server`): the mean
(the paper's constant 128 by default, see :mod:`spp_jax.transfer.run`) is
subtracted, full images of any size are padded at the bottom/right to a few
bucket shapes, the conv maps are masked to each image (so they equal the
unpadded network's exactly) and pooled over each image's own map; batches hold
images of one bucket and are padded to a fixed batch size, so there is one
program per (bucket, batch size).

:meth:`FeatureExtractor.extract` processes a split in chunks of images, each
saved atomically as an ``.npz`` in a cache directory keyed by the network's
parameters, the setting, the layers and the data: an interrupted run resumes
at the first missing chunk, and a second run reads everything from disk.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np

from spp_jax import atomic
from spp_jax.data import augment
from spp_jax.models import SPPNet, map_size
from spp_jax.serve import Server

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


def _atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with atomic.path(path) as tmp, open(tmp, "wb") as f:  # a file object: no suffix appended
        np.savez(f, **arrays)


class FeatureExtractor:
    """Transfer features of one pretrained network (SPP or no-SPP), through a serving layer.

    Args:
      server: the :class:`~spp_jax.serve.Server` of the network (model, variables, mean,
        bucket step); its ``spp`` flag decides which layers exist.
      batch_size: images per compiled batch for crops; ``full_batch_size`` for full
        images (a bucket's last batch is padded, so keep it small).
    """

    def __init__(self, server: Server, *, batch_size: int = 16, full_batch_size: int = 4):
        self.server, self.model = server, server.model
        self.batch_size, self.full_batch_size = batch_size, full_batch_size
        self.layers = layers_for(self.model)
        self.programs: dict[str, set] = {}  # (batch shape, layers) per setting key
        self.grid = map_size(self.model.arch, 224)
        self.conv_names = server.convs[-2:]  # "conv4", "conv5": the last two conv layers

    @property
    def fingerprint(self) -> str:
        return self.server.fingerprint

    def view(self, img: np.ndarray, setting: Setting) -> np.ndarray:
        """uint8 image -> the setting's float view minus the mean (centre crop, or the full image)."""
        if setting.view == "crop":
            return self.server.prepare(img, setting.resize or setting.size, crop=setting.size)
        return self.server.prepare(img, setting.size)

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
        views = [self.view(augment.load_image(im) if im.dtype != np.uint8 else im, setting) for im in images]
        return self._views_features(views, setting, layers)

    def _views_features(self, views: list[np.ndarray], setting: Setting,
                        layers: tuple[str, ...]) -> dict[str, np.ndarray]:
        n = len(views)
        if n == 0:
            return {k: np.zeros((0, 0), np.float32) for k in layers}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, v in enumerate(views):  # crops share one shape; full images a few buckets
            shape = v.shape[:2] if setting.view == "crop" else self.server.bucket(*v.shape[:2], setting.size)
            groups.setdefault(tuple(shape), []).append(i)
        bs = self.batch_size if setting.view == "crop" else self.full_batch_size
        out: dict[str, np.ndarray] = {}
        for shape, idx in sorted(groups.items()):
            for s in range(0, len(idx), bs):
                part = idx[s:s + bs]
                batch = self.server.batch([views[i] for i in part], shape, size=bs)  # one program per shape
                self.programs.setdefault(setting.key, set()).add((batch.pixels.shape, layers))
                for k, a in self._batch_features(batch, layers).items():
                    out.setdefault(k, np.zeros((n, a.shape[1]), np.float32))[part] = a[:len(part)]
        return out

    def _batch_features(self, batch, layers: tuple[str, ...]) -> dict[str, np.ndarray]:
        """One padded batch -> {layer: (B, D)}; every map is pooled over its image's valid cells."""
        sv = self.server
        maps = sv.conv_layers(batch, self.conv_names)
        c4, c5 = (maps[n] for n in self.conv_names)
        out = {}
        for name, m in (("conv4", c4), ("conv5", c5)):
            if name in layers:
                out[name] = sv.pool_whole(m, (self.grid,))
        pooled = sv.pooled(c5)
        if self.model.spp:
            out["spp_pool5"] = pooled
            if "pool5" in layers:  # the 6x6 level: a slice of the pyramid when it comes first
                out["pool5"] = (pooled[:, :36 * c5.fmap.shape[-1]] if tuple(self.model.levels)[0] == 6
                                else sv.pool_whole(c5, (6,)))
        else:
            out["pool5"] = pooled
        if "fc6" in layers or "fc7" in layers:
            out.update(sv.head(pooled, logits=False))
        return {k: np.asarray(out[k]) for k in layers}

    # ---- cached, chunked extraction -------------------------------------------------------
    def cache_key(self, setting: Setting, layers: Sequence[str], data_id: str, n: int,
                  chunk_size: int) -> str:
        desc = json.dumps({"net": self.fingerprint, "setting": setting.key, "layers": list(layers),
                           "data": data_id, "n": n, "chunk": chunk_size, "grid": self.grid}, sort_keys=True)
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
                atomic.write_text(meta, json.dumps(
                    {"setting": setting.key, "layers": list(layers), "data": data_id, "n": n,
                     "chunk_size": chunk_size, "fingerprint": self.fingerprint}, indent=1))
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
                out.append(self.view(img, setting))
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
