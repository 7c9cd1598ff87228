"""Data parallelism: 4 fake CPU devices give the 1-device loss trajectory and params."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from spp_jax.train import check_batch_size, make_mesh, train
from spp_jax.train.testing import flat_params, tiny_config, tiny_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Float tolerance: the 4-device step sums per-shard gradients in another order (an
# all-reduce of 4 partial sums), so results agree to float32 rounding, not bitwise.
RTOL, ATOL = 1e-5, 1e-6  # measured: losses differ by <= 1.2e-7 (1 ulp)


def _losses(workdir):
    recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train_recs = [r for r in recs if r["kind"] == "train"]
    return ([r["step"] for r in train_recs], np.array([r["loss"] for r in train_recs]),
            [r for r in recs if r["kind"] == "epoch"])


def test_four_devices_match_one_device(tmp_path):
    wd4, out = str(tmp_path / "dev4"), str(tmp_path / "dev4.npz")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # XLA_FLAGS must be set before jax is imported, hence the subprocess.
    proc = subprocess.Popen([sys.executable, "-m", "spp_jax.train.testing", wd4, "--out", out,
                             "checkpoint_every=0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wd1 = str(tmp_path / "dev1")
    r1 = train(tiny_config(checkpoint_every=0), wd1, tiny_data())  # meanwhile, 1 device here
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "mesh: 4 devices" in err

    steps1, loss1, ep1 = _losses(wd1)
    steps4, loss4, ep4 = _losses(wd4)
    assert steps1 == steps4 == list(range(1, 10))
    np.testing.assert_allclose(loss4, loss1, rtol=RTOL, atol=ATOL)
    for a, b in zip(ep1, ep4):
        assert a["val_top1_error"] == b["val_top1_error"]
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=RTOL)
    p1 = flat_params(r1.state.params)
    with np.load(out) as z:
        for k in p1:
            np.testing.assert_allclose(z[k], p1[k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    fake_mesh = types.SimpleNamespace(devices=np.empty(4, object))
    assert check_batch_size(8, fake_mesh) == 8
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the number of "
                                         r"devices \(4\).*batch_size=4 or 8"):
        check_batch_size(6, fake_mesh)
    assert check_batch_size(6, make_mesh()) == 6
