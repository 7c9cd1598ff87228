"""The Table 9 / Table 12 experiment end to end on tiny data (tiny random ZF-5, 160-px images)."""
import json
import os

import numpy as np
import pytest

from experiments import voc_det_tables as T
from spp_jax.detection.finetune import FinetuneConfig
from spp_jax.detection.proposals import ProposalSettings, compute_proposals
from spp_jax.detection.rcnn import RCNNExtractor
from test_det_common import tiny_extractor, tiny_model, tiny_records


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("table9"))
    m, v = tiny_model()
    head0 = v["params"]["classifier"]
    tr, te = tiny_records("trainval", 4), tiny_records("test", 2)
    s = ProposalSettings(max_side=160, min_side=8, max_boxes=60)
    ptr = compute_proposals(tr, root, settings=s, workers=0, progress=False)
    pte = compute_proposals(te, root, settings=s, workers=0, progress=False)
    cols = [T.Column(T.COL_SPP1, tiny_extractor(), head0, tr, te),
            T.Column(T.COL_RCNN, RCNNExtractor(tiny_extractor().server, batch=8), head0, tr, te)]
    cfg = T.Table9Config(finetune=FinetuneConfig(iters=(3, 2), eval_every=2, lrs=(1e-3, 1e-4)),
                         flip_finetune=True, timing_images=1)
    names = [str(k) for k in range(10)]
    res, comb = T.run_table9(cols, ptr, pte, 10, os.path.join(root, "cache"), cfg, names,
                             combos=[(T.COL_SPP1, T.COL_RCNN), (T.COL_SPP1, "absent")],
                             proposal_seconds=0.5)
    md, js = T.write_tables(root, "tiny", res, comb, names, {"total_seconds": 1.0})
    return res, comb, md, js


def test_every_cell_and_timing_row_is_filled(table):
    res, comb, md, js = table
    data = json.load(open(js))
    assert data["columns"] == [T.COL_SPP1, T.COL_RCNN]
    for r in T.ROWS:
        for c in data["columns"]:
            assert 0 <= data["cells"][f"{r}|{c}"] <= 100
    t = data["timing"]
    for c in data["columns"]:
        total = t[f"{T.T_CONV}|{c}"] + t.get(f"{T.T_POOL}|{c}", 0.0) + t[f"{T.T_FC}|{c}"]
        assert t[f"{T.T_TOTAL}|{c}"] == pytest.approx(total)
        assert t[f"{T.T_PROPOSALS}|{c}"] == 0.5 and t[f"{T.T_FT}|{c}"] > 0
        # speed-up = R-CNN total / this column's total (1 for R-CNN itself)
        assert t[f"{T.T_SPEEDUP}|{c}"] == pytest.approx(t[f"{T.T_TOTAL}|{T.COL_RCNN}"] / t[f"{T.T_TOTAL}|{c}"])
    text = open(md).read()
    assert "| ftfc7 bb |" in text and "Table 12" in text and T.T_SPEEDUP in text


def test_combination_is_reported_and_only_for_present_columns(table):
    res, comb, md, js = table
    assert list(comb) == [f"{T.COL_SPP1} + {T.COL_RCNN}"]  # the absent column is skipped
    c = comb[f"{T.COL_SPP1} + {T.COL_RCNN}"]
    assert 0 <= c.mAP <= 1 and len(c.aps) == 10
    for b, s, _ in c.detections.values():
        assert len(b) <= 100 and np.all(np.diff(s) <= 0)  # best first, capped per image


def test_flipped_training_features_are_cached(table):
    res, _, _, _ = table
    spp = res[0]
    assert spp.finetune.best_iter >= 1
    tr_dir = os.path.dirname(spp.test_cache.dir)
    flipped = [f for d in os.listdir(tr_dir) if os.path.isdir(os.path.join(tr_dir, d))
               for f in os.listdir(os.path.join(tr_dir, d)) if f.endswith("__flip.npz")]
    assert len(flipped) == 2 * 4  # 4 trainval images, flipped, for both columns


def test_drawing_shows_only_confident_detections(tmp_path):
    from spp_jax.detection.draw import draw_detections
    recs = tiny_records("test", 1)
    iid = recs[0]["image_id"]
    box = np.array([[10, 10, 80, 60]], np.float32)

    def png(score):
        dets = {} if score is None else {iid: (box, np.array([score]), np.array([2]))}
        path = draw_detections(recs, dets, str(tmp_path / f"{score}.png"), [str(k) for k in range(10)], n=1)
        return open(path, "rb").read()

    none, weak, strong = png(None), png(-0.5), png(1.5)
    assert none[:8] == b"\x89PNG\r\n\x1a\n"
    assert weak == none and strong != none  # below the SVM boundary: not drawn


def test_detection_backbone_is_pretrained_single_size_by_default():
    # The paper's detection backbone is "ZF-5 (single-size trained)" (Section 4).
    from spp_jax.detection.config import VocDetConfig, pretrain_config
    single = pretrain_config(VocDetConfig())
    assert (single.model, single.size_schedule, single.sizes, single.num_epochs) == ("zf5", "single", (224,), 16)
    multi = pretrain_config(VocDetConfig(pretrain_multisize=True))
    assert (multi.size_schedule, multi.sizes) == ("multi", (180, 224))


def test_a_missing_backbone_is_a_one_line_error(tmp_path):
    from experiments.voc_det import main
    with pytest.raises(SystemExit, match=r"^error: pretrained network '/nonexistent.msgpack' does not exist"):
        main(["checkpoint=/nonexistent.msgpack", "--preset", "quick", "--workdir", str(tmp_path)])


def test_conv_fine_tuned_column_runs_next_to_the_others_and_is_reused(tmp_path):
    from spp_jax.detection.finetune_conv import ConvFinetuneConfig
    root = str(tmp_path)
    m, v = tiny_model()
    head0 = v["params"]["classifier"]
    tr, te = tiny_records("trainval", 3), tiny_records("test", 2)
    s = ProposalSettings(max_side=160, min_side=8, max_boxes=60)
    ptr = compute_proposals(tr, root, settings=s, workers=0, progress=False)
    pte = compute_proposals(te, root, settings=s, workers=0, progress=False)
    conv = ConvFinetuneConfig(from_layer="conv5", iters=(2, 1), windows_per_image=16, log_every=1)
    cols = [T.Column(T.COL_SPP1, tiny_extractor(), head0, tr, te),
            T.Column(T.COL_SPP1_CONV, tiny_extractor(), head0, tr, te, conv_finetune=conv)]
    cfg = T.Table9Config(finetune=FinetuneConfig(iters=(2, 1), eval_every=2, lrs=(1e-3, 1e-4)), timing_images=1)
    names = [str(k) for k in range(10)]
    cache = os.path.join(root, "cache")
    res, _ = T.run_table9(cols, ptr, pte, 10, cache, cfg, names)
    spp, ft = res
    assert set(ft.results) == {"pool5", "ftfc6", "ftfc7", "ftfc7 bb"}  # no pretrained fc6 row
    assert ft.finetune.params["fc8"]["kernel"].shape[1] == 11
    assert ft.timing[T.T_FT_ITER] > 0 and ft.timing[T.T_FT] > 0 and ft.timing[T.T_TOTAL] > 0
    assert ft.test_cache.dir != spp.test_cache.dir  # the fine-tuned network's own features
    _, js = T.write_tables(root, "tiny", res, {}, names, {"total_seconds": 1.0})
    assert json.load(open(js))["cells"].get(f"fc6|{T.COL_SPP1_CONV}") is None
    # A rerun in the same workdir reuses the stored network (no training: the same seconds),
    # hence its feature caches, and leaves the other column's caches alone.
    before = sorted(os.listdir(cache))
    ex, again = T.conv_finetuned(cols[1], ptr, 11, cache, cfg.proposals_key)
    assert again.seconds == ft.finetune.seconds and sorted(os.listdir(cache)) == before
    from spp_jax.detection.cache import FeatureCache
    key = {**ex.key(), **cfg.proposals_key, "split": te.split, "n": len(te), "gt": False}
    assert FeatureCache(cache, key).dir == ft.test_cache.dir  # the first run's test features
    assert ex.server.fingerprint != tiny_extractor().server.fingerprint
