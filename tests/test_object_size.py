"""Error by object size: tercile bins, per-bin errors from per-image hits, verdicts, report."""
import json

import numpy as np
import pytest

from spp_jax import seedstats
from spp_jax.data import shapes
from spp_jax.train import claims, grid, object_size
from spp_jax.train.object_size import SizeBins


def test_main_object_scales_from_the_rendered_pixels():
    # Reference: the main object's pixels in the instance mask (object 0), not its box.
    got = shapes.main_object_scales("classification", "validation", 12, seed=2)
    for i, g in enumerate(got):
        ex = shapes.generate("classification", "validation", i, seed=2, return_mask=True)
        ys, xs = np.nonzero(ex["mask"] == 0)
        want = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / min(ex["mask"].shape)
        assert g == pytest.approx(want)


def test_tercile_bins_and_labels():
    bins = SizeBins.terciles(np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.6, 0.4, 0.7]))
    assert bins.bin_of == (2, 0, 1, 0, 2, 0, 1, 1, 2)  # three images per bin
    assert bins.edges[0] == pytest.approx(0.1) and bins.edges[-1] == pytest.approx(0.9)
    assert bins.label(0, 100) == f"small (box 10-{bins.edges[1] * 100:.0f} px at 100)"


def _result(run, hits_1crop):
    hits = {"1crop": {i: (bool(h), True) for i, h in enumerate(hits_1crop)}}
    err = 100 * (1 - np.mean(hits_1crop))
    return grid.RunResult(run, {"1crop": (err, 0.0)}, 1.0, True, hits)


def test_per_bin_errors_over_seeds_and_verdicts(tmp_path):
    runs = {(r.variant.key, r.seed): r for r in grid.plan(
        "embedded", ["epochs=1"], str(tmp_path), models=("zf5",), seeds=(0, 1, 2), data_seed=0)}
    bins = SizeBins((0, 0, 1, 1, 2, 2), (0.0, 0.3, 0.6, 1.0))
    # Per seed, 6 images (2 per bin).  Single-size misses every small object; multi-size
    # misses none; both hit all medium ones and miss one large one in seeds 0 and 1.
    single = {0: [0, 0, 1, 1, 1, 0], 1: [0, 0, 1, 1, 0, 1], 2: [0, 0, 1, 1, 1, 1]}
    multi = {0: [1, 1, 1, 1, 1, 0], 1: [1, 1, 1, 1, 0, 1], 2: [1, 1, 1, 1, 1, 1]}
    results = [_result(runs[("single", s)], h) for s, h in single.items()]
    results += [_result(runs[("multi", s)], h) for s, h in multi.items()]
    cells = object_size.size_cells(results, bins)
    assert cells[("zf5", "single", "1crop", 0)].values == (100.0, 100.0, 100.0)
    assert cells[("zf5", "multi", "1crop", 0)].values == (0.0, 0.0, 0.0)
    assert cells[("zf5", "single", "1crop", 2)].values == (50.0, 50.0, 0.0)
    # The bins partition the images: their mean error (equal bins) is the run's error.
    for r in results:
        per_bin = [cells[("zf5", r.run.variant.key, "1crop", k)].values[r.run.seed] for k in range(3)]
        assert np.mean(per_bin) == pytest.approx(r.errors["1crop"][0])
    found = {v.claim: v for v in object_size.size_verdicts(cells, bins)}
    small = found["zf5, 1 crop, small objects: multi-size training beats single-size"]
    assert small.diff == pytest.approx(100.0) and small.outcome == seedstats.HOLDS
    large = found["zf5, 1 crop, large objects: multi-size training beats single-size"]
    assert large.diff == pytest.approx(0.0) and large.outcome == seedstats.NOISE
    md = claims.write_claims(str(tmp_path), results, "t", make_plot=False, size_bins=bins)
    assert "| 1 crop, small (box 0-77 px at 256) | 100.0 ± 0.0 | 0.0 ± 0.0 |" in md
    data = json.loads((tmp_path / "claims.json").read_text())
    assert len(data["object_size"]["cells"]) == 6 and len(data["object_size"]["verdicts"]) == 3


def test_one_variant_grid_has_no_empty_verdicts_paragraph(tmp_path):
    # A one-variant grid (a controlled probe's "variants=multi") has per-size errors but
    # nothing to compare them with: the report shows the table and no "Verdicts" line.
    runs = {(r.variant.key, r.seed): r for r in grid.plan(
        "embedded", ["epochs=1"], str(tmp_path), models=("zf5",), seeds=(0, 1), data_seed=0)}
    bins = SizeBins((0, 0, 1, 1, 2, 2), (0.0, 0.3, 0.6, 1.0))
    multi = [_result(runs[("multi", s)], h) for s, h in {0: [1, 0, 1, 1, 1, 0],
                                                         1: [1, 1, 0, 1, 0, 1]}.items()]
    md = claims.write_claims(str(tmp_path), multi, "t", make_plot=False, size_bins=bins)
    section = md.split("## Top-1 error (%) by the main object's size")[1].split("## Runs")[0]
    assert "| 1 crop, small (box 0-77 px at 256) |" in section
    assert "Verdicts" not in section
    both = multi + [_result(runs[("single", s)], [0, 0, 1, 1, 1, 1]) for s in (0, 1)]
    md = claims.write_claims(str(tmp_path), both, "t", make_plot=False, size_bins=bins)
    assert "Verdicts (top-1 error; two-sided t-test at 5 %):\n\n- zf5, 1 crop, small" in md
