import numpy as np
import pytest

from spp_jax.detection import detector as D
from spp_jax.detection.cache import CachedImage, FeatureCache, cache_features
from spp_jax.detection.finetune import FinetuneConfig, finetune
from spp_jax.detection.proposals import ProposalSettings, compute_proposals
from spp_jax.report import markdown_table
from reference import iou_voc
from test_det_common import tiny_extractor, tiny_model, tiny_records


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("det"))
    ex = tiny_extractor()
    s = ProposalSettings(max_side=160, min_side=8, max_boxes=150)
    tr, te = tiny_records("trainval", 4), tiny_records("test", 2)
    ptr = compute_proposals(tr, root, settings=s, workers=0, progress=False)
    pte = compute_proposals(te, root, settings=s, workers=0, progress=False)
    ctr = cache_features(tr, ptr, ex, FeatureCache(root, {"s": "tr"}), progress=False)
    cte = cache_features(te, pte, ex, FeatureCache(root, {"s": "te"}), include_gt=False, progress=False)
    return ctr, cte


def test_end_to_end_smoke(caches):
    ctr, cte = caches
    m, v = tiny_model()
    head0 = v["params"]["classifier"]
    cells = {}
    for layer in ("pool5", "fc7"):
        det = D.train_detector(ctr, layer, 10, head=head0 if layer != "pool5" else None)
        res = D.test_detector(det, cte)
        assert np.isfinite(res.mAP) and 0 <= res.mAP <= 1
        assert all(len(b) <= 100 for b, _, _ in res.detections.values())
        cells[(layer, "SPP 1-scale")] = 100 * res.mAP
    ft = finetune(ctr, head0, 11, FinetuneConfig(iters=(4, 2), eval_every=3, lrs=(1e-3, 1e-4)))
    det = D.train_detector(ctr, "ftfc7", 10, head=ft.params, bbox_reg=True)
    res_bb = D.test_detector(det, cte, use_bbox_reg=True)
    res_plain = D.test_detector(det, cte)
    assert np.isfinite(res_bb.mAP)
    assert det.bbox is not None and det.bbox.trained.any()
    moved = [not np.allclose(res_bb.detections[i][0], res_plain.detections[i][0]) for i in cte.ids]
    assert any(moved)  # regression moves the kept boxes (same scores and order)
    for b, _, _ in res_bb.detections.values():  # clipped to the 160 x 240 image
        assert (b >= 0).all() and (b[:, 2] <= 239).all() and (b[:, 3] <= 159).all()
    cells[("ftfc7 bb", "SPP 1-scale")] = 100 * res_bb.mAP
    table = markdown_table(["pool5", "fc7", "ftfc7 bb"], ["SPP 1-scale"], cells)
    assert table.count("\n") == 4 and "ftfc7 bb" in table


def test_bad_inputs(caches, tmp_path):
    ctr, cte = caches
    empty = FeatureCache(str(tmp_path), {"empty": 1})
    with pytest.raises(ValueError, match="empty"):
        D.train_detector(empty, "pool5", 10)
    with pytest.raises(ValueError, match="head"):
        D.train_detector(ctr, "fc7", 10)
    det = D.train_detector(ctr, "pool5", 10)
    with pytest.raises(ValueError, match="box regressors"):
        D.test_detector(det, cte, use_bbox_reg=True)


def test_negative_dedup_hand_case():
    # Windows 0 and 1 overlap with IoU 100/110 = 0.91 > 0.7; window 2 is far away; window 3
    # sits on the class-1 ground truth, so it is no negative of class 1 and cannot suppress.
    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 10], [50, 50, 59, 59], [100, 100, 119, 119]], np.float32)
    gt = np.array([[100, 100, 119, 119]], np.float32)
    lab = D._negative_labels(boxes, gt, np.array([1]), np.array([False]), 3, 0.3, dedup_iou=0.7)
    np.testing.assert_array_equal(lab, [[-1, 0, -1, -1], [-1, 0, -1, 0], [-1, 0, -1, -1]])
    no = D._negative_labels(boxes, gt, np.array([1]), np.array([False]), 3, 0.3, dedup_iou=1.0)
    np.testing.assert_array_equal(no, [[-1, -1, -1, -1], [-1, -1, -1, 0], [-1, -1, -1, -1]])


def test_negative_dedup_matches_brute_force():
    rng = np.random.default_rng(3)
    xy = rng.integers(0, 60, (80, 2))
    wh = rng.integers(4, 30, (80, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    gt = boxes[[5, 40]]
    gl = np.array([0, 2])
    lab = D._negative_labels(boxes, gt, gl, np.zeros(2, bool), 4, 0.3, dedup_iou=0.7)
    for c in range(4):
        kept = []
        for i, b in enumerate(boxes):
            if any(iou_voc(b, g) >= 0.3 for g, l in zip(gt, gl) if l == c):
                continue
            if all(iou_voc(b, boxes[j]) <= 0.7 for j in kept):
                kept.append(i)
        np.testing.assert_array_equal(np.flatnonzero(lab[c] == -1), kept)
    assert (lab == -1).sum() < 4 * len(boxes) - 2  # the rule did drop something


def _toy_detector(w, bbox_dx=None):
    from spp_jax.detection.bbox_reg import BBoxRegressor
    bb = None
    if bbox_dx is not None:
        bb = BBoxRegressor(np.zeros((1, 2, 4), np.float32), np.array([[bbox_dx, 0, 0, 0]], np.float32),
                           1.0, np.array([True]))
    return D.Detector("pool5", 1, np.array([w], np.float32), np.zeros(1, np.float32), 1.0, None, bb,
                      D.DetectorConfig(), {})


def test_combination_nms_over_the_union_hand_case():
    # Windows 0 and 1 overlap (IoU 81/119 = 0.68 > 0.3); window 2 is apart. Model A scores
    # (3, 0, 1), model B (0, 5, 1). On the union, B's window 1 (5) suppresses A's window 0 (3);
    # window 2 ties at 1 and A's copy (visited first) suppresses B's.
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [50, 50, 59, 59]], np.float32)
    entry = CachedImage(boxes, 0, np.array([[3, 0], [0, 5], [1, 1]], np.float32), np.zeros(3, np.int64),
                        np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool), np.array([100, 100]))
    a, b = _toy_detector([1, 0], bbox_dx=0.5), _toy_detector([0, 1], bbox_dx=0.0)
    (bx, sc, lab), _ = D.combine_image([a, b], [entry, entry])
    np.testing.assert_array_equal(bx, boxes[[1, 2]])
    np.testing.assert_allclose(sc, [5, 1])
    np.testing.assert_array_equal(lab, [0, 0])
    (alone, sa, _), _ = D.combine_image([a], [entry])  # A alone keeps its window 0
    np.testing.assert_array_equal(alone, boxes[[0, 2]])
    np.testing.assert_allclose(sa, [3, 1])
    # Box regression by the owner: B (dx 0) leaves window 1; A (dx 0.5 of the 10-px width)
    # moves window 2 right by 5 px.
    (rb, _, _), _ = D.combine_image([a, b], [entry, entry], use_bbox_reg=True)
    np.testing.assert_allclose(rb, [[1, 1, 10, 10], [55, 50, 64, 59]], atol=1e-4)


def test_combining_a_detector_with_itself_changes_nothing(caches):
    ctr, cte = caches
    det = D.train_detector(ctr, "pool5", 10)
    one = D.test_detector(det, cte)
    two = D.test_combined([det, det], [cte, cte])
    assert two.mAP == one.mAP
    for i in cte.ids:
        for x, y in zip(one.detections[i], two.detections[i]):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="lacks"):
        D.test_combined([det, det], [cte, ctr])  # the trainval cache has other images


def _select_reference(boxes, scores, pre_nms, nms_iou, max_per_image):
    """Per class: the pre_nms best windows, greedy NMS (NumPy reference); then the best overall."""
    from spp_jax.detection.nms import nms_numpy
    out_s, out_l, out_r = [], [], []
    for k in range(scores.shape[1]):
        cand = np.argsort(-scores[:, k], kind="stable")[:pre_nms]
        keep = cand[nms_numpy(boxes[cand], scores[cand, k], nms_iou)]
        out_s.append(scores[keep, k])
        out_l.append(np.full(len(keep), k))
        out_r.append(keep)
    s, lab, r = (np.concatenate(v) for v in (out_s, out_l, out_r))
    top = np.argsort(-s, kind="stable")[:max_per_image]
    return r[top], s[top], lab[top]


@pytest.mark.parametrize("r", [1, 97, 300])
def test_jit_selection_matches_numpy_reference(r):
    rng = np.random.default_rng(r)
    xy = rng.integers(0, 80, (r, 2))
    boxes = np.concatenate([xy, xy + rng.integers(3, 40, (r, 2))], 1).astype(np.float32)
    boxes[r // 2:r // 2 + r // 10] = boxes[:r // 10]  # duplicate windows
    scores = np.round(rng.normal(size=(r, 4)), 1).astype(np.float32)  # many ties
    cfg = D.DetectorConfig(pre_nms=60, max_per_image=25)
    got = D.select_detections(boxes, scores, cfg)
    want = _select_reference(boxes, scores, 60, 0.3, 25)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
