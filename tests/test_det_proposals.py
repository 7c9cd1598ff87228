import os

import numpy as np
import pytest

from spp_jax.detection.proposals import (ProposalSettings, cache_path, clean_boxes, compute_proposals,
                                         load_proposal_file, save_proposal_file, selective_search)
from spp_jax.errors import InputError
from test_det_common import tiny_records

FAST = ProposalSettings(max_side=160, min_side=6, max_boxes=300)


def check_boxes(b, hw, s=FAST):
    h, w = hw
    assert b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4 and 0 < len(b) <= s.max_boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w - 1).all() and (b[:, 3] <= h - 1).all()
    assert (b[:, 2] - b[:, 0] + 1 >= s.min_side).all() and (b[:, 3] - b[:, 1] + 1 >= s.min_side).all()
    assert len(np.unique(b, axis=0)) == len(b)


def test_selective_search_one_image():
    rec = tiny_records("trainval", 1)[0]
    b = selective_search(rec["image"], FAST)
    check_boxes(b, rec["image"].shape[:2])
    # downscaling path: boxes are mapped back into the original image
    b2 = selective_search(rec["image"], ProposalSettings(max_side=120, min_side=6, max_boxes=300))
    check_boxes(b2, rec["image"].shape[:2])
    assert b2[:, 2].max() > 150  # reaches beyond the 120 px downscaled frame


def test_clean_boxes():
    b = np.array([[-5, 0, 20, 20], [0, 0, 20, 20], [3, 3, 4, 4], [0, 0, 50, 50]], np.float32)
    out = clean_boxes(b, (30, 40), min_side=8, max_boxes=10)
    np.testing.assert_array_equal(out, [[0, 0, 20, 20], [0, 0, 39, 29]])


def test_cache_and_half_written_rebuild(tmp_path, caplog):
    recs = tiny_records("trainval", 2)
    stats = {}
    a = compute_proposals(recs, str(tmp_path), settings=FAST, workers=0, progress=False, stats=stats)
    assert stats["cached"] is False and set(a) == {r["image_id"] for r in recs}
    spi = stats["seconds_per_image"]
    path = cache_path(str(tmp_path), recs.name, recs.split, FAST)
    assert os.path.exists(path) and os.path.exists(path + ".done")
    stats = {}
    b = compute_proposals(recs, str(tmp_path), settings=FAST, workers=0, progress=False, stats=stats)
    assert stats["cached"] is True and stats["seconds_per_image"] == spi > 0  # kept with the cache
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # Simulate a crash mid-write: truncated file, no marker -> rebuilt.
    os.remove(path + ".done")
    with open(path, "r+b") as f:
        f.truncate(100)
    stats = {}
    c = compute_proposals(recs, str(tmp_path), settings=FAST, workers=0, progress=False, stats=stats)
    assert stats["cached"] is False and "no completion marker" in caplog.text
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])
    # Marker present but file corrupt -> rebuilt too.
    with open(path, "wb") as f:
        f.write(b"garbage")
    stats = {}
    compute_proposals(recs, str(tmp_path), settings=FAST, workers=0, progress=False, stats=stats)
    assert stats["cached"] is False


def test_worker_pool_matches_in_process(tmp_path):
    recs = tiny_records("test", 2)
    a = compute_proposals(recs, None, settings=FAST, workers=0, progress=False)
    b = compute_proposals(recs, None, settings=FAST, workers=2, progress=False)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_user_file(tmp_path):
    p = str(tmp_path / "props.npz")
    save_proposal_file(p, {"img1.jpg": np.array([[0, 0, 9, 9]]), "b": np.zeros((0, 4))})
    out = load_proposal_file(p, ["img1.jpg", "b"])
    assert out["img1.jpg"].dtype == np.float32 and out["b"].shape == (0, 4)
    with pytest.raises(InputError, match="no proposals for 1 image.*'c'"):
        load_proposal_file(p, ["img1.jpg", "c"])
