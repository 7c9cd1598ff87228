import logging

import numpy as np
import pytest

from spp_jax.detection.records import (load_records, log_empty, tfds_bbox_to_pixels, tfds_voc_to_record,
                                       VOC_CLASSES)


def test_shapes_records():
    src = load_records("shapes", "trainval", size=2)
    assert len(src) == 2 and len(src.classes) == 10
    r = src[1]
    assert r["image"].dtype == np.uint8 and r["image"].ndim == 3
    assert r["boxes"].dtype == np.float32 and r["boxes"].shape[1] == 4
    h, w = r["image"].shape[:2]
    assert (r["boxes"][:, 2] < w).all() and (r["boxes"][:, 3] < h).all()
    assert len(r["labels"]) == len(r["difficult"]) == len(r["boxes"])
    with pytest.raises(ValueError):
        load_records("shapes", "trainval")  # size required
    with pytest.raises(ValueError):
        load_records("coco", "trainval", size=1)


def test_tfds_bbox_conversion_hand_made():
    # VOC XML box (1-based inclusive) xmin=48 ymin=240 xmax=195 ymax=371 in a 500 x 375 image;
    # TFDS stores [ymin/H, xmin/W, ymax/H, xmax/W] (float32).
    norm = np.array([[240 / 375, 48 / 500, 371 / 375, 195 / 500]], np.float32)
    np.testing.assert_array_equal(tfds_bbox_to_pixels(norm, 375, 500), [[47, 239, 194, 370]])
    # Full-image box: [1, 1, W, H] -> [0, 0, W-1, H-1].
    np.testing.assert_array_equal(tfds_bbox_to_pixels([[1 / 375, 1 / 500, 1.0, 1.0]], 375, 500),
                                  [[0, 0, 499, 374]])


def test_tfds_example_without_objects(caplog):
    ex = {"image": np.zeros((20, 30, 3), np.uint8), "image/filename": b"000001.jpg",
          "objects": {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros(0, np.int64),
                      "is_difficult": np.zeros(0, bool)}}
    r = tfds_voc_to_record(ex, "x")
    assert r["image_id"] == "000001.jpg" and r["boxes"].shape == (0, 4) and r["labels"].shape == (0,)
    with caplog.at_level(logging.INFO):
        log_empty(r, "negatives only")
    assert "no objects" in caplog.text


def test_tfds_voc_mock_data_without_tensorflow():
    """tfds.testing.mock_data works without TF for data_source: random examples whose object
    fields even have inconsistent lengths; the records must still be valid."""
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        src = load_records("voc2007", "test")
        assert src.classes == VOC_CLASSES and len(src) == 2
        r = src[0]
    h, w = r["image"].shape[:2]
    b = r["boxes"]
    assert b.dtype == np.float32 and len(b) == len(r["labels"]) == len(r["difficult"])
    assert (b[:, 0::2] >= 0).all() and (b[:, 0::2] <= w - 1).all()
    assert (b[:, 1::2] >= 0).all() and (b[:, 1::2] <= h - 1).all()
