"""The one loader of pretrained networks: workdirs, msgpack + sidecar (checked), the random fallback."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from spp_jax.errors import UserError
from spp_jax.models import get_model, random_variables
from spp_jax.pretrained import PAPER_MEAN, load_pretrained, random_pretrained, save_pretrained
from workdirs import make_workdir


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_msgpack_round_trip_keeps_weights_and_settings(tmp_path):
    m = get_model("zf5", num_classes=11, width=0.05, fc_dim=16, input_scale=1 / 58, pool_mode="released",
                  input_norm="gray_std")
    v = random_variables(m, 3, bias_std=0.1)
    path = str(tmp_path / "net.msgpack")
    save_pretrained(path, m, v, mean=np.array([1.0, 2.0, 3.0]))
    net = load_pretrained(path)
    assert net.model == m  # arch, width, fc_dim, classes, input scale and norm, levels, bin rule
    np.testing.assert_allclose(net.mean, [1, 2, 3])
    _leaves_equal(v, net.variables)
    assert jax.tree.structure(v) == jax.tree.structure(net.variables)
    np.testing.assert_allclose(net.serving_mean("image"), [1, 2, 3])
    assert float(net.serving_mean()) == PAPER_MEAN == 128.0  # the paper's constant by default


def test_sidecar_is_checked_against_the_arrays(tmp_path):
    m = get_model("zf5", num_classes=11, width=0.05, fc_dim=16)
    path = str(tmp_path / "net.msgpack")
    save_pretrained(path, m, random_variables(m, 0))
    side = json.load(open(path + ".json"))
    json.dump({**side, "width": 0.1}, open(path + ".json", "w"))
    with pytest.raises(UserError, match=r"does not match its sidecar .*conv1/kernel has shape \(7, 7, 3, 5\), "
                                        r"that network needs \(7, 7, 3, 10\)"):
        load_pretrained(path)
    json.dump({**side, "num_classes": 5}, open(path + ".json", "w"))
    with pytest.raises(UserError, match=r"fc8/bias has shape \(11,\), that network needs \(5,\)"):
        load_pretrained(path)
    json.dump({**side, "arch": "overfeat7"}, open(path + ".json", "w"))
    with pytest.raises(UserError, match=r"conv6/kernel is missing"):
        load_pretrained(path)
    json.dump(side, open(path + ".json", "w"))
    bad = random_variables(m, 0)
    bad["params"]["classifier"]["fc6"]["bias"] = bad["params"]["classifier"]["fc6"]["bias"].at[0].set(np.nan)
    save_pretrained(path, m, bad)
    with pytest.raises(UserError, match="fc6/bias is not finite"):
        load_pretrained(path)


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope.msgpack"))
    path = tmp_path / "net.msgpack"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="sidecar .* is missing"):
        load_pretrained(str(path))
    (tmp_path / "net.msgpack.json").write_text(json.dumps({"arch": "zf5"}))
    with pytest.raises(UserError, match="lacks width, fc_dim, num_classes"):
        load_pretrained(str(path))
    (tmp_path / "net.msgpack.json").write_text(json.dumps({"arch": "zf5", "width": 0.05, "fc_dim": 8,
                                                           "num_classes": 3}))
    with pytest.raises(UserError, match="not a Flax msgpack"):
        load_pretrained(str(path))
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained(str(tmp_path))  # a directory that is no training workdir
    with pytest.raises(UserError, match="unknown mean"):
        random_pretrained(width=0.05, fc_dim=8).serving_mean("median")


def test_workdir_without_importing_the_training_loop(tmp_path):
    wd = make_workdir(str(tmp_path / "wd"), spp=True, seed=0)
    code = ("import sys; from spp_jax.pretrained import load_pretrained; n = load_pretrained(sys.argv[1]); "
            "print(n.model.arch, n.model.width, n.trained_on, n.mean.shape, "
            "'spp_jax.train.loop' in sys.modules, 'spp_jax.train.experiment' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, wd], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["zf5", "0.05", "shapes", "(256,", "256,", "3)", "False", "False"]
    net = load_pretrained(wd)
    assert net.variables["params"]["classifier"]["fc8"]["kernel"].shape == (16, 10)
    assert "trained 1 epochs on shapes" in net.description
    assert net.serving_mean("image").shape == (256, 256, 3)


def test_random_network_is_announced(caplog):
    net = random_pretrained(width=0.05, fc_dim=8, num_classes=5)
    assert "RANDOMLY INITIALISED" in caplog.text and net.description.startswith("random zf5")
    assert net.variables["params"]["classifier"]["fc8"]["kernel"].shape == (8, 5)
    assert float(net.serving_mean("image")) == 128.0 and "no training mean known" in caplog.text
