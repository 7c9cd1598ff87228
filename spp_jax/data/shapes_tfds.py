"""TFDS packaging of the synthetic shapes data (``spp_shapes``), TensorFlow-free.

The builder ``SppShapes`` (TFDS name ``spp_shapes``) wraps
:func:`spp_jax.data.shapes.generate`. It is written so that **building and
reading need no TensorFlow** (TFDS 4.9.10):

* files are written as ``array_record`` (``file_format="array_record"``); TFDS
  serialises examples with its own bundled copy of the ``tf.train.Example``
  protos, so the writer does not import TF;
* the image is a raw ``tfds.features.Tensor(shape=(None, None, 3),
  dtype=np.uint8, encoding="bytes")`` - a plain uint8 array, not JPEG/PNG, so
  decoding needs no TF image ops. (TFDS requires ``encoding=`` "bytes" or
  "zlib" for tensors with more than one unknown dimension. "zlib" was measured
  to save < 5 % on these noisy images while costing ~22 ms per image to write
  and ~3 ms to read, vs ~0.4 ms per random read with "bytes"; ~300 KB/image
  on disk, so the default 5000-image train split is ~1.5 GB.)
* every other feature is a fixed-dtype ``Tensor`` or ``ClassLabel``, *not* a
  ``tfds.features.Sequence`` (whose NumPy decoder returns Python lists of
  per-object arrays instead of stacked arrays) and *not* ``BBoxFeature``;
* reading uses ``builder.as_data_source()`` / ``tfds.data_source(...)``: an
  ``ArrayRecordDataSource`` with ``len`` and random access ``__getitem__``
  returning dicts of NumPy arrays, decoded by TFDS's NumPy example parser.
  It is directly usable as a ``grain`` data source. (``tfds.load`` /
  ``as_dataset`` return ``tf.data`` pipelines and *do* need TF.)

Boxes: ``objects/bbox`` is ``int32 (N, 4)`` = ``(x1, y1, x2, y2)``, 0-based
inclusive pixel corners clipped to the image - the same convention as the
generator and as the SPP-net / R-CNN window code. TFDS's usual normalised
``BBoxFeature`` (``float32 [ymin, xmin, ymax, xmax]`` in [0, 1]) is
deliberately **not** used: it would need a per-image rescale on every read,
lose exactness to float rounding, and change the axis order. Convert with
``bbox_to_tfds_normalized`` if a TFDS-style box is ever needed.

Example features per variant (``N`` objects, ``C`` classes)::

    image            uint8 (H, W, 3)
    index            int64 ()          generator index (== position in split)
    objects/bbox     int32 (N, 4)
    objects/label    int64 (N,)        class ids in the variant's label space
    objects/difficult bool (N,)
    label            int64 ()          classification, fine (ClassLabel)
    labels           bool (C,)         multilabel (multi-hot)

Records are written in index order (``disable_shuffling=True``), so record
``i`` of a split is ``generate(variant, split, i, seed)`` bit-exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import inspect
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from spp_jax.data import shapes, shapes_workers

__all__ = [
    "DEFAULT_SPLIT_SIZES",
    "ShapesConfig",
    "SppShapes",
    "make_config",
    "make_builder",
    "load_shapes",
    "bbox_to_tfds_normalized",
    "render_processes",
]

#: Splits of at least this many images are rendered in worker processes
#: (:func:`render_processes`); below it the workers' start would cost more than it saves.
PARALLEL_MIN_EXAMPLES = 2000

#: Default split sizes per variant (small: CPU-friendly experiments).
DEFAULT_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "classification": {"train": 5000, "validation": 500, "test": 500},
    "classification_wide": {"train": 5000, "validation": 500, "test": 500},
    "fine": {"train": 900, "test": 900},  # 30 classes: ~30 train images / class
    "detection": {"trainval": 500, "test": 300},
    "multilabel": {"trainval": 500, "test": 300},
}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """BuilderConfig of ``spp_shapes``.

    Attributes:
      variant: one of ``shapes.VARIANTS``.
      split_sizes: ``((split_name, num_examples), ...)``; split names must be in
        ``shapes.SPLITS``. A tuple of pairs (not a dict) keeps it hashable.
      seed: dataset seed passed to ``shapes.generate``.

    The config ``name`` is also the on-disk directory, so two configs with the
    same name must have the same sizes and seed (``make_config`` ensures it).
    """

    variant: str = "classification"
    split_sizes: tuple[tuple[str, int], ...] = ()
    seed: int = 0


def make_config(variant: str, seed: int = 0, **split_sizes: int) -> ShapesConfig:
    """Config for ``variant`` with optional split size overrides.

    Args:
      variant: one of ``shapes.VARIANTS``.
      seed: dataset seed.
      **split_sizes: e.g. ``train=100, test=20``. Splits not given keep the
        defaults of ``DEFAULT_SPLIT_SIZES[variant]``; a size of 0 drops the split.

    Returns:
      A ``ShapesConfig`` named ``variant`` when everything is default, otherwise
      ``"{variant}_{split}{n}_..._seed{seed}"`` so that different sizes never
      share (and silently reuse) a directory.
    """
    if variant not in shapes.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {shapes.VARIANTS}")
    sizes = dict(DEFAULT_SPLIT_SIZES[variant])
    for split, n in split_sizes.items():
        if split not in shapes.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {shapes.SPLITS}")
        if n < 0:
            raise ValueError(f"split size must be >= 0, got {split}={n}")
        sizes[split] = int(n)
    sizes = {k: v for k, v in sizes.items() if v > 0}
    if not sizes:
        raise ValueError("at least one split must be non-empty")
    pairs = tuple(sorted(sizes.items(), key=lambda kv: shapes.SPLITS.index(kv[0])))
    if sizes == DEFAULT_SPLIT_SIZES[variant] and seed == 0:
        name = variant
    else:
        name = variant + "_" + "_".join(f"{k}{v}" for k, v in pairs) + f"_seed{seed}"
    desc = f"{variant} variant ({shapes.num_classes(variant)} classes), splits {dict(pairs)}, seed {seed}."
    return ShapesConfig(name=name, description=desc, variant=variant, split_sizes=pairs, seed=seed)


class SppShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes: ImageNet / VOC / Caltech101 stand-in (see ``shapes``)."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "No stroke clutter in the classification and fine variants.",
        "1.2.0": "No stroke clutter in any variant.",
    }
    BUILDER_CONFIGS = [make_config(v) for v in shapes.VARIANTS]
    DEFAULT_CONFIG_NAME = "classification"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 resolves this through the `importlib_resources` backport,
        # which it only declares as a dependency for Python < 3.9, so the stock
        # property raises ModuleNotFoundError on 3.11 for builders that live in a
        # package. TFDS's own fallback (the defining file) is all we need.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly instead of via dataset_info_from_configs():
        # the latter reads TFDS metadata files (README/CITATIONS) from a
        # dataset-package directory layout that this single module does not have.
        cfg: ShapesConfig = self.builder_config
        names = list(shapes.class_names(cfg.variant))
        feats: dict[str, Any] = {
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes"),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            "objects": tfds.features.FeaturesDict(
                {
                    "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
                    "label": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                    "difficult": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                }
            ),
        }
        if cfg.variant in shapes.SINGLE_LABEL_VARIANTS:
            feats["label"] = tfds.features.ClassLabel(names=names)
        if cfg.variant == "multilabel":
            feats["labels"] = tfds.features.Tensor(shape=(len(names),), dtype=np.bool_)
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Deterministic synthetic shapes (spp_jax). Class = shape"
                + (" x fill style" if cfg.variant == "fine" else "")
                + f"; classes: {names}. Boxes: int32 (x1, y1, x2, y2), 0-based inclusive pixels."
            ),
            features=tfds.features.FeaturesDict(feats),
            supervised_keys=("image", "label") if "label" in feats else None,
            # Write records in key (= index) order so record i == generate(..., i).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        cfg: ShapesConfig = self.builder_config
        return {split: self._generate_examples(split=split, num_examples=n) for split, n in cfg.split_sizes}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg: ShapesConfig = self.builder_config
        workers = render_processes(num_examples)
        if workers == 0:
            for i in range(num_examples):
                yield i, shapes.generate(cfg.variant, split, i, cfg.seed)
            return
        # Rendering (~2.4 ms / image) in worker processes; TFDS's encoding (~0.4 ms) and
        # writing (~0.9 ms, after the last example) stay in this process, so the gain is
        # partial: 10,000 + 1,000 images build in 30-32 s instead of 36-38 s on 2 cores, into
        # the same files (shapes_workers keeps index order).  Threads measured no speed-up:
        # the renderer is many small GIL-holding NumPy calls.
        yield from enumerate(shapes_workers.rendered(cfg.variant, split, num_examples, cfg.seed, workers))


def render_processes(num_examples: int) -> int:
    """Worker processes that render a split of ``num_examples`` images: one per core (at
    most 4), or none (render in this process) below ``PARALLEL_MIN_EXAMPLES`` or on one
    core, where the workers' start (~1.5 s each: a fresh interpreter importing spp_jax)
    would not pay, and when this interpreter cannot be started again (an embedding host
    with no ``sys.executable``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_examples < PARALLEL_MIN_EXAMPLES or cores < 2 or not sys.executable:
        return 0
    return min(4, cores)


def make_builder(config: ShapesConfig, data_dir: str | os.PathLike) -> SppShapes:
    """``SppShapes`` builder for ``config`` (nothing is built yet).

    TFDS refuses a config *object* that merely shares its name with one of
    ``BUILDER_CONFIGS`` (it compares by identity), so registered names are
    passed by name.
    """
    registered = SppShapes.builder_configs.get(config.name)
    if registered is not None:
        if registered.split_sizes != config.split_sizes or registered.seed != config.seed:
            raise ValueError(f"config {config.name!r} differs from the registered one of that name")
        return SppShapes(config=config.name, data_dir=os.fspath(data_dir))
    return SppShapes(config=config, data_dir=os.fspath(data_dir))


def load_shapes(
    variant: str,
    split: str,
    data_dir: str | os.PathLike,
    seed: int = 0,
    **split_sizes: int,
):
    """Random-access source over a split, building the dataset on first use.

    Args:
      variant: one of ``shapes.VARIANTS``.
      split: a split of the config (e.g. "train", "test", "trainval").
      data_dir: TFDS data directory (required; nothing goes to
        ``~/tensorflow_datasets``). Data lands in
        ``data_dir/spp_shapes/<config name>/<VERSION>``.
      seed: dataset seed.
      **split_sizes: split size overrides, e.g. ``train=200, validation=50``
        (see ``make_config``). Different sizes build a different config.

    Returns:
      A ``tfds`` ``ArrayRecordDataSource``: ``len(src)`` and ``src[i]`` -> dict
      of NumPy arrays (see module docstring), ``src[i]`` equal to
      ``shapes.generate(variant, split, i, seed)`` minus ``"mask"``. Usable as a
      grain data source. TFDS shows tqdm progress bars while building; later
      calls reuse the files.
    """
    cfg = make_config(variant, seed=seed, **split_sizes)
    with _build_lock(data_dir, cfg.name), _in_memory_shuffler(), _uncompressed_records():
        # The builder reads what is on disk when it is made: made before the lock, it would
        # miss the splits another process built while this one waited.
        builder = make_builder(cfg, data_dir)
        builder.download_and_prepare(file_format="array_record")
    sizes = dict(cfg.split_sizes)
    if split not in sizes:
        raise ValueError(f"split {split!r} not in config {cfg.name!r} (splits: {list(sizes)})")
    got = builder.info.splits[split].num_examples
    if got != sizes[split]:  # e.g. an interrupted or hand-edited directory
        raise RuntimeError(f"{builder.data_dir}: split {split!r} has {got} examples, expected {sizes[split]}")
    return builder.as_data_source(split=split)


@contextlib.contextmanager
def _build_lock(data_dir: str | os.PathLike, name: str):
    """Hold an exclusive ``flock`` on ``data_dir/.spp_shapes-<name>.lock`` while a config is
    built: processes sharing a data directory (the runs of a grid started side by side)
    build it once; the others wait, then find the finished files. The OS drops the lock
    when a holder dies, so an interrupted build never blocks the next one."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".spp_shapes-{name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _uncompressed_records():
    """Write the ArrayRecord shards uncompressed while building.

    TFDS 4.9.10 writes them with ArrayRecord's default zstd compression, which saves ~12 %
    of disk on these raw images (noise and texture fills) but costs every training read a
    decompression: ~0.3-0.6 ms of CPU per image, a quarter to a third of the whole input
    pipeline's work, on the cores the train step needs.  Readers find the options in the
    files, so data built either way reads the same arrays.
    """
    from tensorflow_datasets.core import file_adapters

    module = file_adapters.array_record_module
    writer = module.ArrayRecordWriter

    class _Module:  # the TFDS adapter's view of array_record_module, with one writer swapped
        def __getattr__(self, name):
            return getattr(module, name)

        @staticmethod
        def ArrayRecordWriter(path, options=""):  # noqa: N802 -- the wrapped API's name
            return writer(path, ",".join(o for o in (options, "uncompressed") if o))

    file_adapters.array_record_module = _Module()
    try:
        yield
    finally:
        file_adapters.array_record_module = module


@contextlib.contextmanager
def _in_memory_shuffler(limit_bytes: int = 64 << 30):
    """Keep TFDS's example shuffler in memory while building.

    Past 1 GB (e.g. ~3,000 raw images) TFDS 4.9.10 spills the examples to bucket
    files through ``tf.io.gfile``, which needs TensorFlow. The records are written
    in index order anyway (``disable_shuffling``), so holding them in RAM (about
    0.3 MB per image) is all the shuffler does here.
    """
    from tensorflow_datasets.core import shuffle

    old = shuffle.MAX_MEM_BUFFER_SIZE
    shuffle.MAX_MEM_BUFFER_SIZE = max(old, limit_bytes)
    try:
        yield
    finally:
        shuffle.MAX_MEM_BUFFER_SIZE = old


def bbox_to_tfds_normalized(bbox: np.ndarray, height: int, width: int) -> np.ndarray:
    """Convert int (N, 4) ``(x1, y1, x2, y2)`` inclusive pixel boxes to TFDS's
    float32 normalised ``(ymin, xmin, ymax, xmax)`` (pixel edges / image size)."""
    b = np.asarray(bbox, np.float32).reshape(-1, 4)
    return np.stack(
        [b[:, 1] / height, b[:, 0] / width, (b[:, 3] + 1) / height, (b[:, 2] + 1) / width], axis=1
    ).astype(np.float32)

