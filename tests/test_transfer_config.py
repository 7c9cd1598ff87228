"""experiments.voc_cls / experiments.caltech101: the one config grammar (presets, key=value, --help),
and every mistake refused with one line before any checkpoint is opened or any file written."""
import dataclasses

import pytest

from experiments import caltech101 as caltech_main
from experiments import voc_cls as voc_main
from spp_jax.config_grammar import spec_of
from spp_jax.transfer import run as transfer_run
from spp_jax.transfer.config import (CALTECH_PRESETS, VOC_PRESETS, CaltechConfig, VocClsConfig,
                                     parse_command_line)

ENTRY_POINTS = {"voc_cls": (voc_main, VocClsConfig, VOC_PRESETS, "voc-cls"),
                "caltech101": (caltech_main, CaltechConfig, CALTECH_PRESETS, "caltech101")}


@pytest.fixture
def no_checkpoint_opened(monkeypatch):
    """Fail the test if anything tries to load a network (the first real work of a run)."""
    def refuse(path):
        raise AssertionError(f"a checkpoint was opened: {path}")
    monkeypatch.setattr(transfer_run, "load_pretrained", refuse)


def test_voc_every_type_parses_after_the_preset():
    cfg, wd = parse_command_line(VocClsConfig, VOC_PRESETS, "", [
        "--preset", "quick", "checkpoint=runs/zf5/", "nospp_checkpoint=runs/n", "mean=image",
        "dataset=voc/2007", "data_dir=/data/tfds", "seed=3", "settings=spp_crop224,spp_full392r400",
        "layers=fc7,conv4", "batch_size=2", "full_batch_size=1", "bucket_step=1", "svm_c=.5",
        "progress=no", "trainval_size=7", "limit=off"], "voc-cls")
    want = VocClsConfig(checkpoint="runs/zf5/", nospp_checkpoint="runs/n", mean="image", dataset="voc/2007",
                        data_dir="/data/tfds", seed=3, settings=("spp_crop224", "spp_full392r400"),
                        layers=("fc7", "conv4"), batch_size=2, full_batch_size=1, bucket_step=1.0,
                        svm_c=0.5, progress=False, trainval_size=7, test_size=24, limit=False)
    assert cfg == want  # test_size=24 comes from the quick preset, the rest from key=value
    assert isinstance(cfg.bucket_step, float) and isinstance(cfg.settings, tuple)
    assert wd == "runs/zf5-voc-cls"  # next to the checkpoint, trailing slash dropped
    # settings=none (and settings=) mean "Table 6's columns for the loaded backbone"
    for text in ("settings=none", "settings="):
        cfg, _ = parse_command_line(VocClsConfig, VOC_PRESETS, "", ["checkpoint=c", text, "--workdir", "o"],
                                    "voc-cls")
        assert cfg.settings is None and cfg.dataset == "shapes"  # the embedded preset by default


def test_caltech_presets_and_paper_defaults():
    paper, _ = parse_command_line(CaltechConfig, CALTECH_PRESETS, "", ["--preset", "paper", "checkpoint=c"], "x")
    # SPP_FACTS section 5: 30 training and up to 50 test images per class; the real Caltech101
    assert (paper.dataset, paper.train_per_class, paper.test_per_class, paper.splits) == ("caltech101", 30, 50, 10)
    assert paper.mean == "constant" and paper.settings == ("nospp_crop224", "spp_crop224", "spp_full224")
    quick, _ = parse_command_line(CaltechConfig, CALTECH_PRESETS, "", ["checkpoint=c", "--preset", "quick",
                                                                       "splits=3"], "x")
    assert (quick.dataset, quick.pool_size, quick.splits, quick.train_per_class) == ("shapes", 450, 3, 3)
    embedded, _ = parse_command_line(CaltechConfig, CALTECH_PRESETS, "", ["checkpoint=c"], "x")
    assert embedded == dataclasses.replace(paper, dataset="shapes")  # the default preset: the paper's, embedded


BAD = [  # (entry point, arguments, the one line expected)
    ("voc_cls", "lr=1", "unknown config key 'lr'; valid keys: checkpoint, nospp_checkpoint, mean,"),
    ("voc_cls", "batch_size=big", "batch_size: expected an int, got 'big'"),
    ("voc_cls", "svm_c=0", "svm_c=0.0: must be > 0"),
    ("voc_cls", "bucket_step=nan", "bucket_step=nan: must be a finite number"),
    ("voc_cls", "progress=maybe", "progress: expected a bool (true/false), got 'maybe'"),
    ("voc_cls", "mean=median", "mean=median: must be one of: constant, image"),
    ("voc_cls", "dataset=voc2007", "dataset=voc2007: must be one of: shapes, voc/2007"),
    ("voc_cls", "layers=fc7,fc8", "layers=fc7,fc8: each value must be one of: conv4, conv5, pool5,"),
    ("voc_cls", "layers=fc7,fc7", "layers=fc7,fc7: fc7 is given twice"),
    ("voc_cls", "settings=nospp_full224", "settings=nospp_full224: a no-SPP net only takes fixed-size crops"),
    ("voc_cls", "settings=crop224", "settings=crop224: bad setting 'crop224'"),
    ("voc_cls", "trainval_size=0", "trainval_size=0: must be >= 1"),
    ("voc_cls", "--preset tiny", "unknown preset 'tiny'; valid: embedded, quick, paper"),
    ("voc_cls", "--checkpoint-workdir runs/zf5", "unknown option --checkpoint-workdir: use checkpoint=DIR"),
    ("voc_cls", "--quick", "unknown option --quick: use --preset quick"),
    ("voc_cls", "--svm-c 2", "unknown option --svm-c: use svm_c=VALUE"),
    ("voc_cls", "runs/zf5", "override 'runs/zf5' is not key=value"),
    ("caltech101", "splits=0", "splits=0: must be >= 1"),
    ("caltech101", "seed=-1", "seed=-1: must be in [0, 2147483648)"),
    ("caltech101", "dataset=voc/2007", "dataset=voc/2007: must be one of: shapes, caltech101"),
    ("caltech101", "settings=spp_crop224,spp_crop224", "settings=spp_crop224,spp_crop224: spp_crop224 is given"),
    ("caltech101", "trainval_size=5", "unknown config key 'trainval_size'"),  # a voc_cls key
    ("caltech101", "--preset imagenet", "unknown preset 'imagenet'; valid: embedded, quick, paper"),
    # 30 classes x (30 training + 1 test image) cannot come from a pool of 900
    ("caltech101", "pool_size=900", "pool_size=900 is too small for train_per_class=30: the 30 classes need "
                                    "30 training images and one test image each, so pool_size >= 930"),
]


@pytest.mark.parametrize("entry, args, message", BAD)
def test_a_mistake_is_one_line_exit_1_before_any_work(entry, args, message, tmp_path, no_checkpoint_opened):
    module = ENTRY_POINTS[entry][0]
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir()
    with pytest.raises(SystemExit) as e:
        module.main([f"checkpoint={ckpt}", "--workdir", str(out), *args.split()])
    assert isinstance(e.value.code, str) and e.value.code.startswith(f"error: {message}")  # exit status 1
    assert "\n" not in e.value.code
    assert not out.exists() and list(ckpt.iterdir()) == []  # nothing written, nothing opened


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_run_needs_a_checkpoint(entry, tmp_path, no_checkpoint_opened):
    with pytest.raises(SystemExit) as e:
        ENTRY_POINTS[entry][0].main(["--workdir", str(tmp_path / "out")])
    assert e.value.code.startswith("error: checkpoint: a pretrained network is needed: pass checkpoint=DIR")
    assert "make train MODEL=zf5 WORKDIR=runs/zf5" in e.value.code and "\n" not in e.value.code
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_lists_every_key_with_its_default_and_the_presets(entry, capsys):
    module, cls, presets, task = ENTRY_POINTS[entry]
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    default = cls()
    for f in dataclasses.fields(cls):
        assert f"  {f.name}=" in out, f.name
        assert spec_of(f).help.split()[0] in out, f.name  # its meaning
    assert f"  batch_size={default.batch_size} " in out and "  svm_c=1.0 " in out and "  mean=constant " in out
    for name in presets:
        assert f"  {name}: " in out
    assert "quick: dataset=shapes" in out and f"<checkpoint>-{task}" in out


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_key_is_documented_and_checked(entry):
    # Numbers have a range and names a list of choices or a check (paths are free text).
    free = {"checkpoint", "nospp_checkpoint", "data_dir"}
    for f in dataclasses.fields(ENTRY_POINTS[entry][1]):
        spec = spec_of(f)
        assert spec.help, f.name
        if f.type != "bool" and f.name not in free:
            assert spec.describe() or spec.check, f.name
