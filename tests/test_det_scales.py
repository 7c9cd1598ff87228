import numpy as np
import pytest

from spp_jax.detection.scales import (SCALES_5, SCALES_5_RELEASED, choose_scales, round_half_away,
                                      scales_by_name)


def test_round_half_away():
    np.testing.assert_array_equal(round_half_away([0.5, 1.5, 2.5, -2.5, 2.4]), [1, 2, 3, -3, 2])


def test_area_rule_hand_computed():
    hw = (375, 500)  # min side 375
    # 224 x 224 window: scaled sides 286.7 (480) ... -> the smallest scale is closest.
    # 100 x 100 window: scaled sides 128, 153.6, 183.5, 230.4, 320 -> 230.4 (864) is closest to 224.
    boxes = np.array([[0, 0, 223, 223], [10, 10, 109, 109]], np.float32)
    np.testing.assert_array_equal(choose_scales(boxes, hw, SCALES_5, "area"), [0, 3])
    # One scale: always index 0.
    np.testing.assert_array_equal(choose_scales(boxes, hw, (688,), "area"), [0, 0])


def test_released_rule_hand_computed():
    hw = (375, 500)
    box = np.array([[10, 10, 109, 109]], np.float32)  # expected = round(208 * 375 / 100) = 780
    assert choose_scales(box, hw, SCALES_5, "released")[0] == 3  # |864 - 780| = 84 < |688 - 780| = 92
    assert choose_scales(box, hw, SCALES_5_RELEASED, "released")[0] == 2  # |874 - 780| = 94 > 92


def test_released_rule_rounds_half_away_from_zero():
    # 208 * 1057 / 416 = 528.5 exactly: MATLAB round -> 529 -> 576 wins (47 < 49);
    # round-half-even would give 528, a tie, and the first scale (480).
    box = np.array([[0, 0, 415, 415]], np.float32)
    assert choose_scales(box, (1057, 2000), (480, 576), "released")[0] == 1
    # An exact tie goes to the first listed scale (MATLAB min): expected 528 between 480 and 576.
    box2 = np.array([[0, 0, 207, 207]], np.float32)  # 208 * 528 / 208 = 528
    assert choose_scales(box2, (528, 600), (480, 576), "released")[0] == 0


def test_bad_inputs():
    with pytest.raises(ValueError):
        choose_scales(np.zeros((1, 4)), (10, 10), SCALES_5, "nope")
    with pytest.raises(ValueError):
        scales_by_name(3)
    assert scales_by_name(5, use_874=True) == SCALES_5_RELEASED
