"""Loading the detection backbone: msgpack round trip, bad checkpoints, the random fallback."""
import json

import jax
import numpy as np
import pytest

from spp_jax.detection.backbone import load_backbone, save_backbone
from spp_jax.models import get_model, random_variables


def test_msgpack_round_trip_keeps_weights_and_input_scale(tmp_path):
    m = get_model("zf5", num_classes=11, width=0.05, fc_dim=16, input_scale=1 / 58)
    v = random_variables(m, 3)
    path = str(tmp_path / "net.msgpack")
    save_backbone(path, m, v, mean=np.array([1.0, 2.0, 3.0]))
    net = load_backbone(path)
    assert net.model.input_scale == pytest.approx(1 / 58) and net.model.width == 0.05
    np.testing.assert_allclose(net.mean, [1, 2, 3])
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(net.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "nope.msgpack"))
    path = tmp_path / "net.msgpack"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="metadata"):
        load_backbone(str(path))
    (tmp_path / "net.msgpack.json").write_text(json.dumps({"arch": "zf5"}))
    with pytest.raises(ValueError, match="lacks width, fc_dim, num_classes"):
        load_backbone(str(path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(str(tmp_path))  # a directory that is no training workdir


def test_no_checkpoint_means_a_random_network(caplog):
    net = load_backbone(None, width=0.05, fc_dim=8, num_classes=5)
    assert "RANDOMLY INITIALISED" in caplog.text and net.description.startswith("random zf5")
    assert net.variables["params"]["classifier"]["fc8"]["kernel"].shape == (8, 5)
