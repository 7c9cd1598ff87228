"""What the training loop needs from a data set (:class:`TrainData`), and a tiny in-memory one.

Contract (all batch sizes given to the data are *per process*; the loop passes
``global_batch // process_count``):

``num_classes: int``
``train_channels: int``
    Channels C of the training images: 3 (RGB), or 1 (each image's gray level, for a
    network with ``input_norm="gray_std"``, which would average the three itself).
``steps_per_epoch(global_batch_size) -> int``
    Optimizer steps per epoch.  Every process must yield at least this many batches
    from ``train_iter`` per epoch (multi-host steps are collective).
``train_iter(epoch, size, batch_size, process_index, process_count, state=None)``
    An iterator of ``{"image": float32 (batch_size, size, size, C), "label": int32
    (batch_size,)}`` numpy batches for ``epoch`` at input side ``size``, this process's
    share only.  It has ``get_state() -> dict`` (JSON-able, the position *after* the
    batches consumed so far) and ``set_state(dict)``; ``state`` given to ``train_iter``
    is such a dict and means "resume there".  A resumed iterator must yield exactly the
    batches the uninterrupted one would have.
``eval_batches(size, batch_size, process_index, process_count)``
    An iterable of ``{"image": float32 (B, size, size, 3) or (B, V, size, size, 3) for
    V views, "label": int32 (B,), optional "mask": bool (B,)}`` with ``B <= batch_size``
    (the loop pads short batches).  Every process must yield the same number of batches.

Images are float32 RGB (or gray, C = 1, training only) in the pipeline's units (0..255
minus the mean).
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TrainIterator(Protocol):
    def __iter__(self) -> Iterator[dict]: ...
    def __next__(self) -> dict: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


@runtime_checkable
class TrainData(Protocol):
    num_classes: int
    train_channels: int

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def train_iter(self, epoch: int, size: int, batch_size: int, process_index: int = 0,
                   process_count: int = 1, state: dict | None = None) -> TrainIterator: ...

    def eval_batches(self, size: int, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> Iterable[dict]: ...


# --------------------------------------------------------------------------------------
# A synthetic in-memory data set for tests and smoke runs.

def _class_colours(num_classes: int) -> np.ndarray:
    """A distinct RGB offset per class (corners of the colour cube, then more)."""
    rng = np.random.default_rng(1234)
    base = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                     [1, 1, 1], [-1, 0, 0], [0, -1, 0], [0, 0, -1]], np.float32)
    if num_classes > len(base):
        base = np.concatenate([base, rng.normal(size=(num_classes - len(base), 3))])
    return base[:num_classes].astype(np.float32)


class InMemoryData:
    """Random images whose label is visible: class ``c`` adds its own colour to a bright
    square at a class-dependent corner, over Gaussian noise.  A tiny model learns it in
    a few dozen steps.

    Every image is a pure function of (seed, split, index, size), so the order, the
    sharding over processes and resuming are all deterministic.  ``delay`` (seconds per
    batch) slows iteration down, for tests that must interrupt a run.  ``loaded`` lists
    the training indices this process has loaded, in order (tests check the sharding).
    """

    train_channels = 3

    def __init__(self, num_train: int = 64, num_val: int = 32, num_classes: int = 4,
                 seed: int = 0, noise: float = 0.5, signal: float = 1.5, delay: float = 0.0):
        self.num_train, self.num_val, self.num_classes = num_train, num_val, num_classes
        self.seed, self.noise, self.signal, self.delay = seed, noise, signal, delay
        self._colours = _class_colours(num_classes)
        self.loaded: list[int] = []
        rng = np.random.default_rng([seed, 7])
        self._labels = {"train": rng.integers(0, num_classes, num_train).astype(np.int32),
                        "val": rng.integers(0, num_classes, num_val).astype(np.int32)}

    def image(self, split: str, index: int, size: int) -> tuple[np.ndarray, int]:
        label = int(self._labels[split][index])
        rng = np.random.default_rng([self.seed, 1 if split == "train" else 2, index, size])
        img = rng.normal(0.0, self.noise, (size, size, 3)).astype(np.float32)
        half = max(1, size // 2)
        y0 = 0 if label % 2 == 0 else size - half
        x0 = 0 if (label // 2) % 2 == 0 else size - half
        img[y0:y0 + half, x0:x0 + half] += self.signal * (0.5 + 0.5 * self._colours[label])
        img += 0.25 * self.signal * self._colours[label]
        return img, label

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_train // batch_size

    def train_iter(self, epoch, size, batch_size, process_index=0, process_count=1, state=None):
        return _InMemoryIterator(self, epoch, size, batch_size, process_index, process_count, state)

    def eval_batches(self, size, batch_size, process_index=0, process_count=1):
        idx = np.arange(self.num_val)[process_index::process_count]
        n_batches = -(-(self.num_val // process_count) // batch_size)
        for b in range(n_batches):
            chunk = idx[b * batch_size:(b + 1) * batch_size]
            if len(chunk) == 0:
                yield {"image": np.zeros((0, size, size, 3), np.float32),
                       "label": np.zeros((0,), np.int32)}
                continue
            pairs = [self.image("val", int(i), size) for i in chunk]
            yield {"image": np.stack([p[0] for p in pairs]),
                   "label": np.array([p[1] for p in pairs], np.int32)}


class _InMemoryIterator:
    def __init__(self, data: InMemoryData, epoch, size, batch_size, process_index,
                 process_count, state):
        self.data, self.epoch, self.size, self.batch_size = data, epoch, size, batch_size
        self.order = np.random.default_rng([data.seed, 3, epoch]).permutation(data.num_train)
        self.num_batches = data.steps_per_epoch(batch_size * process_count)
        self.offset, self.stride = process_index * batch_size, process_count * batch_size
        self.position = 0
        if state is not None:
            self.set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position >= self.num_batches:
            raise StopIteration
        if self.data.delay:
            time.sleep(self.data.delay)
        # block `process_index` of global batch `position`: the same global batches on any
        # number of processes
        start = self.position * self.stride + self.offset
        chunk = self.order[start:start + self.batch_size]
        self.data.loaded.extend(int(i) for i in chunk)
        pairs = [self.data.image("train", int(i), self.size) for i in chunk]
        self.position += 1
        return {"image": np.stack([p[0] for p in pairs]),
                "label": np.array([p[1] for p in pairs], np.int32)}

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        if int(state["epoch"]) != self.epoch:
            raise ValueError(f"iterator state is for epoch {state['epoch']}, not {self.epoch}")
        self.position = int(state["position"])
