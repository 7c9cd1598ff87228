"""The epoch loop: metrics, plots, multi-size / random-size schedules, plateau LR,
determinism, learning on the synthetic data."""
import json
import logging
import os

import numpy as np
import pytest

from spp_jax.train import get_lr_scale, size_schedule, train
from spp_jax.train.testing import flat_params, tiny_config, tiny_data


def _records(wd):
    return [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("loop"))
    r = train(tiny_config(plot=True, progress=True), wd, tiny_data())
    return wd, r


def test_metrics_plot_and_logs(run):
    wd, r = run
    recs = _records(wd)
    tr = [x for x in recs if x["kind"] == "train"]
    ep = [x for x in recs if x["kind"] == "epoch"]
    assert [x["step"] for x in tr] == list(range(1, 10))  # log_every=1, 3 epochs x 3 steps
    for x in tr:
        assert {"epoch", "step", "lr", "loss", "accuracy", "images_per_sec", "size"} <= set(x)
    assert [x["size"] for x in ep] == [48, 64, 48]  # multi-size: switch every epoch
    assert [x["lr"] for x in ep] == pytest.approx([0.01, 0.01, 0.001])  # decay at epoch 2
    for x in ep:
        assert 0 <= x["val_top1_error"] <= 1 and 0 <= x["val_top5_error"] <= x["val_top1_error"]
        assert x["images_per_sec"] > 0
    assert os.path.getsize(os.path.join(wd, "curves.png")) > 1000
    log = open(os.path.join(wd, "train.log")).read()
    assert "compiled train step for 48x48" in log and "compiled train step for 64x64" in log
    assert json.load(open(os.path.join(wd, "config.json")))["sizes"] == [48, 64]
    assert set(r.compile_seconds) == {48, 64}
    assert [e["epoch"] for e in r.epochs] == [0, 1, 2]


def test_deterministic_and_finished_run_is_a_no_op(run, tmp_path):
    wd, r = run
    r2 = train(tiny_config(), str(tmp_path), tiny_data())
    a, b = flat_params(r.state.params), flat_params(r2.state.params)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    r3 = train(tiny_config(), wd, tiny_data())  # everything done: restores, trains nothing
    assert r3.resumed_from == 9 and r3.epochs == []
    for k, v in flat_params(r3.state.params).items():
        np.testing.assert_array_equal(v, a[k])


def test_plateau_schedule_scales_lr_from_the_host(tmp_path):
    # min_delta=2: after the first validation (which sets the best) no error can "improve",
    # so with patience 1 each later validation divides the rate by 10, at most twice.
    cfg = tiny_config(lr_schedule="plateau", plateau_patience=1, plateau_min_delta=2.0,
                      epochs=4, checkpoint_every=0)
    r = train(cfg, str(tmp_path), tiny_data())
    tr = [x for x in _records(str(tmp_path)) if x["kind"] == "train"]
    by_epoch = {x["epoch"]: x["lr"] for x in tr}
    assert by_epoch == pytest.approx({0: 0.01, 1: 0.01, 2: 0.001, 3: 0.0001})
    assert get_lr_scale(r.state) == pytest.approx(0.01)


def test_random_size_schedule_compiles_per_distinct_size(tmp_path, caplog):
    cfg = tiny_config(size_schedule="random", sizes=(48, 49), epochs=3, checkpoint_every=0,
                      eval_every=0)
    drawn = size_schedule(cfg)
    with caplog.at_level(logging.INFO, logger="spp_jax"):
        r = train(cfg, str(tmp_path), tiny_data())
    assert set(r.compile_seconds) == set(drawn)
    assert "one train step is compiled per distinct size" in caplog.text
    assert [e["size"] for e in r.epochs] == drawn


def test_tiny_model_learns_the_synthetic_labels(tmp_path):
    cfg = tiny_config(sizes=(48,), size_schedule="single", eval_size=48, epochs=20,
                      decay_epochs=(100,), log_every=4, checkpoint_every=0, eval_every=5)
    data = tiny_data(num_train=32, num_val=32)
    r = train(cfg, str(tmp_path), data)
    # plain SGD at lr 0.01 on a 32-image set is noisy (the loss can spike), so look at the
    # best epoch: chance is 0.75 top-1 error (4 classes), loss ln 4 = 1.386
    assert min(e["loss"] for e in r.epochs) < r.epochs[0]["loss"] - 0.3
    assert min(e["val_top1_error"] for e in r.epochs if "val_top1_error" in e) <= 0.4
