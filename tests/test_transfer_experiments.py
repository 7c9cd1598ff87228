"""End-to-end: experiments.voc_cls / experiments.caltech101 on tiny workdirs, TFDS mock data, errors."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import caltech101 as caltech_main
from experiments import voc_cls as voc_main
from spp_jax.config_grammar import read_config
from spp_jax.errors import ConfigError
from spp_jax.transfer import datasets as D
from spp_jax.transfer import run
from spp_jax.transfer.config import CaltechConfig, VocClsConfig
from workdirs import make_workdir as _make_workdir


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    return (_make_workdir(str(root / "spp"), True, 0), _make_workdir(str(root / "nospp"), False, 1))


COMMON = ["--preset", "quick", "progress=false", "batch_size=8", "bucket_step=1.0"]


def test_voc_cls_entry_point_and_resume(workdirs, tmp_path, capsys):
    spp, nospp = workdirs
    out = str(tmp_path / "voc")
    args = [f"checkpoint={spp}", f"nospp_checkpoint={nospp}", "--workdir", out, *COMMON,
            "settings=nospp_crop224,spp_crop224,spp_full224"]
    data = voc_main.main(args)
    assert data["num_trainval"] == 40 and data["num_test"] == 24
    assert data["settings"] == ["nospp_crop224", "spp_crop224", "spp_full224"]
    res = data["results"]
    assert "spp_pool5" not in res["nospp_crop224"]["layers"]
    for key in ("spp_crop224", "spp_full224"):
        assert set(res[key]["layers"]) == {"conv4", "conv5", "pool5", "spp_pool5", "fc6", "fc7"}
        for r in res[key]["layers"].values():
            assert 0 <= r["map"] <= 100 and len(r["ap"]) == 10
    md = open(os.path.join(out, "voc_cls.md")).read()
    assert "| layer | no SPP crop 224 | SPP crop 224 | SPP full 224 |" in md
    assert "| SPP pool5 | – |" in md  # the no-SPP net has no pyramid
    assert os.path.getsize(os.path.join(out, "voc_cls.png")) > 1000
    assert json.load(open(os.path.join(out, "voc_cls.json")))["table"] == "6"
    assert data["mean"] == "constant" and "subtracting the constant 128" in md  # Appendix A
    assert "| fc7 |" in capsys.readouterr().out
    # The resolved config, written before any feature, reads back with every type checked.
    want = VocClsConfig(checkpoint=spp, nospp_checkpoint=nospp, dataset="shapes", trainval_size=40, test_size=24,
                        limit=True, progress=False, batch_size=8, bucket_step=1.0,
                        settings=("nospp_crop224", "spp_crop224", "spp_full224"))
    written = os.path.join(out, "voc_cls_config.json")
    assert read_config(VocClsConfig, written) == want
    assert json.load(open(os.path.join(out, "voc_cls.json")))["config"] == json.load(open(written))
    raw = json.load(open(written))
    with open(written, "w") as f:
        json.dump({**raw, "batch_size": "8"}, f)
    with pytest.raises(ConfigError, match=f"{written}: batch_size: expected an int, got '8'"):
        read_config(VocClsConfig, written)
    # A second run reads every feature from the cache and gives the same table.
    again = voc_main.main(args)
    assert all(again["results"][k]["compiled_programs"] == 0 for k in again["results"])
    assert again["results"]["spp_full224"]["layers"]["fc7"]["map"] == res["spp_full224"]["layers"]["fc7"]["map"]


def test_caltech101_entry_point(workdirs, tmp_path):
    spp, _ = workdirs
    out = str(tmp_path / "cal")
    data = caltech_main.main([f"checkpoint={spp}", "--workdir", out, *COMMON,
                              "settings=nospp_crop224,spp_crop224", "layers=spp_pool5,fc7"])
    assert data["splits"] == 2 and data["num_classes"] == 30 and data["train_per_class"] == 3
    assert data["test_images"] == [90, 90]  # 3 test images per class in each split
    r = data["results"]["spp_crop224"]["layers"]["spp_pool5"]
    assert len(r["accuracy"]) == 2 and r["std"] >= 0 and 0 <= r["mean"] <= 100
    assert "no SPP crop 224: skipped" in data["notes"][0]
    md = open(os.path.join(out, "caltech101.md")).read()
    assert "| layer | SPP crop 224 |" in md and " ± " in md
    assert os.path.exists(os.path.join(out, "caltech101.png"))
    cfg = read_config(CaltechConfig, os.path.join(out, "caltech101_config.json"))
    assert (cfg.pool_size, cfg.splits, cfg.train_per_class, cfg.layers) == (450, 2, 3, ("spp_pool5", "fc7"))


def test_settings_resolved_and_checked_against_the_nets_before_any_image(workdirs, tmp_path):
    spp, nospp = workdirs
    # settings=none: Table 6's columns for ZF-5 (full 392), the no-SPP one skipped without a no-SPP net
    prep = run._prepare(VocClsConfig(checkpoint=spp, dataset="shapes"))
    assert prep.cfg.settings == ("nospp_crop224", "spp_crop224", "spp_full224", "spp_full392")
    assert [s.key for s in prep.settings] == ["spp_crop224", "spp_full224", "spp_full392"]
    assert prep.notes[0].startswith("no SPP crop 224: skipped") and "nospp_checkpoint=DIR" in prep.notes[0]
    # Sides the nets cannot take: ZF-5 needs >= 31 px, its no-SPP 6x6 pool5 207-238 px (README).
    for setting, message in (("spp_crop30", "a 30 px input is too small for zf5 (needs >= 31)"),
                             ("nospp_crop200", "the no-SPP zf5 takes crops of 207-238 px only")):
        out = tmp_path / setting
        with pytest.raises(SystemExit) as e:
            voc_main.main([f"checkpoint={spp}", f"nospp_checkpoint={nospp}", f"settings={setting}",
                           "--workdir", str(out)])
        assert e.value.code == f"error: settings: {setting}: {message}" + (
            " (the paper's: 224)" if setting.startswith("nospp") else "")
        assert not out.exists()
    with pytest.raises(SystemExit, match=f"error: nospp_checkpoint={spp} holds an SPP net"):
        caltech_main.main([f"checkpoint={spp}", f"nospp_checkpoint={spp}", "--workdir", str(tmp_path / "c")])
    # The library checks a config built by hand just the same.
    with pytest.raises(ConfigError, match="batch_size=0: must be >= 1"):
        run.run_voc(VocClsConfig(checkpoint=spp, batch_size=0), str(tmp_path / "lib"))
    assert not any(tmp_path.iterdir())


def test_errors_name_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="make train MODEL=zf5"):
        voc_main.main(["--workdir", str(tmp_path / "x"), "--preset", "quick"])
    with pytest.raises(SystemExit, match="make train MODEL=zf5"):
        caltech_main.main([f"checkpoint={tmp_path / 'nothing'}", "--preset", "quick"])
    with pytest.raises(FileNotFoundError, match="tfds build voc/2007 --data_dir"):
        D.voc_cls_data("voc/2007", str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="tfds build caltech101"):
        D.caltech_data("caltech101", str(tmp_path / "tfds"))


def test_tfds_mock_data_labels(tmp_path):
    with tfds.testing.mock_data(num_examples=5):
        tv, te = D.voc_cls_data("voc/2007", progress=False)
        raw = tfds.data_source("voc/2007", split="validation")
        cal = D.caltech_data("caltech101", progress=False)
        raw_cal = [tfds.data_source("caltech101", split=s) for s in ("train", "test")]
        assert len(tv) == 10 and len(te) == 5  # trainval = train + validation
        assert tv.labels.shape == (10, 20) and tv.labels.dtype == np.int8 and tv.num_classes == 20
        assert tv.class_names[:3] == ("aeroplane", "bicycle", "bird")
        ex = raw[2]
        y = tv.labels[7]
        pos, diff = set(ex["labels_no_difficult"].tolist()), set(ex["labels"].tolist())
        for k in range(20):
            assert y[k] == (1 if k in pos else 0 if k in diff else -1)
        assert tv[7].dtype == np.uint8 and tv[7].shape == ex["image"].shape
        assert len(cal) == 10 and cal.num_classes == 102 and cal.labels.dtype == np.int64
        assert cal.labels.tolist() == [int(s[i]["label"]) for s in raw_cal for i in range(5)]
        assert cal[6].shape == raw_cal[1][1]["image"].shape


def test_shapes_voc_labels_rule():
    ex = {"objects": {"label": np.array([2, 5, 5, 7]), "difficult": np.array([False, True, False, True])}}
    y = D.voc_labels_from_shapes(ex, 10)
    assert y.tolist() == [-1, -1, 1, -1, -1, 1, -1, 0, -1, -1]


def test_paper_defaults_full_side_per_backbone_and_ten_splits():
    from spp_jax.transfer import run
    from spp_jax.transfer.config import CaltechConfig
    assert run.voc_settings("zf5")[-1] == "spp_full392" and run.voc_settings("overfeat7")[-1] == "spp_full364"
    assert CaltechConfig().splits == 10 and CaltechConfig().train_per_class == 30
    assert CaltechConfig().test_per_class == 50
