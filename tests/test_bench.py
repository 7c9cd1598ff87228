"""The benchmark's pure pieces, without torch: config, result table, layouts, bin check.

The benchmarks themselves need torch/torchvision (``make bench`` uses .venv-bench);
the parts that need them are skipped when torch is missing.
"""
import json
import math

import numpy as np
import pytest

from bench import common
from bench.common import Config, Row, make_config, markdown, time_pair, write_results


def test_quick_config_is_smaller_but_same_benchmarks():
    full, quick = make_config(False), make_config(True)
    assert quick.quick and not full.quick and quick.mode == "quick" and full.mode == "full"
    assert quick.repeats < full.repeats and quick.batch <= full.batch
    assert quick.rcnn_windows <= full.rcnn_windows and not quick.flag_variants
    # The same problem sizes where the issue fixes them.
    assert quick.spp_shapes == full.spp_shapes == ((128, 13, 13, 256), (128, 10, 10, 256), (32, 18, 18, 512))
    assert quick.windows == full.windows == 2000 and quick.window_map == (42, 56, 256)
    assert quick.backbones == full.backbones == ("zf5", "overfeat7")
    assert make_config(True, "gpu").device == "gpu"


def test_row_goal_and_table(tmp_path):
    rows = [Row("1 SPP", "a fwd", 2.0, 6.0, "ms", 3.0, (">=", 1.5), "equal"),
            Row("1 SPP", "a bwd", 4.0, 4.0, "ms", 1.0, (">=", 1.5)),
            Row("6 compile", "8 programs", 1.0, 20.0, "s", 0.05, ("<=", 0.1), "a|b"),
            Row("2 window SPP", "memory", 12.5, 30.0, "MiB"),
            Row("3 backbone", "FAILED", note="boom")]
    assert [r.met for r in rows] == [True, False, True, None, None]
    md = markdown(rows)
    lines = md.splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)  # "|" in notes escaped
    assert "**no**" in lines[3] and "≥ 1.5" in lines[2] and "≤ 0.1" in lines[4]
    paths = write_results(rows, {"mode": "quick", "cpu": "test cpu", "cores": 2}, str(tmp_path), "t")
    data = json.loads(open(paths["json"]).read())
    assert data["meta"]["mode"] == "quick" and len(data["rows"]) == len(rows)
    assert data["rows"][0]["met"] is True and data["rows"][1]["met"] is False
    assert "# spp_jax benchmark (quick)" in open(paths["md"]).read()
    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_row_without_ratio_has_no_verdict():
    assert Row("x", "y", ratio=float("nan"), goal=(">=", 1.0)).met is None
    assert Row("x", "y", ratio=None, goal=(">=", 1.0)).met is None


def test_time_pair_interleaves():
    calls = []
    ta, tb = time_pair(lambda: calls.append("a"), lambda: calls.append("b"), warmup=1, repeats=3)
    per = 1 + common.BLOCK  # a sample: one untimed call, then BLOCK timed ones
    pairs = (len(calls) - 2) // (2 * per)  # after the warm-up pair
    assert calls == ["a", "b"] + (["a"] * per + ["b"] * per) * pairs
    assert pairs >= max(3, common.PAIRS.min_pairs)
    assert pairs <= 200  # the cap
    assert common.LAST_PAIRS["n"] == pairs
    assert ta >= 0 and tb >= 0 and not math.isnan(ta)


def test_ratio_stable_needs_a_narrow_median_interval():
    assert common.ratio_stable([1.0] * 5)
    assert not common.ratio_stable([1.0, 1.0])  # too few pairs
    spread = [0.5, 1.5] * 5  # IQR 1 around a median of 1: interval 1.58 / sqrt(10) = 50 %
    assert not common.ratio_stable(spread)
    assert common.ratio_stable(spread * 2000)  # the interval shrinks with sqrt(n)


def test_pair_spread_warns_when_wide_or_unstable(monkeypatch):
    monkeypatch.setattr(common, "LAST_PAIRS", dict(ratio=1.0, q1=0.9, q3=1.1, n=40, stable=True))
    assert common.pair_spread() == "40 pairs, ratio IQR 0.90-1.10"
    monkeypatch.setattr(common, "LAST_PAIRS", dict(ratio=1.0, q1=0.5, q3=2.0, n=9, stable=False))
    text = common.pair_spread()
    assert "WIDE SPREAD" in text and "not stable" in text


def test_torch_layout_conversion_matches_caffe_permutation():
    import spp_jax
    from bench.spp_whole import LEVELS, ours_from_torch
    b, c = 2, 3
    ours = np.arange(b * c * 50, dtype=np.float32).reshape(b, -1)
    torch_layout = ours[:, spp_jax.caffe_permutation(c, LEVELS, LEVELS)]
    assert np.array_equal(ours_from_torch(torch_layout, b, c), ours)


def test_torchvision_float_bins_equal_appendix_a_up_to_64_cells():
    from bench.spp_window import torchvision_bins_differ
    cells = np.array([[5, 3, 5 + a - 1, 3 + a - 1] for a in range(1, 65)])
    assert not torchvision_bins_differ(cells, (80, 80)).any()


def test_conv_flops_zf5():
    from bench.backbone import conv_flops, head_flops
    # conv1 110x110x96x(7*7*3) dominates nothing in particular; total ~2.2 GFLOP at 224.
    assert 2.0e9 < conv_flops("zf5", 224, 224) < 2.5e9
    assert conv_flops("overfeat7", 224, 224) > 3 * conv_flops("zf5", 224, 224)
    assert head_flops(256) == 2.0 * (12800 * 4096 + 4096 * 4096 + 4096 * 1000)


def test_run_refuses_without_torch(capsys):
    pytest.importorskip("numpy")
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        pytest.skip("torch is installed: the no-torch message is not reachable")
    except ImportError:
        pass
    from bench.run import main
    assert main(["--quick"]) == 2
    assert ".venv-bench" in capsys.readouterr().err


def test_torch_model_mirrors_backbone_shapes():
    torch = pytest.importorskip("torch")
    from bench.torch_models import backbone
    net = backbone("zf5", width=0.125)
    out = net(torch.zeros(1, 3, 224, 224))
    assert tuple(out.shape[2:]) == (13, 13)
    out = backbone("overfeat7", width=0.0625)(torch.zeros(1, 3, 224, 224))
    assert tuple(out.shape[2:]) == (18, 18)


def test_default_config_is_full():
    assert Config().mode == "full"
