"""seedstats: mean ± std over seeds and the t-test verdicts, against hand cases and scipy."""
import math

import numpy as np
import pytest
from scipy import stats

from spp_jax import seedstats as S


def test_t_table_matches_scipy():
    for df in range(1, 40):
        assert S.t_critical(df) == pytest.approx(stats.t.ppf(0.975, df) if df <= 30 else 1.96, abs=6e-4)
    assert S.t_critical(2.9) == S.t_critical(2)  # rounded down: conservative
    with pytest.raises(ValueError):
        S.t_critical(0.5)


def test_seed_stats_cell():
    s = S.seed_stats([10.0, 12.0, 14.0])
    assert (s.mean, s.std, s.n) == (12.0, 2.0, 3)  # sample std, ddof 1, by hand
    assert s.cell() == "12.0 ± 2.0"
    assert S.seed_stats([7.25]).cell(2) == "7.25"
    with pytest.raises(ValueError):
        S.seed_stats([1.0, math.nan])
    with pytest.raises(ValueError):
        S.seed_stats([])


def test_unpaired_hand_case():
    # means 11 and 6, stds 1 and 1: SE = sqrt(1/3 + 1/3), Welch df = 4, t = 2.776.
    v = S.compare("c", ("A", [10, 11, 12]), ("B", [5, 6, 7]), paired=False)
    assert v.diff == pytest.approx(5.0)
    assert v.se == pytest.approx(math.sqrt(2 / 3))
    assert v.bar == pytest.approx(2.776 * math.sqrt(2 / 3))
    assert v.outcome == S.HOLDS and v.seed_std == pytest.approx(1.0)
    back = S.compare("c", ("B", [5, 6, 7]), ("A", [10, 11, 12]), paired=False)
    assert back.outcome == S.REVERSED and back.diff == pytest.approx(-5.0)


def test_paired_uses_per_seed_differences():
    # Seeds move both cells together: unpaired the 1-point gap drowns in the 5-point seed
    # spread, paired (differences 1, 1.2, 0.8 -> SE 0.115, df 2, bar 0.497) it holds.
    worse, better = [20.0, 25.2, 29.8], [19.0, 24.0, 29.0]
    assert S.compare("c", ("w", worse), ("b", better), paired=False).outcome == S.NOISE
    v = S.compare("c", ("w", worse), ("b", better), paired=True)
    assert v.se == pytest.approx(np.std([1.0, 1.2, 0.8], ddof=1) / math.sqrt(3))
    assert v.outcome == S.HOLDS


@pytest.mark.parametrize("seed", range(20))
def test_outcome_agrees_with_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    a = rng.normal(20, 2, n)
    b = a - rng.normal(rng.uniform(-3, 3), 1.5, n)  # correlated, so pairing matters
    for paired in (True, False):
        v = S.compare("c", ("a", a), ("b", b), paired=paired)
        if paired:
            t, df = stats.ttest_rel(a, b).statistic, n - 1
        else:
            r = stats.ttest_ind(a, b, equal_var=False)
            t, df = r.statistic, math.floor(r.df)
        assert v.diff / v.se == pytest.approx(t, rel=1e-9)
        crit = stats.t.ppf(0.975, df)
        if abs(abs(t) - crit) > 1e-3:  # away from the boundary, where rounding could differ
            want = S.HOLDS if t > crit else S.REVERSED if t < -crit else S.NOISE
            assert v.outcome == want


def test_one_seed_is_untested():
    v = S.compare("c", ("w", [20.0]), ("b", [18.0]), paired=False)
    assert v.outcome == S.UNTESTED and v.diff == 2.0
    assert "untested" in v.sentence()
    with pytest.raises(ValueError):
        S.compare("c", ("w", [1, 2, 3]), ("b", [1, 2]), paired=True)


def test_cells_keep_their_seeds_for_pairing():
    a = S.by_seed({2: 57.4, 0: 39.4, 1: 29.4})
    assert a.values == (39.4, 29.4, 57.4) and a.seeds == (0, 1, 2)
    b = S.by_seed({1: 33.0, 0: 43.4})  # seed 2 not finished
    assert S.on_shared_seeds(a, b) == ([39.4, 29.4], [43.4, 33.0])
    with pytest.raises(ValueError, match="seed of every value"):
        S.on_shared_seeds(a, S.seed_stats([1.0, 2.0]))
    with pytest.raises(ValueError, match="2 seeds for 3 values"):
        S.seed_stats([1.0, 2.0, 3.0], seeds=(0, 1))


def test_sentence_says_better_or_worse():
    worse = S.compare("multi beats single", ("single", [39.4, 29.4, 57.4]), ("multi", [43.4, 33.0, 64.2]),
                      paired=True)
    assert worse.outcome == S.REVERSED and "multi is 4.80 points worse than single" in worse.sentence()
    better = S.compare("b beats a", ("a", [3.0, 4.0]), ("b", [1.0, 1.5]), paired=True)
    assert "b is 2.25 points better than a" in better.sentence()


def test_identical_differences_are_floored_at_the_measurement_step():
    # Two seeds, multi-view on 100 images: both seeds 3.0 points apart. The sample spread is
    # 0, but errors move in 1-point steps: the floor is two roundings, variance 2 * 1/12 per
    # difference, SE sqrt(2/12 / 2) = 0.2887, bar 12.706 * 0.2887 = 3.668 (hand computed).
    v = S.compare("c", ("ten", [9.0, 10.0]), ("mv", [6.0, 7.0]), paired=True, images=100)
    assert v.se == pytest.approx(0.288675, rel=1e-5) and v.bar == pytest.approx(3.6679, rel=1e-4)
    assert v.outcome == S.NOISE
    assert S.compare("c", ("ten", [10.0, 11.0]), ("mv", [6.0, 7.0]), paired=True, images=100).outcome == S.HOLDS
    assert S.compare("c", ("ten", [9.0, 10.0]), ("mv", [6.0, 7.0]), paired=True).se == 0.0  # no floor
    # A spread above the floor is left alone.
    wide = S.compare("c", ("a", [9.0, 14.0]), ("b", [6.0, 7.0]), paired=True, images=100)
    assert wide.se == pytest.approx(np.std([3.0, 7.0], ddof=1) / np.sqrt(2))
    # Unpaired: each cell's variance is at least one rounding, step^2 / 12 (step 0.2 here).
    u = S.compare("c", ("a", [5.0, 5.0, 5.0]), ("b", [4.0, 4.0, 4.0]), paired=False, images=500)
    assert u.se == pytest.approx(np.sqrt(2 * 0.2 ** 2 / 12 / 3))
    # Values that are differences of two errors (terms=2) carry two roundings each: a paired
    # difference of them four, SE sqrt(4/12 / 2) = 0.4082 at 100 images (hand computed).
    g = S.compare("c", ("a", [3.0, 4.0]), ("b", [1.0, 2.0]), paired=True, images=100, terms=2)
    assert g.se == pytest.approx(np.sqrt(4 / 12 / 2)) and g.bar == pytest.approx(12.706 * 0.408248, rel=1e-5)
