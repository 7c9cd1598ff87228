"""Tests of the synthetic shapes dataset (spp_jax.data.shapes / shapes_tfds)."""

import os

import numpy as np
import pytest

from spp_jax.data import shapes

VARIANTS = shapes.VARIANTS


def _objects_equal(a, b):
    for key in ("bbox", "label", "difficult"):
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].dtype == b[key].dtype, key


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic_and_index_dependent(variant):
    a = shapes.generate(variant, "train", 7, seed=3)
    b = shapes.generate(variant, "train", 7, seed=3)
    np.testing.assert_array_equal(a["image"], b["image"])
    _objects_equal(a["objects"], b["objects"])
    # Independent of what else was generated in between (no hidden global state).
    shapes.generate(variant, "train", 8, seed=3)
    c = shapes.generate(variant, "train", 7, seed=3)
    np.testing.assert_array_equal(a["image"], c["image"])
    # Other index / seed / split -> other image.
    for other in (
        shapes.generate(variant, "train", 8, seed=3),
        shapes.generate(variant, "train", 7, seed=4),
        shapes.generate(variant, "test", 7, seed=3),
    ):
        assert other["image"].shape != a["image"].shape or not np.array_equal(other["image"], a["image"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_sizes_boxes_and_tightness(variant):
    n_cls = shapes.num_classes(variant)
    for i in range(30):
        ex = shapes.generate(variant, "validation", i, return_mask=True)
        img, obj, mask = ex["image"], ex["objects"], ex["mask"]
        h, w, c = img.shape
        assert img.dtype == np.uint8 and c == 3
        assert shapes.MIN_SIDE - 1 <= min(h, w) <= shapes.MAX_SIDE + 1
        assert 1 / shapes.MAX_ASPECT - 0.01 <= w / h <= shapes.MAX_ASPECT + 0.01
        assert mask.shape == (h, w) and mask.dtype == np.int16
        boxes = obj["bbox"]
        n = len(boxes)
        assert n >= 1 and boxes.dtype == np.int32 and boxes.shape == (n, 4)
        assert obj["label"].shape == (n,) and obj["difficult"].shape == (n,)
        assert obj["label"].dtype == np.int64 and obj["difficult"].dtype == np.bool_
        assert np.all((obj["label"] >= 0) & (obj["label"] < n_cls))
        # Inside the image, 0-based inclusive corners.
        assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
        assert np.all(boxes[:, 2] <= w - 1) and np.all(boxes[:, 3] <= h - 1)
        assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
        assert set(np.unique(mask)) <= set(range(-1, n))
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            m = mask == k
            ys, xs = np.nonzero(m)
            # Tight: the box is exactly the extent of the object's visible pixels,
            # so each edge touches an object pixel.
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x1, y1, x2, y2)
            assert m[y1, x1 : x2 + 1].any() and m[y2, x1 : x2 + 1].any()
            assert m[y1 : y2 + 1, x1].any() and m[y1 : y2 + 1, x2].any()
            bw, bh = x2 - x1 + 1, y2 - y1 + 1
            if min(bw, bh) < shapes.DIFFICULT_MIN_SIDE:
                assert obj["difficult"][k]


def test_labels_agree_with_objects():
    for i in range(40):
        ex = shapes.generate("classification", "train", i)
        assert np.all(ex["objects"]["label"] == ex["label"])
        assert 1 <= len(ex["objects"]["label"]) <= 3
        ex = shapes.generate("fine", "train", i)
        assert np.all(ex["objects"]["label"] == ex["label"])
        ex = shapes.generate("multilabel", "trainval", i)
        expect = np.zeros(len(shapes.CLASS_NAMES), bool)
        expect[ex["objects"]["label"]] = True
        np.testing.assert_array_equal(ex["labels"], expect)
        assert 1 <= len(ex["objects"]["label"]) <= 5


def test_dominant_object_is_large_in_classification():
    fracs = []
    for i in range(30):
        ex = shapes.generate("classification", "train", i)
        h, w, _ = ex["image"].shape
        x1, y1, x2, y2 = ex["objects"]["bbox"][0]
        fracs.append((x2 - x1 + 1) * (y2 - y1 + 1) / (h * w))
    assert np.median(fracs) > 0.1


def test_wide_variant_is_classification_with_objects_over_more_scales():
    # The radius quantile map, by hand: the draw's ends and midpoint (u = 0.36 of 0.22..0.5)
    # go to 0.1, 0.5 and 0.1 * sqrt(5) (the geometric midpoint of 0.1..0.5).
    for u, want in ((0.22, 0.1), (0.36, 0.1 * 5 ** 0.5), (0.5, 0.5)):
        assert shapes._main_radius(u, "classification_wide") == pytest.approx(want)
        assert shapes._main_radius(u, "classification") == u
    n = 150
    cls = [shapes.generate("classification", "validation", i) for i in range(n)]
    wide = [shapes.generate("classification_wide", "validation", i) for i in range(n)]
    # Image i is classification's image i (same random stream) but for the object size.
    assert [e["label"] for e in wide] == [e["label"] for e in cls]
    assert [e["image"].shape for e in wide] == [e["image"].shape for e in cls]
    a = shapes.main_object_scales("classification", "validation", n)
    b = shapes.main_object_scales("classification_wide", "validation", n)
    # 0.1 * 5**t <= 0.22 + 0.28 t on [0, 1]: never a larger main object (box rounding slack).
    assert np.all(b <= a + 0.02)
    spread = lambda x: np.percentile(x, 95) / np.percentile(x, 5)  # noqa: E731
    assert spread(a) < 2.6 and spread(b) > 1.5 * spread(a), (spread(a), spread(b))


def test_shapes_wide_dataset_through_the_training_config(tmp_path):
    from spp_jax.data.datasets import classification_dataset
    from spp_jax.train.config import get_config, trained_num_classes

    cfg = get_config("embedded", ["dataset=shapes_wide"])
    assert trained_num_classes(cfg) == 10
    ds = classification_dataset("shapes_wide", tmp_path, train_size=4, val_size=2, seed=1)
    for split, src in (("train", ds.train), ("validation", ds.validation)):
        for i in range(len(src)):
            want = shapes.generate("classification_wide", split, i, seed=1)
            np.testing.assert_array_equal(src[i]["image"], want["image"])
            assert int(src[i]["label"]) == want["label"]
    # Beside the default data in one directory, not instead of it.
    plain = classification_dataset("shapes", tmp_path, train_size=4, val_size=2, seed=1)
    assert not np.array_equal(plain.validation[0]["image"], ds.validation[0]["image"])
    np.testing.assert_array_equal(plain.validation[0]["image"],
                                  shapes.generate("classification", "validation", 0, seed=1)["image"])


def test_class_frequencies_roughly_uniform():
    labels = np.array([shapes.generate("classification", "train", i)["label"] for i in range(200)])
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 200 and np.all(counts >= 8) and np.all(counts <= 35), counts
    det = np.concatenate([shapes.generate("detection", "trainval", i)["objects"]["label"] for i in range(80)])
    assert len(np.unique(det)) == 10
    fine = np.array([shapes.generate("fine", "train", i)["label"] for i in range(150)])
    assert len(np.unique(fine)) >= 25 and fine.max() < 30


def test_names_and_num_classes():
    assert len(shapes.CLASS_NAMES) == 10 == shapes.num_classes("detection")
    assert shapes.num_classes("fine") == 30 == len(shapes.class_names("fine"))
    assert shapes.class_names("fine")[3 * 4 + 2] == "cross/checker"
    with pytest.raises(ValueError):
        shapes.generate("nope", "train", 0)
    with pytest.raises(ValueError):
        shapes.generate("detection", "nope", 0)


def test_shapes_source():
    src = shapes.ShapesSource("detection", "test", size=5, seed=1)
    assert len(src) == 5
    np.testing.assert_array_equal(src[-1]["image"], shapes.generate("detection", "test", 4, seed=1)["image"])
    with pytest.raises(IndexError):
        src[5]


@pytest.mark.parametrize(
    "variant,sizes",
    [
        ("classification", {"train": 6, "validation": 2, "test": 2}),
        ("detection", {"trainval": 5, "test": 3}),
        ("multilabel", {"trainval": 4, "test": 0}),
        ("fine", {"train": 4, "test": 2}),
        ("classification_wide", {"train": 3, "validation": 2, "test": 0}),
    ],
)
def test_tfds_round_trip(tmp_path, variant, sizes):
    from spp_jax.data import shapes_tfds

    seed = 5
    for split, n in sizes.items():
        if n == 0:
            continue
        src = shapes_tfds.load_shapes(variant, split, tmp_path, seed=seed, **sizes)
        assert len(src) == n
        for i in range(n):
            got, want = src[i], shapes.generate(variant, split, i, seed=seed)
            assert set(got) == set(want)
            assert got["index"] == i
            assert got["image"].dtype == np.uint8
            np.testing.assert_array_equal(got["image"], want["image"])
            _objects_equal(got["objects"], want["objects"])
            if "label" in want:
                assert int(got["label"]) == want["label"]
            if "labels" in want:
                np.testing.assert_array_equal(got["labels"], want["labels"])
    with pytest.raises(ValueError):  # a dropped (size 0) or unknown split
        shapes_tfds.load_shapes(variant, "nope" if variant != "multilabel" else "test", tmp_path, seed=seed, **sizes)


def test_tfds_reuses_files_and_data_source(tmp_path):
    import tensorflow_datasets as tfds

    from tensorflow_datasets.core import file_adapters

    from spp_jax.data import shapes_tfds

    tfds_writer_module = file_adapters.array_record_module
    src = shapes_tfds.load_shapes("detection", "test", tmp_path, trainval=2, test=2)
    cfg = shapes_tfds.make_config("detection", trainval=2, test=2)
    shard_dir = tmp_path / "spp_shapes" / cfg.name / str(shapes_tfds.SppShapes.VERSION)
    files = sorted(p.name for p in shard_dir.iterdir())
    assert any("array_record" in f for f in files)
    # Written uncompressed (a training read is then a copy, not a zstd decompression), and
    # TFDS's own writer is restored afterwards.
    from array_record.python import array_record_module
    shard = next(p for p in shard_dir.iterdir() if "array_record" in p.name)
    opts = array_record_module.ArrayRecordReader(str(shard)).writer_options_string().split(",")
    assert "uncompressed" in opts and not any(o.startswith("zstd") for o in opts)
    assert file_adapters.array_record_module is tfds_writer_module
    mtimes = {p: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    again = shapes_tfds.load_shapes("detection", "test", tmp_path, trainval=2, test=2)
    assert {p: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == mtimes  # not rebuilt
    np.testing.assert_array_equal(src[1]["image"], again[1]["image"])
    # Also readable through the generic TFDS entry point (builder re-created from files).
    generic = tfds.data_source("spp_shapes", data_dir=tmp_path, split="test", builder_kwargs={"config": cfg})
    np.testing.assert_array_equal(generic[0]["image"], src[0]["image"])
    # Registered default configs resolve by name (without building anything).
    default = shapes_tfds.make_builder(shapes_tfds.make_config("detection"), tmp_path)
    assert default.builder_config.name == "detection"
    assert dict(default.builder_config.split_sizes) == {"trainval": 500, "test": 300}
    # Different sizes -> different config directory, never a stale reuse.
    assert shapes_tfds.make_config("detection", trainval=3, test=2).name != cfg.name
    assert shapes_tfds.make_config("detection").name == "detection"


def test_no_tensorflow_needed():
    import sys

    import spp_jax.data.shapes_tfds  # noqa: F401

    assert "tensorflow" not in sys.modules


def test_bbox_to_tfds_normalized():
    from spp_jax.data.shapes_tfds import bbox_to_tfds_normalized

    out = bbox_to_tfds_normalized(np.array([[0, 0, 9, 19]]), height=40, width=10)
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0]])


def test_build_past_tfds_memory_buffer_needs_no_tensorflow(tmp_path, monkeypatch):
    # TFDS spills examples to disk through tf.io.gfile once its shuffler holds more than
    # MAX_MEM_BUFFER_SIZE (1 GB: ~3,000 raw images). Shrink the limit so a tiny build crosses it.
    from tensorflow_datasets.core import shuffle

    from spp_jax.data import shapes_tfds

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
    src = shapes_tfds.load_shapes("classification", "validation", tmp_path, train=1, validation=3, test=1)
    assert len(src) == 3
    assert shuffle.MAX_MEM_BUFFER_SIZE == 1000  # restored after the build
    import sys
    assert "tensorflow" not in sys.modules


def test_build_waits_for_another_process_building_the_same_config(tmp_path):
    # The runs of a grid share one data directory; a second process must not build the same
    # config at the same time (TFDS's temporary-directory rename would collide) but wait for
    # the first and then read its files.
    import fcntl
    import threading

    from spp_jax.data import shapes_tfds

    sizes = dict(train=1, validation=2, test=1)
    name = shapes_tfds.make_config("classification", **sizes).name
    got = {}
    with open(tmp_path / f".spp_shapes-{name}.lock", "a") as held:  # "another process" holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: got.setdefault(
            "src", shapes_tfds.load_shapes("classification", "validation", tmp_path, **sizes)))
        t.start()
        t.join(1.5)
        assert t.is_alive() and "src" not in got  # blocked while the lock is held
        assert not (tmp_path / "spp_shapes").exists()  # and built nothing meanwhile
        # The holder builds the data meanwhile (as a run started side by side does) ...
        cfg = shapes_tfds.make_config("classification", **sizes)
        shapes_tfds.make_builder(cfg, tmp_path).download_and_prepare(file_format="array_record")
        built = {p: p.stat().st_mtime_ns for p in (tmp_path / "spp_shapes").rglob("*") if p.is_file()}
        fcntl.flock(held, fcntl.LOCK_UN)
    t.join(60)
    # ... and the waiter reads those files: it neither fails on splits it did not see being
    # made nor builds them again.
    assert len(got["src"]) == 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "spp_shapes").rglob("*") if p.is_file()} == built


def test_parallel_build_writes_the_serial_build(tmp_path, monkeypatch):
    # Two render workers (round robin, 7 images: the second worker gets one fewer) must
    # give the records generate() gives, in index order.
    from spp_jax.data import shapes_tfds

    monkeypatch.setattr(shapes_tfds, "render_processes", lambda n: 2 if n >= 5 else 0)
    src = shapes_tfds.load_shapes("classification", "train", tmp_path, seed=3, train=7, validation=1, test=1)
    assert len(src) == 7
    for i in range(7):
        want = shapes.generate("classification", "train", i, seed=3)
        assert int(src[i]["index"]) == i and int(src[i]["label"]) == want["label"]
        np.testing.assert_array_equal(src[i]["image"], want["image"])
        _objects_equal(src[i]["objects"], want["objects"])


def test_render_workers_report_a_failing_worker():
    from spp_jax.data import shapes_workers

    with pytest.raises(RuntimeError, match="render worker 0 stopped before sample 0"):
        list(shapes_workers.rendered("no-such-variant", "train", 3, 0, 1))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists processes through /proc")
def test_render_workers_stop_when_the_reader_stops():
    # Closing the generator early (an exception or Ctrl-C in the build) must not leave
    # workers rendering: they are killed, whichever sample they were on.
    from spp_jax.data import shapes_workers

    def workers():
        """This process's live render workers (not those of tests running beside it)."""
        return [p for p in os.listdir("/proc") if p.isdigit() and _is_worker(p)]

    def _is_worker(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        return ppid == os.getpid() and "shapes_workers" in cmdline

    assert workers() == []
    gen = shapes_workers.rendered("classification", "train", 500, 0, 2)
    first = next(gen)
    assert first["index"] == 0
    assert len(workers()) == 2
    gen.close()
    assert workers() == []


def test_render_processes_only_for_large_splits(monkeypatch):
    from spp_jax.data import shapes_tfds

    monkeypatch.setattr(shapes_tfds.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert shapes_tfds.render_processes(shapes_tfds.PARALLEL_MIN_EXAMPLES - 1) == 0
    assert shapes_tfds.render_processes(shapes_tfds.PARALLEL_MIN_EXAMPLES) == 4
    monkeypatch.setattr(shapes_tfds.sys, "executable", "")  # nothing to start workers with
    assert shapes_tfds.render_processes(10 ** 6) == 0
    monkeypatch.undo()
    monkeypatch.setattr(shapes_tfds.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert shapes_tfds.render_processes(10 ** 6) == 0


def test_parallel_build_from_an_unguarded_script(tmp_path):
    # The workers are plain subprocesses, not multiprocessing "spawn" children: a script
    # without an `if __name__ == "__main__"` guard must not run again in each worker (it
    # would wait forever on the build lock its parent holds).
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text(
        "from spp_jax.data import shapes_tfds\n"
        "shapes_tfds.render_processes = lambda n: 2 if n >= 4 else 0\n"
        f"src = shapes_tfds.load_shapes('classification', 'train', {str(tmp_path / 'data')!r}, "
        "train=4, validation=1, test=1)\n"
        "print('built', len(src))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("built 4")
