"""Classification datasets by name, and their adapter to the training loop.

``classification_dataset(name, data_dir, ...)`` returns random-access sources
(``len`` + ``[i]`` -> ``{"image": uint8 (H, W, 3), "label": int}``):

* ``shapes`` (default, embedded): the synthetic 10-class data, generated on first
  use into ``data_dir`` (no download, no TensorFlow);
* ``shapes_wide`` (embedded): the same classes and images with the main object's
  size over a 5x range instead of 2.3x (generator variant ``classification_wide``);
* ``imagenet2012``: TFDS's ImageNet, prepared once by the user in ArrayRecord
  format (see README); read with ``tfds.data_source``, no TensorFlow needed.

:class:`PipelineData` turns a train/validation pair into the
:class:`spp_jax.train.data.TrainData` protocol with the paper's augmentation
(``spp_jax.data.pipeline``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from spp_jax import atomic
from spp_jax.data import pipeline, shapes

# The embedded datasets: name -> the variant of the shapes generator that draws them.
EMBEDDED: dict[str, str] = {"shapes": "classification", "shapes_wide": "classification_wide"}
DATASETS: tuple[str, ...] = (*EMBEDDED, "imagenet2012")

IMAGENET_MANUAL_HELP = (
    "TFDS expects ImageNet prepared in {data_dir}/imagenet2012/ (ArrayRecord files). To prepare it "
    "once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {data_dir}/downloads/manual/, "
    "install the preparation extra (pip install -r requirements-prepare.txt, which adds TensorFlow) "
    "and run: tfds build imagenet2012 --data_dir {data_dir} --file_format array_record")


@dataclasses.dataclass
class ClassificationData:
    name: str
    train: Any
    validation: Any
    num_classes: int
    class_names: tuple[str, ...]


def classification_dataset(name: str = "shapes", data_dir: str | os.PathLike | None = None, *,
                           train_size: int = 5000, val_size: int = 500, seed: int = 0) -> ClassificationData:
    """Train and validation sources of a named dataset.

    Args:
      name: one of ``DATASETS``.
      data_dir: TFDS data directory (required for shapes: where it is generated).
      train_size, val_size: sizes of the embedded splits (ignored for real data).
      seed: seed of the embedded data.
    Raises:
      ValueError for an unknown name; FileNotFoundError naming the files TFDS
      expects when real data has not been prepared.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if name in EMBEDDED:
        if data_dir is None:
            raise ValueError(f"the {name} dataset needs a data_dir to be generated into")
        sizes = dict(train=train_size, validation=val_size, test=val_size)
        variant = EMBEDDED[name]
        train = shapes_source("train", data_dir, seed, sizes, variant)
        val = shapes_source("validation", data_dir, seed, sizes, variant)
        return ClassificationData(name, train, val, shapes.num_classes(variant),
                                  shapes.class_names(variant))
    import tensorflow_datasets as tfds

    kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
    try:
        builder = tfds.builder(name, **kwargs)
        # download=False: ImageNet cannot be downloaded; a missing dataset must fail here,
        # with instructions, not deep inside the first training step.
        train = tfds.data_source(name, split="train", download=False, **kwargs)
        val = tfds.data_source(name, split="validation", download=False, **kwargs)
    except Exception as e:  # TFDS raises assorted errors for missing or partial data
        raise FileNotFoundError(f"{name} is not available ({type(e).__name__}: {str(e)[:300]})\n"
                                + IMAGENET_MANUAL_HELP.format(data_dir=data_dir or "~/tensorflow_datasets")) from e
    info = builder.info
    return ClassificationData(name, train, val, info.features["label"].num_classes,
                              tuple(info.features["label"].names))


def shapes_source(split: str, data_dir, seed: int, sizes: dict, variant: str = "classification"):
    """An embedded classification split through its TF-free TFDS builder."""
    from spp_jax.data.shapes_tfds import load_shapes

    return load_shapes(variant, split, data_dir, seed=seed, **sizes)


class PipelineData:
    """The training loop's data protocol over random-access train/validation sources.

    Each epoch is one :class:`spp_jax.data.pipeline.TrainIterator` at that epoch's
    input size (the loop decides the size schedule); its state is the grain
    iterator's, so a resumed run sees exactly the remaining batches.  Validation
    is the "1 crop" view (centre 224 of the 256-resized image).  ``cache_bytes``:
    RAM for the resized training images (``pipeline.ResizedCache``; 0: none).
    """

    def __init__(self, train, validation, num_classes: int, cfg: pipeline.AugmentConfig, *,
                 seed: int = 0, num_threads: int = 2, num_workers: int = 0, cache_bytes: int = 0):
        if len(train) == 0:
            raise ValueError("the training split is empty")
        self.train, self.validation = train, validation
        # One cache for all epochs: from the second on, no training image is read or
        # resized again (as far as the budget goes).
        self.cache = pipeline.ResizedCache(cache_bytes) if cache_bytes > 0 else None
        self.num_classes = int(num_classes)
        self.cfg, self.seed = cfg, seed
        self.num_threads, self.num_workers = num_threads, num_workers
        self.skipped = 0

    @property
    def train_channels(self) -> int:
        """1 when the training batches are gray (``cfg.gray``), else 3."""
        return self.cfg.channels

    def steps_per_epoch(self, batch_size: int) -> int:
        steps = len(self.train) // batch_size
        if steps < 1:
            raise ValueError(f"batch size {batch_size} exceeds the {len(self.train)} training images")
        return steps

    def train_iter(self, epoch, size, batch_size, process_index=0, process_count=1, state=None):
        it = pipeline.TrainIterator(
            self.train, batch_size, seed=self.seed, sizes=pipeline.CycleSizes((int(size),)),
            cfg=self.cfg, start_epoch=int(epoch), num_epochs=int(epoch) + 1,
            process_index=process_index, process_count=process_count,
            num_workers=self.num_workers, num_threads=self.num_threads, cache=self.cache)
        if state is not None:
            it.set_state(state)
        return it

    def eval_batches(self, size, batch_size, process_index=0, process_count=1):
        if size != self.cfg.crop_size:
            raise ValueError(f"validation uses {self.cfg.crop_size} centre crops, asked for size {size}")
        it = pipeline.EvalIterator(self.validation, "center", batch_size, cfg=self.cfg,
                                   pad_last_batch=True, process_index=process_index,
                                   process_count=process_count, num_threads=self.num_threads)
        for batch in it:
            yield {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}
        self.skipped = it.num_skipped


def mean_image(source, path: str | os.PathLike | None, size: int = 256, num_samples: int = 1000,
               seed: int = 0) -> np.ndarray:
    """The training set's mean image (size x size x 3 float32), cached at ``path`` if given."""
    from spp_jax.data import augment

    if path is not None and os.path.exists(path):
        return np.load(path)
    mean = augment.compute_mean_image(source, size=size, num_samples=num_samples, seed=seed)
    if path is not None:
        with atomic.path(path) as tmp:
            np.save(tmp, mean)
    return mean
