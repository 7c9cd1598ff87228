"""Tests for spp_jax.data.pipeline (grain train / eval input pipelines).

Tiny in-memory sources with small images and small crop sizes keep this
fast; labels are the source indices so batches show which samples they hold.
"""

import json
import logging

import cv2
import numpy as np
import pytest

from spp_jax.data import augment as A
from spp_jax.data import pipeline as P

# Small geometry: shorter side 16, crops 12, alternate epochs at 10.
CFG = P.AugmentConfig(resize_side=16, crop_size=12,
                      mean=np.array([120.0, 110.0, 100.0], np.float32))
SIZES = P.CycleSizes((12, 10))


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("spp_jax.data.pipeline").setLevel(logging.ERROR)
    yield


def make_source(n, seed=0, bad=()):
    """n items of random size (12..30 px), label = index; ``bad`` indices get
    corrupt data (alternating empty array / undecodable bytes / None)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = rng.integers(12, 31, size=2)
        items.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                      "label": i})
    for j, i in enumerate(bad):
        items[i]["image"] = [np.zeros((0, 7, 3), np.uint8), b"\xff\xd8junk", None][j % 3]
    return P.InMemorySource(items)


def train_iter(source, batch_size=4, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("sizes", SIZES)
    kw.setdefault("cfg", CFG)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("num_threads", 0)
    return P.TrainIterator(source, batch_size, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"image", "label"}
        assert np.array_equal(x["label"], y["label"])
        assert np.array_equal(x["image"], y["image"])


# -- training ------------------------------------------------------------------


def test_train_batch_format_and_sizes_per_epoch():
    src = make_source(24)
    it = train_iter(src, batch_size=4, num_epochs=2)
    assert it.steps_per_epoch == 6
    batches = list(it)
    assert len(batches) == 12
    for k, b in enumerate(batches):
        s = 12 if k < 6 else 10  # CycleSizes((12, 10)): switch every epoch
        assert b["image"].shape == (4, s, s, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert it.epoch == 2 and it.batch_in_epoch == 0


def test_train_epoch_is_permutation_and_epochs_differ():
    src = make_source(24)
    batches = list(train_iter(src, num_epochs=2))
    e0 = np.concatenate([b["label"] for b in batches[:6]])
    e1 = np.concatenate([b["label"] for b in batches[6:]])
    assert sorted(e0) == list(range(24)) and sorted(e1) == list(range(24))
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, np.arange(24))  # shuffled


def test_train_determinism():
    src = make_source(20)
    a = take(train_iter(src, seed=7), 8)
    b = take(train_iter(src, seed=7), 8)
    assert_same_batches(a, b)
    c = take(train_iter(src, seed=8), 8)
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


def test_train_sample_order_cache_returns_each_epochs_own_permutation():
    """The per-epoch order cache (kept for the last two epochs) must hand out the
    permutation a fresh shuffle gives, whatever order epochs are asked for in,
    in a pickled copy (a worker process) too."""
    import pickle

    import grain

    n, seed = 20, 3
    fn = P._TrainSample(make_source(n), CFG, seed, SIZES, 0, 1, n, 4)
    fresh = {e: [int(i) for i in grain.MapDataset.range(n).shuffle(
        seed=P._epoch_seed(seed, e))] for e in range(4)}
    assert fresh[0] != fresh[1]
    for e in (0, 1, 2, 0, 3, 1, 1):
        assert [int(fn.order(e)[k]) for k in range(n)] == fresh[e]
        assert len(fn._orders) <= 2
    copy = pickle.loads(pickle.dumps(fn))
    assert copy._orders == {}
    assert [int(copy.order(2)[k]) for k in range(n)] == fresh[2]


def test_train_drop_remainder():
    it = train_iter(make_source(23), batch_size=5, num_epochs=1)
    assert it.steps_per_epoch == 4
    labels = np.concatenate([b["label"] for b in it])
    assert len(labels) == 20 and len(set(labels.tolist())) == 20


def test_train_augmentation_uses_per_sample_rng():
    src = make_source(8)
    seed = 3
    batches = list(train_iter(src, batch_size=4, seed=seed, num_epochs=2))
    for epoch, chunk in ((0, batches[:2]), (1, batches[2:])):
        for b in chunk:
            for img, idx in zip(b["image"], b["label"]):
                rng = np.random.default_rng([seed, epoch, int(idx), 0])
                ref = P.train_augment(src[int(idx)]["image"], rng, SIZES(epoch), CFG)
                assert np.array_equal(img, ref)


def test_train_augment_values():
    cfg = P.AugmentConfig(resize_side=16, crop_size=12, pca_std=0.0, flip=False,
                          mean=np.full((32, 32, 3), 100.0, np.float32))
    img = np.full((20, 30, 3), 130, np.uint8)
    out = P.train_augment(img, np.random.default_rng(0), 10, cfg)
    assert out.shape == (10, 10, 3) and out.dtype == np.float32
    assert np.allclose(out, 30.0)
    # With PCA colour: a constant offset, identical for all pixels.
    cfg2 = P.AugmentConfig(resize_side=16, crop_size=12, flip=False)
    out2 = P.train_augment(img, np.random.default_rng(0), 12, cfg2)
    assert np.allclose(out2, out2[0, 0]) and not np.allclose(out2, 130.0)


@pytest.mark.parametrize("stop", [1, 5, 6, 9])  # mid-epoch, end of epoch, epoch 2
def test_checkpoint_restore_gives_remaining_batches(stop):
    src = make_source(26)  # 6 batches per epoch, 2 samples dropped per epoch
    full = list(train_iter(src, num_epochs=2))
    it = train_iter(src, num_epochs=2)
    head = take(it, stop)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    it.close()
    assert state["step"] == stop
    resumed = train_iter(src, num_epochs=2, num_threads=2)  # threads may differ
    resumed.set_state(state)
    assert resumed.epoch == stop // 6
    tail = list(resumed)
    assert_same_batches(head + tail, full)


def test_set_state_rejects_other_run():
    src = make_source(20)
    it = train_iter(src)
    next(it)
    state = it.get_state()
    with pytest.raises(ValueError):
        train_iter(src, seed=1).set_state(state)
    with pytest.raises(ValueError):
        train_iter(src, batch_size=2).set_state(state)
    with pytest.raises(ValueError):
        train_iter(src, sizes=P.CycleSizes((10,))).set_state(state)


def test_sharding_two_processes_disjoint_and_covering():
    src = make_source(32)
    per_process = []
    for pi in range(2):
        it = train_iter(src, num_epochs=2, process_index=pi, process_count=2)
        assert it.steps_per_epoch == 4
        bs = list(it)
        per_process.append([np.concatenate([b["label"] for b in bs[:4]]),
                            np.concatenate([b["label"] for b in bs[4:]])])
    for epoch in range(2):
        a, b = per_process[0][epoch], per_process[1][epoch]
        assert not set(a.tolist()) & set(b.tolist())
        assert sorted(np.concatenate([a, b]).tolist()) == list(range(32))


def test_global_batches_do_not_depend_on_the_process_count():
    # 2 processes x 2 samples: each global batch is the 1-process batch of 4, same order and
    # augmentation, so a multi-host run equals a one-host run (tests/test_multihost.py)
    src = make_source(19, bad=(6,))
    one = list(train_iter(src, num_epochs=2))
    two = [list(train_iter(src, batch_size=2, num_epochs=2, process_index=i, process_count=2))
           for i in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 8
    for b, ref in enumerate(one):
        for key in ("label", "image"):
            np.testing.assert_array_equal(np.concatenate([two[0][b][key], two[1][b][key]]), ref[key])


def test_sharding_equal_steps_with_remainder():
    src = make_source(33)
    its = [train_iter(src, batch_size=4, process_index=i, process_count=3) for i in range(3)]
    assert {it.steps_per_epoch for it in its} == {2}  # 11 samples each -> 2 batches


def test_bad_samples_skipped_and_counted():
    bad = (2, 5, 11)
    src = make_source(16, bad=bad)
    # Convertible oddities are kept: grayscale, RGBA, float, 16-bit.
    src[0]["image"] = np.full((20, 20), 50, np.uint8)
    src[1]["image"] = np.full((20, 20, 4), 60, np.uint8)
    src[3]["image"] = np.full((20, 20, 3), 0.5, np.float32)
    src[4]["image"] = np.full((20, 20, 1), 1000, np.uint16)
    ok, png = cv2.imencode(".png", np.full((20, 24, 3), 9, np.uint8))
    src[6]["image"] = png.tobytes()
    it = train_iter(src, batch_size=4, num_epochs=2)
    batches = list(it)
    assert len(batches) == 8
    labels = np.concatenate([b["label"] for b in batches])
    assert not set(labels.tolist()) & set(bad)
    assert {0, 1, 3, 4, 6} <= set(labels.tolist())
    assert it.num_skipped == 2 * len(bad)  # each bad sample once per epoch
    assert it.skipped_this_epoch == len(bad)
    assert all(np.isfinite(b["image"]).all() for b in batches)


def test_all_bad_raises():
    src = make_source(8, bad=range(8))
    with pytest.raises(RuntimeError):
        next(train_iter(src))


def test_worker_processes_do_not_change_output():
    src = make_source(24, bad=(4,))
    ref_it = train_iter(src, num_epochs=2, num_threads=0, num_workers=0)
    ref = list(ref_it)
    with train_iter(src, num_epochs=2, num_threads=1, num_workers=2) as it:
        got = list(it)
        assert it.num_skipped == ref_it.num_skipped == 2
    assert_same_batches(got, ref)


class CountingSource:
    """A source that counts reads per index."""

    def __init__(self, inner):
        self.inner, self.reads = inner, {}

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads[i] = self.reads.get(i, 0) + 1
        return self.inner[i]


@pytest.mark.parametrize("threads", [0, 2])
def test_resized_cache_same_batches_one_read_per_image(threads):
    bad = (3,)
    ref = list(train_iter(make_source(20, bad=bad), num_epochs=3, num_threads=threads))
    src = CountingSource(make_source(20, bad=bad))
    cache = P.ResizedCache(1 << 30)
    # One iterator per epoch sharing the cache, as PipelineData builds them.
    got = [b for e in range(3) for b in train_iter(src, num_epochs=e + 1, start_epoch=e,
                                                   num_threads=threads, cache=cache)]
    assert_same_batches(got, ref)  # bit-identical to reading and resizing every time
    good = [i for i in range(20) if i not in bad]
    assert len(cache) == len(good) and all(src.reads[i] == 1 for i in good)
    assert src.reads[3] >= 3  # a bad sample is never cached: read again each epoch
    img, label = cache.get(0)
    assert min(img.shape[:2]) == CFG.resize_side and label == 0
    assert cache.nbytes == sum(cache.get(i)[0].nbytes for i in good)


def test_resized_cache_budget_and_worker_copies():
    import pickle
    src = make_source(20)
    one = min(A.resize_shorter(src[i]["image"], CFG.resize_side).nbytes for i in range(20))
    cache = P.ResizedCache(3 * one)
    ref = list(train_iter(src, num_epochs=2))
    assert_same_batches(list(train_iter(src, num_epochs=2, cache=cache)), ref)
    assert 1 <= len(cache) <= 3 and cache.nbytes <= 3 * one  # past the budget: not kept
    copy = pickle.loads(pickle.dumps(cache))  # what a grain worker process receives
    assert len(copy) == 0 and copy.nbytes == 0 and copy.max_bytes == cache.max_bytes
    with train_iter(src, num_epochs=2, num_threads=1, num_workers=2, cache=P.ResizedCache(1 << 30)) as it:
        assert_same_batches(list(it), ref)


def test_size_schedules():
    assert [P.CycleSizes((224, 180))(e) for e in range(4)] == [224, 180, 224, 180]
    u = P.UniformSizes(180, 224, seed=1)
    draws = [u(e) for e in range(50)]
    assert all(180 <= d <= 224 for d in draws) and len(set(draws)) > 5
    assert draws == [u(e) for e in range(50)]


# -- evaluation ------------------------------------------------------------------


def eval_iter(source, view="center", batch_size=4, **kw):
    kw.setdefault("cfg", CFG)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("num_threads", 0)
    return P.EvalIterator(source, view, batch_size, **kw)


def test_eval_center_in_order_no_drop():
    src = make_source(10)
    ev = eval_iter(src, "center", 4)
    batches = list(ev)
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(10))
    assert np.concatenate([b["label"] for b in batches]).tolist() == list(range(10))
    b = batches[0]
    assert b["image"].shape == (4, 1, 12, 12, 3) and b["image"].dtype == np.float32
    assert b["valid_hw"].tolist() == [[12, 12]] * 4 and b["mask"].all()
    # The view is the centre crop of the 16-resized image, mean-subtracted.
    img = A.resize_shorter(src[0]["image"], 16)
    ref = A.crop(img, A.crop_box(*img.shape[:2], 12, "center")).astype(np.float32) - CFG.mean
    assert np.array_equal(b["image"][0, 0], ref)
    assert [len(x["label"]) for x in ev] == [4, 4, 2]  # re-iterable


def test_eval_pad_last_batch():
    batches = list(eval_iter(make_source(10), "center", 4, pad_last_batch=True))
    last = batches[-1]
    assert last["image"].shape[0] == 4
    assert last["mask"].tolist() == [True, True, False, False]
    assert last["label"].tolist()[2:] == [-1, -1] and (last["image"][2:] == 0).all()


def test_eval_ten_views():
    src = make_source(3)
    b = next(iter(eval_iter(src, "ten", 3)))
    assert b["image"].shape == (3, 10, 12, 12, 3)
    # Per-channel mean keeps the flip relation exact.
    assert np.array_equal(b["image"][:, 5:], np.flip(b["image"][:, :5], axis=3))


def test_eval_full_views_single_and_padded():
    src = make_source(6)
    singles = list(eval_iter(src, "full", 1))
    assert len(singles) == 6
    for b, i in zip(singles, range(6)):
        h, w = A.resize_shorter(src[i]["image"], 16).shape[:2]
        assert b["image"].shape == (1, 1, h, w, 3)
        assert b["valid_hw"].tolist() == [[h, w]]
    with pytest.raises(ValueError):
        eval_iter(src, "full", 2)
    ev = eval_iter(src, "full", 4, pad_to=(40, 40))
    padded = list(ev)
    assert padded[0]["image"].shape == (4, 1, 40, 40, 3)
    for b in padded:
        for img, (h, w), idx in zip(b["image"], b["valid_hw"], b["index"]):
            assert np.array_equal(img[0, :h, :w], singles[idx]["image"][0, 0])
            assert (img[0, h:] == 0).all() and (img[0, :, w:] == 0).all()
    assert ev.num_cropped_to_fit == 0
    ev = eval_iter(src, "full", 2, pad_to=(16, 16))
    hw = np.concatenate([b["valid_hw"] for b in ev])
    assert (hw == 16).all() and ev.num_cropped_to_fit > 0


def test_eval_bad_samples_and_sharding():
    src = make_source(11, bad=(3, 8))
    seen = []
    skipped = 0
    for pi in range(2):
        ev = eval_iter(src, "center", 3, process_index=pi, process_count=2)
        seen.append(np.concatenate([b["index"] for b in ev]).tolist())
        skipped += ev.num_skipped
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [i for i in range(11) if i not in (3, 8)]
    assert skipped == 2


def test_eval_workers_same_output():
    src = make_source(7, bad=(2,))
    ref = list(eval_iter(src, "center", 3))
    got_ev = eval_iter(src, "center", 3, num_workers=2)
    got = list(got_ev)
    assert got_ev.num_skipped == 1
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        for k in a:
            assert np.array_equal(a[k], b[k])


@pytest.mark.parametrize("size", [12, 10])  # the crop's own size, then a resize
def test_gray_augment_is_the_colour_augment_channel_mean(size):
    """cfg.gray: the crop, flip and mean of the colour path, then the mean of the 3 channels
    (numpy, in float64, as the reference); the colour path's resize rounds to uint8, the
    gray one resizes floats: equal within that rounding (exact without a resize)."""
    rng0 = np.random.default_rng(5)
    img = rng0.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mean = rng0.uniform(0, 255, (32, 32, 3)).astype(np.float32)
    colour = P.AugmentConfig(resize_side=16, crop_size=12, pca_std=0.0, mean=mean)
    gray = P.AugmentConfig(resize_side=16, crop_size=12, pca_std=0.1, mean=mean, gray=True)
    for seed in range(6):  # both flips, several crops
        ref = P.train_augment(img, np.random.default_rng(seed), size, colour).astype(np.float64)
        out = P.train_augment(img, np.random.default_rng(seed), size, gray)
        assert out.shape == (size, size, 1) and out.dtype == np.float32
        np.testing.assert_allclose(out[..., 0], ref.mean(-1), atol=1e-4 if size == 12 else 0.5)


def test_gray_batches_give_a_gray_std_net_the_colour_batches_outputs():
    """Why gray batches may skip the PCA colour offset: a gray_std net averages the channels
    and standardises each image, so the offset (one value per image after the average)
    cancels; its logits on the gray batch equal those on the colour batch with PCA."""
    import jax
    from spp_jax.models import get_model

    rng0 = np.random.default_rng(1)
    imgs = [rng0.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    kw = dict(resize_side=36, crop_size=32, mean=np.full((8, 8, 3), 120.0, np.float32))
    colour, gray = P.AugmentConfig(pca_std=0.5, **kw), P.AugmentConfig(gray=True, **kw)
    xc = np.stack([P.train_augment(im, np.random.default_rng(i), 32, colour) for i, im in enumerate(imgs)])
    xg = np.stack([P.train_augment(im, np.random.default_rng(i), 32, gray) for i, im in enumerate(imgs)])
    assert not np.allclose(xc.mean(-1, keepdims=True), xg, atol=1.0)  # the offset is really there
    model = get_model("zf5", num_classes=5, width=1 / 16, fc_dim=16, dropout=0.0,
                      init_scheme="he", input_norm="gray_std")
    variables = model.init(jax.random.PRNGKey(0), xc[:1])
    np.testing.assert_allclose(model.apply(variables, xg), model.apply(variables, xc),
                               rtol=1e-4, atol=1e-5)
