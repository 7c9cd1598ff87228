"""Testing protocols: view geometry, top-k errors, and map-based views vs whole-net crops."""
import jax
import numpy as np
import pytest

import spp_jax
from spp_jax.data.pipeline import AugmentConfig, InMemorySource
from spp_jax.data import augment
from spp_jax.evaluate import Scorer, evaluate, full_view_by_side, nine_windows, topk_errors
from spp_jax.serve import Server, bucket_shape
from spp_jax.models import init_params


def test_nine_windows_hand_cases():
    w = nine_windows(300, 400)
    assert len(w) == 9
    assert w[0].tolist() == [0, 0, 223, 223] and w[-1].tolist() == [176, 76, 399, 299]
    assert w[4].tolist() == [88, 38, 311, 261]  # centre
    assert nine_windows(224, 300).tolist() == [[0, 0, 223, 223], [38, 0, 261, 223], [76, 0, 299, 223]]
    assert len(nine_windows(224, 224)) == 1
    with pytest.raises(ValueError, match="smaller than"):
        nine_windows(200, 300)


def test_bucket_shape():
    assert bucket_shape(256, 256, 256) == (256, 256)
    assert bucket_shape(256, 300, 256) == (256, 384)
    assert bucket_shape(256, 512, 256) == (256, 512)
    assert bucket_shape(400, 256, 256) == (512, 256)


def test_topk_errors_hand_case():
    probs = np.array([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    labels = np.array([2, 0, 2])
    top1, top2 = topk_errors(probs, labels, ks=(1, 2))
    assert top1 == pytest.approx(100 * 2 / 3)  # only the second is right; ties go to the lowest index
    assert top2 == pytest.approx(100 * 1 / 3)  # the first is found at rank 2, the tie is not


@pytest.fixture(scope="module")
def tiny():
    m = spp_jax.get_model("zf5", width=0.05, fc_dim=16, num_classes=4, init_scheme="he")
    return m, init_params(m, jax.random.key(0), 224)


def test_full_view_on_maps_equals_whole_net_crop(tiny):
    # At 224x224 there is no padding; the full-map window pools exactly what the net pools.
    m, v = tiny
    img = np.random.default_rng(0).normal(0, 60, (224, 224, 3)).astype(np.float32)
    s = Scorer(Server(m, v))
    p = s.score_windows(img, np.zeros((0, 4)), (224, 224), 10, include_full=True)
    crops = s.score_crops(np.stack([img, img[:, ::-1]]))
    np.testing.assert_allclose(p[:, -1], crops, rtol=1e-5, atol=1e-6)


def test_full_view_is_the_same_on_both_paths(tiny):
    # "1 full" comes from the window pass (with the flip) for the multi-view images and from
    # score_full for the rest: both must give the same probabilities, padded buckets included.
    m, v = tiny
    rng = np.random.default_rng(5)
    s = Scorer(Server(m, v))
    for h, w in [(256, 300), (256, 256), (333, 256)]:
        img = rng.normal(0, 60, (h, w, 3)).astype(np.float32)
        bucket = s.server.bucket(h, w, 256)
        via_windows = s.score_windows(img, np.zeros((0, 4)), bucket, 10, include_full=True)[0, -1]
        np.testing.assert_allclose(s.score_full(img, bucket), via_windows, rtol=1e-5, atol=1e-6)
    items = [{"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "label": i % 4}
             for i, (h, w) in enumerate([(240, 320), (300, 200), (256, 256)])]
    both = evaluate(m, v, InMemorySource(items), protocols=("1full", "multiview"), scales=(224, 256),
                    multiview_limit=2, progress=False)
    alone = evaluate(m, v, InMemorySource(items), protocols=("1full",), progress=False)
    assert both["1full"].top1_hits == alone["1full"].top1_hits


def test_protocols_smoke(tiny):
    m, v = tiny
    rng = np.random.default_rng(1)
    items = [{"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "label": i % 4}
             for i, (h, w) in enumerate([(240, 320), (300, 200), (256, 256)])]
    res = evaluate(m, v, InMemorySource(items), cfg=AugmentConfig(), scales=(224, 256),
                   batch_size=2, progress=False)
    assert list(res) == ["1crop", "1full", "10view", "multiview"]
    for r in res.values():
        assert 0 <= r.top1_err <= r.top5_err + 100 and r.num_images == 3
        assert r.top5_err == 0.0  # 4 classes: the label is always in the top 5
    # views: at 224 the windows of a 224 x W image (3, or 1 if square) and at 256 nine, each x2 flips,
    # + 2 full views: (6 + 18 + 2, 6 + 18 + 2, 2 + 18 + 2) for the three images.
    assert res["multiview"].views_per_image == pytest.approx((26 + 26 + 22) / 3)
    assert res["10view"].views_per_image == 10
    # Per-image hits, in split order, that the errors are the mean of.
    for r in res.values():
        assert r.indices == (0, 1, 2)
        assert r.top1_err == pytest.approx(100 * (1 - np.mean(r.top1_hits))) and all(r.top5_hits)
    limited = evaluate(m, v, InMemorySource(items), cfg=AugmentConfig(), scales=(224, 256),
                       batch_size=2, progress=False, protocols=("1crop", "multiview"), multiview_limit=2)
    assert limited["multiview"].indices == (0, 1) and limited["1crop"].indices == (0, 1, 2)
    assert limited["multiview"].as_dict()["top1_hits"] == [int(h) for h in res["multiview"].top1_hits[:2]]


def test_full_view_by_side_against_the_unpadded_network(tiny):
    # Reference: the whole network (model.apply) on each image resized to shorter side s and
    # minus the mean, with no padding; the probe pads every image into a bucket and masks.
    m, v = tiny
    rng = np.random.default_rng(3)
    items = [{"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "label": i % 4}
             for i, (h, w) in enumerate([(240, 320), (300, 200), (210, 400), (333, 250)])]
    mean = np.array([120.0, 110.0, 100.0], np.float32)
    cfg = AugmentConfig(mean=mean)
    scorer = Scorer(Server(m, v, mean))
    sides = (160, 256)
    got = full_view_by_side(m, v, InMemorySource(items), sides, cfg=cfg, progress=False)
    assert list(got) == list(sides)
    padded = 0
    for s in sides[:1]:  # 256 is checked against the 1-full protocol below (tested elsewhere)
        want_hits = []
        for it in items:
            x = augment.resize_shorter(it["image"], s).astype(np.float32) - mean
            logits = np.asarray(m.apply(v, x[None]))[0]
            want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            bucket = bucket_shape(*x.shape[:2], s)
            padded += bucket != x.shape[:2]
            np.testing.assert_allclose(scorer.score_full(x, bucket), want, rtol=1e-4, atol=1e-6)
            want_hits.append(int(np.argmax(want)) == it["label"])
        assert got[s].top1_hits == tuple(want_hits) and got[s].indices == tuple(range(len(items)))
        assert got[s].top1_err == pytest.approx(100 * (1 - np.mean(want_hits)))
    assert padded >= 3  # most views are padded into their bucket: the mask matters
    # At the protocols' own side it is the 1-full protocol, image by image.
    full = evaluate(m, v, InMemorySource(items), protocols=("1full",), cfg=cfg, progress=False)
    assert full["1full"].top1_hits == got[cfg.resize_side].top1_hits
    with pytest.raises(ValueError, match="SPP"):
        full_view_by_side(spp_jax.get_model("zf5", spp=False, width=0.05, fc_dim=8, num_classes=3),
                          v, InMemorySource(items), (224,), progress=False)


def test_no_spp_model_skips_map_protocols():
    m = spp_jax.get_model("zf5", spp=False, width=0.05, fc_dim=8, num_classes=3)
    v = init_params(m, jax.random.key(0), 224)
    items = [{"image": np.full((230, 260, 3), 100, np.uint8), "label": 1}]
    res = evaluate(m, v, InMemorySource(items), protocols=("1crop", "1full"), progress=False)
    assert list(res) == ["1crop"]
