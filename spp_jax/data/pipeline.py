"""grain input pipelines for SPP-net ImageNet-style classification.

Sources: anything random-access -- ``len(source)`` and ``source[i]``
returning a dict with an image entry (a decoded (H, W[, C]) array of any
dtype handled by ``augment.to_rgb_uint8``, or encoded bytes) and an integer
label, e.g. ``tfds.data_source(...)`` or ``InMemorySource``.

Training (``TrainIterator``)
  One grain pipeline spans all epochs. Global sample position ``p`` (per
  process) maps to ``epoch, k = divmod(p, samples_per_epoch)``. The epoch
  order is a grain global shuffle of ``range(N)`` seeded by (seed, epoch);
  global batch ``b`` is ``order[b*B*P:(b+1)*B*P]`` for per-process batch ``B``
  and ``P`` processes, of which process ``p`` loads block ``p``. So the global
  batches, hence the run, are the same on any number of processes, the
  processes see disjoint samples and all of them get the same number of
  batches (needed for multi-host SPMD steps). Each process yields
  ``steps_per_epoch = (N // process_count) // batch_size`` batches per epoch
  (drop_remainder). Augmentation draws come from a per-sample
  ``np.random.default_rng([seed, epoch, source_index, attempt])``, so the
  output depends neither on the worker/thread count nor on prefetching.

  Bad samples (undecodable, empty, unconvertible) are skipped and counted
  (``TrainIterator.num_skipped``): the slot is filled by the next sample of
  the epoch order (a duplicate within the epoch, drawn with a
  different augmentation), which keeps batch boundaries, sharding and the
  checkpoint position independent of where bad samples are.

  Checkpointing: ``get_state()`` is a small JSON-able dict (the position is
  the global batch index); ``set_state()`` restarts the grain pipeline at
  that batch by slicing the batched ``MapDataset``. Because every batch is a
  pure function of (seed, position), a resumed run yields exactly the
  batches an uninterrupted run would, with any number of workers.

Evaluation (``EvalIterator``)
  Deterministic: this process's samples ``range(N)[process_index::
  process_count]`` in order, no shuffle, nothing dropped except bad samples
  (skipped and counted). Each sample becomes V views (``make_view``):
  ``"center"`` (1 view, centre 224 crop of the 256-resized image),
  ``"ten"`` (10 views, ``augment.ten_crops`` order) or ``"full"`` (1 view,
  the whole image at shorter side 256, varied size). Batches are
  ``{"image": (B, V, H, W, 3) float32, "label": (B,) int32,
  "valid_hw": (B, 2) int32, "mask": (B,) bool, "index": (B,) int64}``.
  Varied-size views either need ``batch_size=1`` (each batch one image at its
  own size) or ``pad_to=(PH, PW)``: the mean-subtracted view is placed at the
  top-left of a zero (PH, PW) canvas and ``valid_hw`` gives its real size
  (larger views are centre-cropped to fit and counted in
  ``num_cropped_to_fit``). The last batch is smaller than B unless
  ``pad_last_batch``, which pads it with zero images, label -1, mask False.

Image values everywhere: float32, RGB, 0..255 units minus the mean.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from spp_jax.data import augment

__all__ = [
    "AugmentConfig",
    "InMemorySource",
    "CycleSizes",
    "UniformSizes",
    "train_augment",
    "make_view",
    "TrainIterator",
    "EvalIterator",
]

log = logging.getLogger(__name__)

# Substitutes tried after a bad sample before giving up on the batch slot.
_MAX_SUBSTITUTES = 64
# "Infinite" training runs: positions are Python ints, so a large bound costs
# nothing (the MapDataset is lazy).
_UNBOUNDED_EPOCHS = 1_000_000


# ---------------------------------------------------------------------------
# Configuration and small helpers
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation / preprocessing settings shared by train and eval.

    Attributes:
      resize_side: shorter side after resizing, pixels (paper: 256).
      crop_size: crop side, pixels (paper: 224); the training input of size
        S != crop_size is the crop resized to S.
      flip: random horizontal flips in training.
      pca_std: std of the PCA colour coefficients alpha (AlexNet: 0.1; 0
        disables).
      pca_eigval: (3,) eigenvalues, [0, 1]-pixel-scale covariance.
      pca_eigvec: (3, 3), column i = eigenvector i.
      mean: None; (3,) per-channel mean; or (Hm, Wm, 3) mean image (e.g.
        ``augment.compute_mean_image``), warped to each input's size. 0..255.
      gray: training batches carry one channel, the mean of the three after the mean
        subtraction ((S, S, 1) per image), and no PCA colour offset. Only for networks
        that standardise each image's gray level (``input_norm="gray_std"``, which the
        training code pairs it with): such a net computes the same channel mean itself, and
        the offset, the same value on every pixel of an image, is exactly what its
        per-image standardisation removes. A third of the bytes and about half the host
        work per image (README, "How it is fast"); evaluation views keep three channels.
      max_aspect: longer/shorter side ratio above which the longer side is
        centre-cropped to ``max_aspect * shorter`` before resizing (bounds
        memory for degenerate images; ImageNet photos are far below 8).
      image_key, label_key: keys of the source items.
    """

    resize_side: int = 256
    crop_size: int = 224
    flip: bool = True
    pca_std: float = 0.1
    pca_eigval: np.ndarray = dataclasses.field(
        default_factory=lambda: augment.IMAGENET_PCA_EIGVAL.copy())
    pca_eigvec: np.ndarray = dataclasses.field(
        default_factory=lambda: augment.IMAGENET_PCA_EIGVEC.copy())
    mean: np.ndarray | None = None
    gray: bool = False
    max_aspect: float = 8.0
    image_key: str = "image"
    label_key: str = "label"

    @property
    def channels(self) -> int:
        """Channels of the training images made with these settings: 1 (gray) or 3."""
        return 1 if self.gray else 3


class InMemorySource:
    """A list-backed random-access source (tests, small experiments).

    Items are dicts ``{"image": array or bytes, "label": int}``; ``[i]``
    returns the stored dict (not a copy). Picklable, so usable with worker
    processes (which receive a copy of all the data).
    """

    def __init__(self, items: Sequence[dict[str, Any]]):
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._items[int(index)]


@dataclasses.dataclass(frozen=True)
class CycleSizes:
    """Input size of epoch e: ``sizes[e % len(sizes)]`` (e.g. (224, 180) for
    the paper's multi-size training switching every epoch)."""

    sizes: tuple[int, ...] = (224,)

    def __call__(self, epoch: int) -> int:
        return int(self.sizes[epoch % len(self.sizes)])


@dataclasses.dataclass(frozen=True)
class UniformSizes:
    """Input size of epoch e drawn uniformly from the integers [low, high]
    with a generator seeded by (seed, epoch) (the paper's slightly worse
    multi-size variant)."""

    low: int = 180
    high: int = 224
    seed: int = 0

    def __call__(self, epoch: int) -> int:
        rng = np.random.default_rng([self.seed, epoch, 0x51])
        return int(rng.integers(self.low, self.high + 1))


def _limit_aspect(img: np.ndarray, max_aspect: float) -> np.ndarray:
    h, w = img.shape[:2]
    short, long_ = min(h, w), max(h, w)
    if long_ <= max_aspect * short:
        return img
    keep = int(max_aspect * short)
    if h > w:
        y0 = (h - keep) // 2
        return img[y0:y0 + keep]
    x0 = (w - keep) // 2
    return img[:, x0:x0 + keep]


def _load(source: Any, index: int, cfg: AugmentConfig) -> tuple[np.ndarray | None, int]:
    """Read item ``index``; return (RGB uint8 image or None, label)."""
    try:
        item = source[index]
        img = augment.load_image(item[cfg.image_key])
        label = int(np.asarray(item[cfg.label_key]))
    except Exception as e:  # noqa: BLE001 -- a bad record must not end the run
        log.warning("skipping sample %d: %s: %s", index, type(e).__name__, e)
        return None, -1
    if img is None:
        log.warning("skipping sample %d: empty or undecodable image", index)
        return None, label
    return _limit_aspect(img, cfg.max_aspect), label


class MeanCache:
    """The mean to subtract from an (h, w) input: None -> 0, a number or a (3,) colour as is,
    a (Hm, Wm, 3) mean image warped to (h, w), cached (sizes are few)."""

    def __init__(self, mean: np.ndarray | float | None):
        self._mean = None if mean is None else np.asarray(mean, np.float32)
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, hw: tuple[int, int]) -> np.ndarray | float:
        if self._mean is None:
            return 0.0
        if self._mean.ndim <= 1:
            return self._mean
        out = self._cache.get(hw)
        if out is None:
            out = augment.resize_to(self._mean, hw)
            self._cache[hw] = out  # benign race between threads
        return out

    def gray(self, hw: tuple[int, int]) -> np.ndarray | float:
        """The mean's channel mean for an (h, w) input: 0, a number, or (h, w, 1) float32."""
        if self._mean is None:
            return 0.0
        if self._mean.ndim <= 1:
            return float(np.mean(self._mean))
        key = ("gray",) + tuple(hw)
        out = self._cache.get(key)
        if out is None:
            out = augment.gray(self(hw))
            self._cache[key] = out
        return out


def train_augment(
    img: np.ndarray,
    rng: np.random.Generator,
    size: int,
    cfg: AugmentConfig,
    mean_for: MeanCache | None = None,
) -> np.ndarray:
    """The paper's training augmentation of one image.

    Shorter side -> ``cfg.resize_side``; one of the 5 crops of side
    ``cfg.crop_size`` (uniform, ``CROP_POSITIONS`` order); horizontal flip
    with p = 0.5; resize to ``size`` if it differs from the crop; PCA colour
    offset; mean subtraction. RNG draws, in order: crop index, flip, 3 alphas.
    With ``cfg.gray`` the crop's channel mean is resized instead (a float resize, so
    no rounding to uint8 in between) and the gray mean subtracted; no alphas are drawn.

    Args:
      img: (H, W, 3) uint8 RGB.
      rng: per-sample generator.
      size: output side S in pixels (224 or 180 in the paper).
      cfg: settings.
      mean_for: optional :class:`MeanCache` of ``cfg.mean`` (defaults to warping
        ``cfg.mean`` on each call).

    Returns:
      (S, S, 3) float32, 0..255 units minus the mean; (S, S, 1) with ``cfg.gray``.
    """
    img = augment.resize_shorter(img, cfg.resize_side)
    h, w = img.shape[:2]
    pos = augment.CROP_POSITIONS[int(rng.integers(len(augment.CROP_POSITIONS)))]
    img = augment.crop(img, augment.crop_box(h, w, cfg.crop_size, pos))
    if cfg.flip:
        img, _ = augment.random_hflip(img, rng)
    if mean_for is None:
        mean_for = MeanCache(cfg.mean)
    if cfg.gray:  # resize one float channel rather than three uint8 ones: 0.28 vs 0.51 ms @180
        g = augment.resize_to(augment.gray(img), size).reshape(size, size, 1)
        g -= mean_for.gray((size, size))
        return g
    img = augment.resize_to(img, size)
    if cfg.pca_std > 0:
        img = augment.random_pca_colour(
            img, rng, cfg.pca_std, cfg.pca_eigval, cfg.pca_eigvec)
    else:
        img = img.astype(np.float32)
    return np.ascontiguousarray(img - mean_for((size, size)), dtype=np.float32)


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # lazy: worker processes never need jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"bad process {process_index} of {process_count}")
    return int(process_index), int(process_count)


def _mp_prefetch(ds: grain.IterDataset, num_workers: int, buffer: int) -> grain.IterDataset:
    """``ds.mp_prefetch`` with ``num_workers`` spawned processes."""
    # grain reads absl flags in the parent; outside absl.app.run (pytest,
    # notebooks) they are unparsed and grain would raise. Use the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, buffer)))


def _epoch_seed(seed: int, epoch: int) -> int:
    # grain's shuffle wants a seed in [0, 2**32).
    return int(np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1)[0])


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class ResizedCache:
    """Training images after the augmentation's deterministic first step, kept in RAM.

    The paper's training augmentation starts with "shorter side -> ``resize_side``", which
    depends on the image alone, yet a plain pipeline redoes it (and the record read and
    decode before it) for every image in every epoch: on the embedded data about half of
    the pipeline's CPU time, taken from the train step on a small machine.  This keeps the
    resized ``uint8`` images (and labels) of a source, by index, up to ``max_bytes``; images
    past the budget are simply not kept (ImageNet does not fit; the embedded 10,000 images
    take ~2.6 GB).  Results are bit-identical: ``train_augment``'s own resize is then a
    no-op (``augment.resize_shorter`` returns an already-sized image itself).

    Shared by the per-epoch iterators of a run (``PipelineData``) and by grain's reader
    threads (reads take no lock: a race only resizes an image twice; ``put`` keeps the byte
    count under a lock).  Worker processes each start with an empty copy.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: dict[int, tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int) -> tuple[np.ndarray, int] | None:
        return self._items.get(index)

    def put(self, index: int, img: np.ndarray, label: int) -> None:
        with self._lock:
            if self.nbytes + img.nbytes <= self.max_bytes and index not in self._items:
                self._items[index] = (img, label)
                self.nbytes += img.nbytes

    def __getstate__(self):  # a worker process gets the budget, not the parent's images
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"])


class _TrainSample:
    """Picklable map function: global per-process sample position -> dict."""

    def __init__(self, source, cfg, seed, sizes, process_index, process_count,
                 samples_per_epoch, batch_size, cache: ResizedCache | None = None):
        self.cache = cache
        self.source = source
        self.cfg = cfg
        self.seed = seed
        self.sizes = sizes
        self.process_index = process_index
        self.process_count = process_count
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.n = len(source)
        self.shard_len = self.n // process_count
        self.mean_for = MeanCache(cfg.mean)
        self._orders: dict[int, grain.MapDataset] = {}

    def order(self, epoch: int) -> grain.MapDataset:
        """All source indices in ``epoch``'s order (a permutation of range(N)).

        Kept per epoch: building the shuffled dataset for every sample made each lookup
        50 us instead of 14 (2026-12-06), next to ~280 us of host work per cached gray
        image.  Reader threads may race to build the same epoch's order; both copies are
        equal, so the race is harmless.
        """
        ds = self._orders.get(epoch)
        if ds is None:
            ds = grain.MapDataset.range(self.n).shuffle(seed=_epoch_seed(self.seed, epoch))
            # Epochs run in order: keeping the previous one serves reader threads still
            # finishing it at the boundary.
            self._orders = {e: d for e, d in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = ds
        return ds

    def __getstate__(self):  # worker processes build their own orders
        return {**self.__dict__, "_orders": {}}

    def global_position(self, k: int) -> int:
        """Where this process's ``k``-th sample of an epoch sits in the epoch order
        (process p holds block p of each global batch)."""
        b = self.batch_size
        return (k // b) * b * self.process_count + self.process_index * b + k % b

    def _resized(self, index: int) -> tuple[np.ndarray | None, int]:
        """(image with shorter side ``resize_side``, label), from the cache when it holds it."""
        hit = self.cache.get(index) if self.cache is not None else None
        if hit is not None:
            return hit
        img, label = _load(self.source, index, self.cfg)
        if img is None:
            return None, label
        img = augment.resize_shorter(img, self.cfg.resize_side)
        if self.cache is not None:
            self.cache.put(index, img, label)
        return img, label

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(int(position), self.samples_per_epoch)
        order = self.order(epoch)
        skipped = 0
        for attempt in range(_MAX_SUBSTITUTES + 1):
            index = int(order[(self.global_position(k) + attempt) % self.n])
            img, label = self._resized(index)
            if img is not None:
                break
            if attempt == 0:
                skipped = 1  # count each position's own bad sample once
        else:
            raise RuntimeError(
                f"{_MAX_SUBSTITUTES + 1} consecutive bad samples at epoch "
                f"{epoch} position {k}; is the source readable?")
        rng = np.random.default_rng([self.seed, epoch, index, attempt])
        image = train_augment(img, rng, self.sizes(epoch), self.cfg, self.mean_for)
        return {"image": image, "label": np.int32(label),
                "_skipped": np.int32(skipped)}


class TrainIterator(grain.DatasetIterator):
    """Checkpointable multi-epoch training iterator (a grain DatasetIterator).

    Yields ``{"image": float32 (B, S, S, 3), "label": int32 (B,)}`` where B is
    the per-process ``batch_size`` and S = ``sizes(epoch)``.

    Args:
      source: random-access source (see module docstring).
      batch_size: per-process batch size B.
      seed: run seed (shuffle order and augmentation).
      sizes: picklable ``epoch -> S`` (``CycleSizes((224,))`` by default;
        ``CycleSizes((224, 180))`` switches every epoch; ``UniformSizes``).
      cfg: ``AugmentConfig``.
      num_epochs: epochs to produce (None = unbounded).
      start_epoch: first epoch (0-based) when not restoring a state.
      process_index, process_count: default ``jax.process_index()`` /
        ``jax.process_count()``.
      num_workers: grain worker processes (``mp_prefetch``; 0 = none). Each
        receives a pickled copy of the source. Spawned workers cost ~1-2 s at
        start and on ``set_state``.
      num_threads: grain reader threads per process, each building whole
        batches (OpenCV and numpy release the GIL).
      prefetch_batches: batches buffered per process (memory: B*S*S*12 bytes
        each) and per worker.
      cache: a ``ResizedCache`` to keep the resized images in (shared by the
        iterators of every epoch of a run); None reads and resizes every time.

    Attributes (position of the *next* batch): ``epoch``, ``batch_in_epoch``,
    ``step`` (global batch index); ``steps_per_epoch``; ``num_skipped``
    (bad samples so far, over all epochs, survives checkpoints);
    ``skipped_this_epoch``.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        seed: int = 0,
        sizes: Callable[[int], int] = CycleSizes((224,)),
        cfg: AugmentConfig = AugmentConfig(),
        num_epochs: int | None = None,
        start_epoch: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        num_workers: int = 0,
        num_threads: int = 2,
        prefetch_batches: int = 2,
        cache: ResizedCache | None = None,
    ):
        super().__init__()
        self.cache = cache
        self._it = None  # the grain iterator, built lazily at self.step
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self._source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sizes = sizes
        self.cfg = cfg
        self.process_index, self.process_count = _default_process(
            process_index, process_count)
        self.num_workers = int(num_workers)
        self.num_threads = int(num_threads)
        self.prefetch_batches = int(prefetch_batches)
        self.num_examples = len(source)
        self.steps_per_epoch = (self.num_examples // self.process_count) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_examples} examples over {self.process_count} processes"
                f" give no full batch of {self.batch_size}")
        self.num_epochs = num_epochs
        self._total_steps = (num_epochs if num_epochs is not None
                             else _UNBOUNDED_EPOCHS) * self.steps_per_epoch
        self.step = int(start_epoch) * self.steps_per_epoch
        self.num_skipped = 0
        self.skipped_this_epoch = 0

    # -- position ---------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.step % self.steps_per_epoch

    # -- grain pipeline ---------------------------------------------------
    def _build(self, start_step: int):
        fn = _TrainSample(
            self._source, self.cfg, self.seed, self.sizes, self.process_index,
            self.process_count, self.steps_per_epoch * self.batch_size, self.batch_size,
            self.cache)
        ds = (grain.MapDataset.range(self._total_steps * self.batch_size)
              .map(fn)
              .batch(self.batch_size, drop_remainder=True))
        ds = ds[start_step:]
        it_ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=self.num_threads,
            prefetch_buffer_size=self.prefetch_batches if self.num_threads else 0))
        if self.num_workers > 0:
            it_ds = _mp_prefetch(it_ds, self.num_workers, self.prefetch_batches)
        return iter(it_ds)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self.step >= self._total_steps:
            self._drain_inner()
            raise StopIteration
        if self._it is None:
            self._it = self._build(self.step)
        batch = next(self._it)
        skipped = int(np.sum(batch.pop("_skipped")))
        if self.batch_in_epoch == 0:
            self.skipped_this_epoch = 0
        self.num_skipped += skipped
        self.skipped_this_epoch += skipped
        self.step += 1
        return batch

    # -- checkpointing ----------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-able state: the next batch's position plus counters and the
        settings a resume must share (checked by ``set_state``)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "num_skipped": self.num_skipped,
            "skipped_this_epoch": self.skipped_this_epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "size": int(self.sizes(self.epoch)),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at ``state["step"]``; raises ValueError if the state came
        from a run with a different seed/batch size/dataset/sharding/size
        schedule. Worker and thread counts may differ."""
        for key in ("seed", "batch_size", "num_examples", "process_index",
                    "process_count"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"checkpoint {key}={state[key]} != iterator {getattr(self, key)}")
        self.step = int(state["step"])
        if int(state["size"]) != int(self.sizes(self.epoch)):
            raise ValueError(
                f"checkpoint size {state['size']} != schedule size "
                f"{self.sizes(self.epoch)} at epoch {self.epoch}")
        self.num_skipped = int(state["num_skipped"])
        self.skipped_this_epoch = int(state["skipped_this_epoch"])
        self._close_inner()

    def _drain_inner(self) -> None:
        # Let grain see its own end so worker processes finish and free
        # their shared-memory buffers before we close.
        if self._it is not None:
            for _ in self._it:
                pass
            self._close_inner()

    def _close_inner(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return (f"TrainIterator(batch_size={self.batch_size}, step={self.step}, "
                f"workers={self.num_workers}, threads={self.num_threads})")


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _view_center(img: np.ndarray, resize_side: int, crop_size: int) -> np.ndarray:
    img = augment.resize_shorter(img, resize_side)
    h, w = img.shape[:2]
    return augment.crop(img, augment.crop_box(h, w, crop_size, "center"))[None]


def _view_ten(img: np.ndarray, resize_side: int, crop_size: int) -> np.ndarray:
    return augment.ten_crops(augment.resize_shorter(img, resize_side), crop_size)


def _view_full(img: np.ndarray, resize_side: int, crop_size: int) -> np.ndarray:
    del crop_size
    return augment.resize_shorter(img, resize_side)[None]


_VIEWS = {"center": _view_center, "ten": _view_ten, "full": _view_full}


def make_view(name: str, resize_side: int = 256, crop_size: int = 224) -> Callable[[np.ndarray], np.ndarray]:
    """A picklable eval view function ``(H, W, 3) uint8 -> (V, h, w, 3) uint8``.

    ``"center"``: V=1, centre ``crop_size`` crop of the image resized to
    shorter side ``resize_side`` ("1 crop"). ``"ten"``: V=10, the 5 crops
    and their flips (``augment.ten_crops`` order). ``"full"``: V=1, the
    whole image at shorter side ``resize_side`` ("1 full"; varied size).
    """
    return functools.partial(_VIEWS[name], resize_side=resize_side, crop_size=crop_size)


class _EvalSample:
    """Picklable map function: source index -> views dict (or a bad marker)."""

    def __init__(self, source, cfg, view, pad_to):
        self.source = source
        self.cfg = cfg
        self.view = view
        self.pad_to = pad_to
        self.mean_for = MeanCache(cfg.mean)

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        img, label = _load(self.source, index, self.cfg)
        if img is None:
            return {"_bad": True, "index": np.int64(index)}
        views = np.asarray(self.view(img))
        v, h, w = views.shape[:3]
        cropped = False
        if self.pad_to is not None:
            ph, pw = self.pad_to
            if h > ph or w > pw:  # centre-crop to fit the bucket
                y0, x0 = max(0, (h - ph) // 2), max(0, (w - pw) // 2)
                views = views[:, y0:y0 + ph, x0:x0 + pw]
                h, w = views.shape[1:3]
                cropped = True
        out = views.astype(np.float32) - self.mean_for((h, w))
        if self.pad_to is not None:
            canvas = np.zeros((v, *self.pad_to, 3), np.float32)
            canvas[:, :h, :w] = out
            out = canvas
        return {"image": out, "label": np.int32(label),
                "valid_hw": np.array([h, w], np.int32),
                "index": np.int64(index), "_cropped": cropped}


class EvalIterator:
    """Deterministic evaluation batches over this process's part of a split.

    Iterating yields ``{"image": float32 (B, V, H, W, 3), "label": int32 (B,),
    "valid_hw": int32 (B, 2), "mask": bool (B,), "index": int64 (B,)}`` (see
    the module docstring for views, padding and the last batch). Can be
    iterated several times; each pass starts from the beginning.

    Args:
      source: random-access source.
      view: ``"center"``, ``"ten"``, ``"full"`` or a picklable callable
        ``(H, W, 3) uint8 -> (V, h, w, 3) uint8``.
      batch_size: B; must be 1 for varied-size views unless ``pad_to``.
      cfg: ``AugmentConfig`` (``resize_side``, ``crop_size``, ``mean``, keys).
      pad_to: None or (PH, PW) canvas for varied-size views.
      pad_last_batch: pad the last batch to B (mask False, label -1).
      process_index, process_count: defaults from jax.
      num_workers, num_threads, prefetch: as in ``TrainIterator``
        (``prefetch`` counts samples).

    Attributes: ``num_examples`` (this process's share), ``num_skipped`` and
    ``num_cropped_to_fit`` (of the current/last pass).
    """

    def __init__(
        self,
        source: Any,
        view: str | Callable[[np.ndarray], np.ndarray] = "center",
        batch_size: int = 1,
        *,
        cfg: AugmentConfig = AugmentConfig(),
        pad_to: tuple[int, int] | None = None,
        pad_last_batch: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
        num_workers: int = 0,
        num_threads: int = 2,
        prefetch: int = 16,
    ):
        if isinstance(view, str):
            if view == "full" and batch_size > 1 and pad_to is None:
                raise ValueError("'full' views vary in size: use batch_size=1 or pad_to")
            view = make_view(view, cfg.resize_side, cfg.crop_size)
        self._source = source
        self.view = view
        self.batch_size = int(batch_size)
        self.cfg = cfg
        self.pad_to = None if pad_to is None else (int(pad_to[0]), int(pad_to[1]))
        self.pad_last_batch = pad_last_batch
        self.process_index, self.process_count = _default_process(
            process_index, process_count)
        self.num_workers = num_workers
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.num_examples = len(range(len(source))[self.process_index::self.process_count])
        self.num_skipped = 0
        self.num_cropped_to_fit = 0

    def _stack(self, items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        shapes = {it["image"].shape for it in items}
        if len(shapes) > 1:
            raise ValueError(f"views of different shapes {shapes} in one batch; "
                             "use batch_size=1 or pad_to")
        n_pad = self.batch_size - len(items) if self.pad_last_batch else 0
        image = np.stack([it["image"] for it in items])
        batch = {
            "image": image,
            "label": np.array([it["label"] for it in items], np.int32),
            "valid_hw": np.stack([it["valid_hw"] for it in items]).astype(np.int32),
            "mask": np.ones(len(items), bool),
            "index": np.array([it["index"] for it in items], np.int64),
        }
        if n_pad > 0:
            batch["image"] = np.concatenate(
                [image, np.zeros((n_pad, *image.shape[1:]), np.float32)])
            batch["label"] = np.concatenate([batch["label"], np.full(n_pad, -1, np.int32)])
            batch["valid_hw"] = np.concatenate(
                [batch["valid_hw"], np.zeros((n_pad, 2), np.int32)])
            batch["mask"] = np.concatenate([batch["mask"], np.zeros(n_pad, bool)])
            batch["index"] = np.concatenate([batch["index"], np.full(n_pad, -1, np.int64)])
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.num_skipped = 0
        self.num_cropped_to_fit = 0
        ds = (grain.MapDataset.range(len(self._source))
              [self.process_index::self.process_count]
              .map(_EvalSample(self._source, self.cfg, self.view, self.pad_to)))
        it_ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=self.num_threads,
            prefetch_buffer_size=self.prefetch if self.num_threads else 0))
        if self.num_workers > 0:
            it_ds = _mp_prefetch(it_ds, self.num_workers,
                                 self.prefetch // max(1, self.num_workers))
        it = iter(it_ds)
        try:
            pending: list[dict[str, Any]] = []
            for item in it:
                # Counting happens here, in the main process, so it is exact
                # whatever the number of workers.
                if item.get("_bad", False):
                    self.num_skipped += 1
                    continue
                self.num_cropped_to_fit += int(item.pop("_cropped"))
                pending.append(item)
                if len(pending) == self.batch_size:
                    yield self._stack(pending)
                    pending = []
            if pending:
                yield self._stack(pending)
        finally:
            it.close()
