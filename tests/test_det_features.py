import numpy as np
import pytest

import jax.numpy as jnp

from spp_jax import roi_pool, serve
from spp_jax.detection.cache import FeatureCache, cache_features
from spp_jax.models import SPPNet
from spp_jax.serve import Server, fc_layers, unique_rows
from test_det_common import tiny_extractor, tiny_model, tiny_records


def unpadded_pool(ex, image, boxes):
    """Reference: conv map of the unpadded resized image + roi_pool on the whole map."""
    from spp_jax.detection.features import resize_for_scale
    from spp_jax.detection.boxes import scale_boxes
    m, v = tiny_model()
    resized, f = resize_for_scale(image, ex.scales[0])
    x = jnp.asarray(resized.astype(np.float32) - ex.server.mean)[None]
    fmap = m.apply(v, x, method=SPPNet.conv_map)[0]
    return np.asarray(roi_pool(fmap, np.asarray(scale_boxes(boxes, f), np.float32), ex.levels,
                               geometry=m.geometry))


def test_bucket_equals_image_exact():
    ex = tiny_extractor()
    rec = tiny_records("trainval", 1)[0]  # 160 x 240: exactly a bucket at scale 160
    assert rec["image"].shape[:2] == (160, 240)
    boxes = np.array([[0, 0, 239, 159], [10, 20, 100, 90], [150, 40, 239, 159], [5, 5, 30, 30]], np.float32)
    got, sidx = ex.pool5(rec["image"], boxes)
    want = unpadded_pool(ex, rec["image"], boxes)
    assert got.shape == (4, ex.model.channels * 50) and (sidx == 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_padded_bucket_equals_unpadded_everywhere():
    ex = tiny_extractor()
    img = tiny_records("trainval", 1)[0]["image"][:, :200]  # 160 x 200 -> padded to 160 x 240
    assert ex.server.bucket(160, 200, 160) == (160, 240)
    boxes = np.array([[0, 0, 80, 100], [20, 10, 90, 70],  # away from the right edge
                      [100, 0, 199, 159], [150, 100, 199, 159], [0, 0, 199, 159]], np.float32)  # touching it
    got, _ = ex.pool5(img, boxes)
    want = unpadded_pool(ex, img, boxes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dedup_identical_cells():
    ex = tiny_extractor()
    img = tiny_records("trainval", 1)[0]["image"]
    # Three windows 1 px apart project to the same cells (cells are 16 px apart), plus a duplicate.
    boxes = np.array([[32, 32, 111, 111], [33, 32, 111, 111], [32, 33, 112, 111], [32, 32, 111, 111],
                      [0, 0, 239, 159]], np.float32)
    before = dict(ex.stats)
    got, _ = ex.pool5(img, boxes)
    assert ex.stats["unique"] - before["unique"] == 2
    for i in (1, 2, 3):
        np.testing.assert_array_equal(got[i], got[0])
    assert not np.array_equal(got[4], got[0])
    with pytest.raises(ValueError, match="empty"):
        ex.pool5(img, np.zeros((0, 4)))


def test_multi_scale_uses_one_map_per_needed_scale():
    from spp_jax.detection.features import SPPExtractor
    m, v = tiny_model()
    ex = SPPExtractor(Server(m, v, mean=128.0), scales=(160, 320))
    img = tiny_records("trainval", 1)[0]["image"]
    boxes = np.array([[0, 0, 239, 159], [10, 10, 40, 40]], np.float32)
    got, sidx = ex.pool5(img, boxes)
    assert list(sidx) == [0, 1] and np.isfinite(got).all()


def test_unique_rows_matches_numpy():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 40)).astype(np.float32)
    near = base[2].copy()
    near[1] += 1.0  # differs only in a column the dict key skips: must stay its own row
    x = np.concatenate([base, base[[3, 0, 3]], near[None], base[[2]]])
    first, inverse = unique_rows(x)
    np.testing.assert_array_equal(x[first][inverse], x)
    _, np_first = np.unique(x, axis=0, return_index=True)
    assert sorted(first) == sorted(np_first) and len(first) == 7


def test_fc_layers_match_head(monkeypatch):
    m, v = tiny_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(21, m.pooled_dim)).astype(np.float32)
    x = np.concatenate([x, x[[4, 20, 4]]])  # 3 repeated rows: computed once
    out = m.apply(v, jnp.asarray(x), method=SPPNet.head)
    rows = []
    real_head = serve._head
    monkeypatch.setattr(serve, "_head", lambda h, p, a, logits: rows.append(a.shape[0]) or real_head(h, p, a, logits))
    got = fc_layers(v["params"]["classifier"], x, chunk=16)
    # 21 distinct rows in chunks of 16: the tail's 5 rows padded to a multiple of 16 // 8 = 2.
    assert rows == [16, 6]
    for k in ("fc6", "fc7", "logits"):
        np.testing.assert_allclose(got[k], np.asarray(out[k]), rtol=1e-5, atol=1e-5)
    fc67 = {k: v["params"]["classifier"][k] for k in ("fc6", "fc7")}  # fc6/fc7 need no fc8
    np.testing.assert_array_equal(fc_layers(fc67, x, logits=False, chunk=4)["fc7"], got["fc7"])


def test_cache_resumes_and_float16(tmp_path):
    ex = tiny_extractor()
    recs = tiny_records("trainval", 2)
    props = {r["image_id"]: np.array([[0, 0, 50, 50], [10, 10, 120, 100]], np.float32) for r in recs}
    cache = FeatureCache(str(tmp_path), {"t": 1})
    n0 = ex.stats["images"]
    cache_features(recs, props, ex, cache, progress=False)
    assert ex.stats["images"] - n0 == 2 and cache.ids == [r["image_id"] for r in recs]
    e = cache.load(recs[0]["image_id"])
    assert e.num_gt == len(recs[0]["boxes"]) and e.boxes.shape[0] == e.num_gt + 2
    import os
    with np.load(cache.path(recs[0]["image_id"])) as z:
        assert z["pool5"].dtype == np.float16
    os.remove(cache.path(recs[1]["image_id"]))  # as if interrupted before image 1
    n1 = ex.stats["images"]
    cache_features(recs, props, ex, cache, progress=False)
    assert ex.stats["images"] - n1 == 1
    # flipped copies for fine-tuning
    cache_features(recs, props, ex, cache, flip=True, progress=False)
    ef = cache.load(recs[0]["image_id"], flip=True)
    w = recs[0]["image"].shape[1]
    np.testing.assert_array_equal(ef.boxes[:, 0], w - 1 - e.boxes[:, 2])
    # an image without proposals keeps only its GT rows; no proposals and no GT -> skipped
    empty = {"image_id": "empty", "image": recs[0]["image"], "boxes": np.zeros((0, 4), np.float32),
             "labels": np.zeros(0, np.int64), "difficult": np.zeros(0, bool)}
    c2 = cache_features([empty], {}, ex, FeatureCache(str(tmp_path), {"t": 2}), progress=False)
    assert c2.ids == []


def test_bad_windows_empty_proposals_and_corrupt_files(tmp_path, caplog):
    ex = tiny_extractor()
    recs = tiny_records("test", 2)  # 160 x 240 images with objects
    h, w = recs[0]["image"].shape[:2]
    good = np.array([[0, 0, 50, 50], [-20, 10, 300, 100]], np.float32)  # the second is clipped
    bad = np.array([[300, 0, 320, 50], [0, 200, 20, 220], [30, 30, 20, 40]], np.float32)  # outside/inverted
    props = {recs[0]["image_id"]: np.concatenate([good, bad]), recs[1]["image_id"]: np.zeros((0, 4))}
    cache = FeatureCache(str(tmp_path), {"t": "bad"})
    cache_features(recs, props, ex, cache, include_gt=False, progress=False)
    assert "dropped 3 proposal(s)" in caplog.text
    e0 = cache.load(recs[0]["image_id"])
    np.testing.assert_array_equal(e0.boxes, [[0, 0, 50, 50], [0, 10, w - 1, 100]])
    # A test image without proposals is kept with no windows: its objects still count (as missed).
    e1 = cache.load(recs[1]["image_id"])
    assert cache.ids == [r["image_id"] for r in recs]
    assert e1.pool5.shape == (0, ex.dim) and len(e1.gt_boxes) == len(recs[1]["boxes"]) > 0
    # A truncated file is detected and recomputed, never read back as complete.
    with open(cache.path(recs[0]["image_id"]), "r+b") as f:
        f.truncate(100)
    assert not cache.valid(recs[0]["image_id"])
    with pytest.raises(ValueError, match="unreadable.*delete it"):
        cache.load(recs[0]["image_id"])
    cache_features(recs, props, ex, cache, include_gt=False, progress=False)
    assert "incomplete or unreadable: recomputing" in caplog.text
    np.testing.assert_allclose(cache.load(recs[0]["image_id"]).pool5, e0.pool5)
