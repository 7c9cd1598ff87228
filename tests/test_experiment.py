"""End-to-end runs of `make train` / `make eval` on tiny data: embedded shapes and mocked ImageNet."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import eval as eval_main
from experiments import train as train_main
from spp_jax.data.datasets import PipelineData, classification_dataset
from spp_jax.data.pipeline import AugmentConfig, InMemorySource
from spp_jax.train.config import get_config
from spp_jax.train.experiment import train_and_evaluate

TINY = ["model=zf5", "width=0.05", "fc_dim=16", "batch_size=8", "eval_batch_size=8", "epochs=2",
        "mean_samples=8", "log_every=2", "checkpoint_every=0", "compile_cache_dir=none", "progress=false",
        "plot=false"]


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_embedded_train_resume_and_eval(tmp_path, capsys):
    wd = str(tmp_path / "run")
    args = ["--workdir", wd, *TINY, "train_examples=24", "val_examples=8", "eval_limit=4",
            "multiview_limit=1", "protocols=1crop,1full,multiview"]
    train_main.main(args)
    out = json.load(open(os.path.join(wd, "eval.json")))
    assert out["dataset"] == "shapes" and out["variant"] == "SPP multi-size"
    assert set(out["results"]) == {"1crop", "1full", "multiview"}
    assert out["results"]["multiview"]["views_per_image"] >= 94  # 96 windows (fewer if square) + 2 full
    epochs = [r for r in _read_jsonl(os.path.join(wd, "metrics.jsonl")) if r["kind"] == "epoch"]
    assert [r["size"] for r in epochs] == [180, 224]  # multi-size: switch every epoch
    printed = capsys.readouterr().out
    assert "| 1 crop |" in printed
    # one pass scores 1 full and multi-view: the report must not pass its time off as each one's
    assert printed.count("(one pass for 1 full and multi-view)") == 2
    # Running again resumes from the final checkpoint: no new training steps, same evaluation,
    # and the wall time recorded by the invocation that finished the run is kept.
    with open(os.path.join(wd, "run_summary.json")) as f:
        summary = f.read()
    train_main.main(args)
    with open(os.path.join(wd, "run_summary.json")) as f:
        assert f.read() == summary
    assert len([r for r in _read_jsonl(os.path.join(wd, "metrics.jsonl")) if r["kind"] == "epoch"]) == 2
    out2 = json.load(open(os.path.join(wd, "eval.json")))
    assert out2["results"]["1crop"] == {**out["results"]["1crop"], "seconds": out2["results"]["1crop"]["seconds"]}
    # make eval on the workdir reproduces the 1-crop error from the restored checkpoint
    eval_main.main(["--workdir", wd, "protocols=1crop"])
    out3 = json.load(open(os.path.join(wd, "eval.json")))
    assert out3["results"]["1crop"]["top1_err"] == out["results"]["1crop"]["top1_err"]
    # transfer and detection read the same workdir: conv layers and fc6/fc7, the mean image
    from spp_jax.pretrained import load_pretrained
    net = load_pretrained(wd)
    assert net.model.arch == "zf5" and net.model.width == 0.05 and net.mean.ndim == 3
    assert net.variables["params"]["classifier"]["fc7"]["kernel"].shape == (16, 16)
    assert "trained 2 epochs on shapes" in net.description


def test_imagenet_code_path_on_mock_data(tmp_path):
    # The real-data path (TFDS data_source, decoding, mean image, pipeline, compiled steps,
    # evaluation) on TFDS's mock ImageNet: random JPEG-decoded images, 1000 classes.
    cfg = get_config("imagenet", [*TINY, "dataset=imagenet2012", f"data_dir={tmp_path}/tfds", "sizes=224",
                                  "size_schedule=single", "epochs=1", "protocols=1crop", "eval_limit=4"])
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        out = train_and_evaluate(cfg, str(tmp_path / "run"))
    rec = _read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert rec[0]["kind"] == "train" and np.isfinite(rec[0]["loss"]) and rec[0]["size"] == 224
    assert out["results"]["1crop"]["num_images"] == 4


def test_missing_imagenet_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"):
        classification_dataset("imagenet2012", str(tmp_path))


@pytest.mark.parametrize("arg, msg", [("model=alexnet", "model=alexnet: must be one of: zf5, convnet5, overfeat5, overfeat7"),
                                      ("dataset=cifar", "dataset=cifar: must be one of: shapes, shapes_wide, imagenet2012"),
                                      ("bogus=1", "unknown config key 'bogus'")])
def test_bad_names_give_one_line_errors(arg, msg):
    with pytest.raises(SystemExit, match=msg):
        train_main.main([arg])


def test_pipeline_data_contract():
    rng = np.random.default_rng(0)
    items = [{"image": rng.integers(0, 255, (260, 300, 3), dtype=np.uint8), "label": i % 3} for i in range(10)]
    d = PipelineData(InMemorySource(items), InMemorySource(items[:5]), 3, AugmentConfig(pca_std=0.0))
    assert d.steps_per_epoch(4) == 2
    it = d.train_iter(1, 180, 4)
    first = next(it)
    assert first["image"].shape == (4, 180, 180, 3) and first["label"].dtype == np.int32
    state = it.get_state()
    second = next(it)
    resumed = d.train_iter(1, 180, 4, state=state)
    np.testing.assert_array_equal(next(resumed)["image"], second["image"])
    batches = list(d.eval_batches(224, 4))
    assert sum(int(b["mask"].sum()) for b in batches) == 5
    with pytest.raises(ValueError, match="exceeds"):
        d.steps_per_epoch(64)
    assert d.train_channels == 3
    g = PipelineData(InMemorySource(items), InMemorySource(items[:5]), 3, AugmentConfig(gray=True))
    assert g.train_channels == 1 and next(g.train_iter(1, 180, 4))["image"].shape == (4, 180, 180, 1)
    assert next(iter(g.eval_batches(224, 4)))["image"].shape[-1] == 3  # views stay RGB


def test_gray_batches_need_a_gray_std_net():
    from spp_jax.train.loop import _train_channels

    class Gray:
        train_channels = 1
    assert _train_channels(Gray(), get_config("embedded")) == 1
    with pytest.raises(ValueError, match="only an input_norm=gray_std network"):
        _train_channels(Gray(), get_config("embedded", ["input_norm=none"]))


def test_prepare_data_asks_for_gray_batches_for_gray_std_nets_only(tmp_path):
    from spp_jax.train.experiment import prepare_data
    kw = ["train_examples=3", "batch_size=2", "val_examples=2", "mean_samples=2", f"data_dir={tmp_path}/data"]
    for norm, gray in (("gray_std", True), ("none", False)):
        _, aug = prepare_data(get_config("embedded", [*kw, f"input_norm={norm}"]), str(tmp_path))
        assert aug.gray is gray


def test_table2_trains_three_variants_and_writes_the_table(tmp_path, capsys):
    from experiments import table2

    tiny = [t for t in TINY if not t.startswith("epochs=")]
    table2.main(["--workdir", str(tmp_path), *tiny, "epochs=1", "train_examples=16", "val_examples=8",
                 "eval_limit=4", "protocols=1crop"])
    data = json.load(open(tmp_path / "table2.json"))
    assert set(data) == {"no SPP", "SPP single-size", "SPP multi-size"}
    assert all(data[k]["variant"] == k for k in data)  # each sub-run trained the variant it names
    for sub in ("nospp", "single", "multi"):
        assert (tmp_path / sub / "eval.json").exists()
    md = open(tmp_path / "table2.md").read()
    assert "| test view | no SPP | SPP single-size | SPP multi-size |" in md  # the paper's column order
    assert "| 1 crop |" in md and md.count(" / ") >= 3


def test_data_seed_keeps_the_images_when_the_seed_changes(tmp_path):
    from spp_jax.train.experiment import prepare_data
    kw = ["train_examples=3", "batch_size=2", "val_examples=2", "mean_samples=2", f"data_dir={tmp_path}/data"]

    def first_image(*over):
        ds, _ = prepare_data(get_config("embedded", [*kw, *over]), str(tmp_path))
        return np.asarray(ds.train[0]["image"])

    a, b, c = first_image("seed=0"), first_image("seed=1", "data_seed=0"), first_image("seed=1")
    np.testing.assert_array_equal(a, b)  # other init/augmentation seed, same generated data
    assert a.shape != c.shape or not np.array_equal(a, c)
