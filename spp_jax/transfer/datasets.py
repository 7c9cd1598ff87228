"""Image collections for transfer classification: VOC-2007-like and Caltech101-like.

``voc_cls_data(name, ...)`` -> ``(trainval, test)`` :class:`LabeledImages` with
VOC classification labels ``(N, K) int8``: +1 the class is present, -1 absent,
0 "ignore" (present only through difficult objects, as VOC 2007's
``*_trainval.txt`` files mark them).

``caltech_data(name, ...)`` -> one :class:`LabeledImages` pool with ``(N,)``
int labels; training / test images are drawn from it per random split
(:func:`spp_jax.transfer.classify.sample_split`).

Names:

* ``shapes`` (default, embedded, no download): the ``multilabel`` variant of
  :mod:`spp_jax.data.shapes` (10 classes, trainval / test) for VOC, the
  ``fine`` variant (30 classes = shape x fill style) for Caltech;
* ``voc/2007``: TFDS's VOC 2007 (trainval = its ``train`` + ``validation``
  splits, test = ``test``), read with ``tfds.data_source``;
* ``caltech101``: TFDS's Caltech101 (its ``train`` + ``test`` splits pooled,
  102 classes including ``background_google``).

The TFDS sets must be prepared once in ArrayRecord format (TFDS reads them
without TensorFlow; preparing needs it): see :data:`TFDS_HELP`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from spp_jax import atomic
from spp_jax.data import augment, shapes

VOC_DATASETS: tuple[str, ...] = ("shapes", "voc/2007")
CALTECH_DATASETS: tuple[str, ...] = ("shapes", "caltech101")

TFDS_HELP = (
    "TFDS expects {name} prepared in ArrayRecord format under {data_dir}/{name}/<version>/. "
    "Prepare it once with TensorFlow installed (pip install -r requirements-prepare.txt): "
    "tfds build {name} --data_dir {data_dir} --file_format array_record{extra}")


@dataclasses.dataclass
class LabeledImages:
    """A random-access image collection with labels.

    ``images[i]`` (and ``self[i]``) give uint8 RGB (H, W, 3); ``labels`` is
    ``(N, K)`` int8 in {+1, -1, 0} (multi-label) or ``(N,)`` int64 (single label).
    ``data_id`` names the collection in feature-cache keys.
    """

    data_id: str
    source: Any
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> np.ndarray:
        item = self.source[int(i)]
        raw = item["image"] if isinstance(item, dict) else item
        img = augment.load_image(raw)
        if img is None:
            raise augment.BadImageError(f"image {i} of {self.data_id} is unreadable")
        return img

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ConcatSource:
    """Random access over several sources, one after the other."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.sources[k][i - int(self.offsets[k])]


class Head:
    """The first ``n`` items of a source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= int(i) < self.n:
            raise IndexError(i)
        return self.source[int(i)]


# ---- label conversion ---------------------------------------------------------------------


def voc_labels_from_tfds(example: dict, num_classes: int) -> np.ndarray:
    """VOC classification labels (K,) int8 of a TFDS ``voc`` example.

    ``labels`` lists the classes of all objects, ``labels_no_difficult`` those
    of non-difficult ones: +1 if a class has a non-difficult object, 0 if it
    only has difficult ones, -1 otherwise.
    """
    y = np.full(num_classes, -1, np.int8)
    y[np.asarray(example.get("labels", []), np.int64).reshape(-1)] = 0
    y[np.asarray(example.get("labels_no_difficult", []), np.int64).reshape(-1)] = 1
    return y


def voc_labels_from_shapes(example: dict, num_classes: int) -> np.ndarray:
    """The same rule for a ``shapes`` multilabel sample (from its objects' difficult flags)."""
    obj = example["objects"]
    lab = np.asarray(obj["label"], np.int64).reshape(-1)
    diff = np.asarray(obj["difficult"], bool).reshape(-1)
    y = np.full(num_classes, -1, np.int8)
    y[lab] = 0
    y[lab[~diff]] = 1
    return y


def _labels(source, fn, cache: str | None, desc: str, progress: bool) -> np.ndarray:
    """Labels of every example (decoding each once), cached as .npy if ``cache`` is given."""
    if cache is not None and os.path.exists(cache):
        return np.load(cache)
    from tqdm.auto import tqdm

    out = np.stack([fn(source[i]) for i in tqdm(range(len(source)), desc=desc, disable=not progress,
                                                 leave=False)])
    if cache is not None:
        with atomic.path(cache) as tmp:
            np.save(tmp, out)
    return out


def _tfds_sources(name: str, splits: Sequence[str], data_dir: str | None, extra_help: str = ""):
    import tensorflow_datasets as tfds

    kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
    try:
        builder = tfds.builder(name, **kwargs)
        srcs = [tfds.data_source(name, split=s, download=False, **kwargs) for s in splits]
    except Exception as e:  # TFDS raises assorted errors for missing or partial data
        why = " ".join(str(e)[:300].split())  # one line: an entry point prints it as `error: ...`
        raise FileNotFoundError(
            f"{name} is not available ({type(e).__name__}: {why}). "
            + TFDS_HELP.format(name=name, data_dir=data_dir or "~/tensorflow_datasets", extra=extra_help)) from e
    return builder, srcs


def _cache_path(cache_dir, data_id):
    return None if cache_dir is None else os.path.join(cache_dir, data_id.replace("/", "_") + "_labels.npy")


# ---- VOC-like -----------------------------------------------------------------------------


def voc_cls_data(name: str = "shapes", data_dir: str | None = None, *, trainval_size: int = 500,
                 test_size: int = 300, seed: int = 0, cache_dir: str | None = None,
                 progress: bool = True, limit: bool = False) -> tuple[LabeledImages, LabeledImages]:
    """``(trainval, test)`` of a VOC-classification-like dataset (see the module doc).

    ``trainval_size`` / ``test_size`` / ``seed`` set the embedded splits; for
    ``voc/2007`` the sizes are ignored unless ``limit`` (keep only the first
    ``trainval_size`` / ``test_size`` images, for smoke runs).  ``cache_dir`` caches the decoded labels.
    """
    if name not in VOC_DATASETS:
        raise ValueError(f"unknown VOC-classification dataset {name!r}; valid: {', '.join(VOC_DATASETS)}")
    if name == "shapes":
        k = shapes.num_classes("multilabel")
        out = []
        for split, n in (("trainval", trainval_size), ("test", test_size)):
            src = shapes.ShapesSource("multilabel", split, n, seed)
            data_id = f"shapes-multilabel-{split}-{n}-seed{seed}"
            y = _labels(src, lambda ex: voc_labels_from_shapes(ex, k), _cache_path(cache_dir, data_id),
                        f"labels {split}", progress)
            out.append(LabeledImages(data_id, src, y, shapes.class_names("multilabel")))
        return out[0], out[1]
    extra = " (VOC 2007 needs TFDS's download of VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar)"
    builder, (tr, va, te) = _tfds_sources(name, ("train", "validation", "test"), data_dir, extra)
    names = tuple(builder.info.features["labels"].feature.names)
    k = len(names)
    out = []
    for split, src, n in (("trainval", ConcatSource([tr, va]), trainval_size), ("test", te, test_size)):
        if limit and n < len(src):
            src = Head(src, n)
        data_id = f"{name.replace('/', '')}-{split}-{len(src)}"
        y = _labels(src, lambda ex: voc_labels_from_tfds(ex, k), _cache_path(cache_dir, data_id),
                    f"labels {split}", progress)
        out.append(LabeledImages(data_id, src, y, names))
    return out[0], out[1]


# ---- Caltech-like -------------------------------------------------------------------------


def caltech_data(name: str = "shapes", data_dir: str | None = None, *, pool_size: int = 1800,
                 seed: int = 0, cache_dir: str | None = None, progress: bool = True) -> LabeledImages:
    """The image pool of a Caltech101-like dataset, single labels ``(N,)`` int64.

    Embedded: ``pool_size`` images of the ``fine`` shapes variant (30 classes,
    about ``pool_size / 30`` per class).  ``caltech101``: TFDS's train + test.
    """
    if name not in CALTECH_DATASETS:
        raise ValueError(f"unknown Caltech-like dataset {name!r}; valid: {', '.join(CALTECH_DATASETS)}")
    if name == "shapes":
        src = shapes.ShapesSource("fine", "train", pool_size, seed)
        data_id = f"shapes-fine-train-{pool_size}-seed{seed}"
        y = _labels(src, lambda ex: np.int64(ex["label"]), _cache_path(cache_dir, data_id), "labels", progress)
        return LabeledImages(data_id, src, y.astype(np.int64), shapes.class_names("fine"))
    builder, (tr, te) = _tfds_sources(name, ("train", "test"), data_dir)
    names = tuple(builder.info.features["label"].names)
    src = ConcatSource([tr, te])
    data_id = f"{name}-train+test-{len(src)}"
    y = _labels(src, lambda ex: np.int64(ex["label"]), _cache_path(cache_dir, data_id), "labels", progress)
    return LabeledImages(data_id, src, y.astype(np.int64), names)
