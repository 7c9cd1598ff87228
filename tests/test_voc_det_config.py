"""experiments.voc_det: the one config grammar (presets, key=value, --help, the config file), every
mistake refused with one line before any work, the file checks that come before the backbone, and
the backbone's pretraining recipe pinned to the one that trained runs/zf5-det-single."""
import dataclasses
import json
import os

import numpy as np
import pytest

from experiments import voc_det as main_mod
from spp_jax import config_grammar as grammar
from spp_jax.config_grammar import spec_of
from spp_jax.detection import config as C
from spp_jax.detection import proposals as P
from spp_jax.detection import records as R
from spp_jax.detection.config import PRESETS, VocDetConfig, parse_command_line
from spp_jax.train.config import get_config


class Sentinel(Exception):
    """Raised by a stubbed expensive step: the run got that far."""


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if anything opens the data, loads or pretrains a network, or runs selective search."""
    def refuse(what):
        def f(*a, **k):
            raise AssertionError(f"expensive work started: {what}")
        return f
    monkeypatch.setattr(R, "load_records", refuse("load_records"))
    monkeypatch.setattr(main_mod, "backbone", refuse("backbone"))
    monkeypatch.setattr(P, "compute_proposals", refuse("compute_proposals"))
    import spp_jax.pretrained as pretrained
    monkeypatch.setattr(pretrained, "_from_workdir", refuse("_from_workdir"))
    monkeypatch.setattr(pretrained, "_from_msgpack", refuse("_from_msgpack"))


@pytest.fixture
def stop_at_backbone(monkeypatch):
    """The run stops where the backbone would be pretrained or loaded (everything before it ran)."""
    def stop(cfg, num_classes):
        raise Sentinel(num_classes)
    monkeypatch.setattr(main_mod, "backbone", stop)


def test_every_type_parses_after_the_preset():
    cfg, wd = parse_command_line([
        "--preset", "quick", "dataset=voc2007", "data_dir=/data/tfds", "checkpoint=runs/zf5", "limit=yes",
        "trainval_size=7", "second_checkpoint=runs/b", "mean=image", "proposals=p.npz", "workers=3",
        "scales=5", "scale_rule=released", "use_874=yes", "cache_dtype=float32", "ft_lrs=1e-2,1e-3",
        "ft_iter_scale=2", "flip=on", "rcnn=false", "rcnn_images=none", "rcnn_timing_windows=50",
        "pretrain_workdir=w", "pretrain_multisize=true", "pretrain_quick=false", "finetune_conv=conv2",
        "conv_ft_lrs=2e-3,2e-4", "conv_ft_iter_scale=0.25", "--workdir", "out"])
    want = VocDetConfig(dataset="voc2007", data_dir="/data/tfds", trainval_size=7, test_size=8, limit=True,
                        checkpoint="runs/zf5", pretrain_workdir="w", pretrain_multisize=True,
                        pretrain_quick=False, random_backbone=False, second_checkpoint="runs/b", mean="image",
                        proposals="p.npz", workers=3, scales=(5,), scale_rule="released", use_874=True,
                        cache_dtype="float32", ft_lrs=(1e-2, 1e-3), ft_iter_scale=2.0, flip=True, rcnn=False,
                        rcnn_images=None, rcnn_timing_windows=50, finetune_conv="conv2",
                        conv_ft_lrs=(2e-3, 2e-4), conv_ft_iter_scale=0.25)
    assert cfg == want and wd == "out"  # test_size=8 from the quick preset, the rest from key=value
    assert isinstance(cfg.ft_iter_scale, float) and cfg.ft_lrs == (0.01, 0.001)
    assert parse_command_line([])[1] == "runs/voc_det"


def test_presets_hold_the_old_modes():
    paper, _ = parse_command_line(["--preset", "paper", "checkpoint=c"])
    # SPP_FACTS section 6: VOC 2007, fine-tuning at 1e-4 then 1e-5, both SPP columns and R-CNN mode
    assert (paper.dataset, paper.ft_lrs, paper.scales, paper.rcnn, paper.mean) == \
        ("voc2007", (1e-4, 1e-5), (1, 5), True, "constant")
    embedded, _ = parse_command_line(["checkpoint=c"])  # the default preset
    # the old default run: 500/100 embedded images, fine-tuning at 1e-3 then 1e-4 (and, were the
    # end-to-end column asked for, half of Fast R-CNN's scaled iterations)
    assert embedded == dataclasses.replace(paper, dataset="shapes", ft_lrs=(1e-3, 1e-4), conv_ft_iter_scale=0.5)
    assert embedded.finetune_conv == paper.finetune_conv == "none"  # no end-to-end column by default
    assert (embedded.trainval_size, embedded.test_size) == (500, 100)
    quick, _ = parse_command_line(["--preset", "quick"])
    # the old --quick: Settings(n_trainval=12, n_test=8, ft_iter_scale=0.02, ft_lrs=(1e-3, 1e-4), rcnn_images=4)
    assert (quick.trainval_size, quick.test_size, quick.ft_iter_scale, quick.ft_lrs, quick.rcnn_images) == \
        (12, 8, 0.02, (1e-3, 1e-4), 4)
    assert quick.sized() and quick.pretrain_quick and quick.dataset == "shapes"
    # the old "--quick --dataset voc2007" capped VOC at 12/8 images: limit=true does it now
    assert parse_command_line(["--preset", "quick", "dataset=voc2007", "random_backbone=true"])[0].sized()
    assert not paper.sized()


def test_help_lists_every_key_with_its_default_and_the_presets(capsys):
    with pytest.raises(SystemExit) as e:
        main_mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(VocDetConfig):
        assert f"  {f.name}=" in out, f.name
        assert spec_of(f).help.split()[0] in out, f.name
        assert spec_of(f).help, f.name
    assert "  ft_lrs=0.0001,1e-05 " in out and "  scales=1,5 " in out and "  rcnn_images=none " in out
    for name in PRESETS:
        assert f"  {name}: " in out
    assert "quick: dataset=shapes trainval_size=12" in out and "--workdir" in out


def test_every_number_has_a_range_and_every_name_a_choice():
    free = {"checkpoint", "second_checkpoint", "pretrain_workdir", "data_dir", "proposals"}
    for f in dataclasses.fields(VocDetConfig):
        if f.type != "bool" and f.name not in free:
            assert spec_of(f).describe() or spec_of(f).check, f.name


BAD = [  # (arguments, the one line expected)
    ("lr=1", "unknown config key 'lr'; valid keys: dataset, data_dir, trainval_size,"),
    ("ft_lrs=1e-3", "ft_lrs: expected 2 comma-separated values, got '1e-3'"),
    ("ft_lrs=1e-3,-1", "ft_lrs=0.001,-1.0: each value must be > 0 (got -1.0)"),
    ("ft_iter_scale=0", "ft_iter_scale=0.0: must be > 0"),
    ("ft_iter_scale=nan", "ft_iter_scale=nan: must be a finite number"),
    ("rcnn_images=0", "rcnn_images=0: must be >= 1"),
    ("finetune_conv=pool2", "finetune_conv=pool2: must be one of: none, conv1, conv2, conv3, conv4, conv5, fc6"),
    ("conv_ft_iter_scale=0", "conv_ft_iter_scale=0.0: must be > 0"),
    ("conv_ft_lrs=1e-3", "conv_ft_lrs: expected 2 comma-separated values, got '1e-3'"),
    ("rcnn_timing_windows=-2", "rcnn_timing_windows=-2: must be >= 1"),
    ("trainval_size=0", "trainval_size=0: must be >= 1"),
    ("workers=many", "workers: expected an int, got 'many'"),
    ("scales=3", "scales=3: each value must be one of: 1, 5"),
    ("scales=5,5", "scales=5,5: 5 is given twice"),
    ("scales=", "scales='': must have at least 1 value"),
    ("scale_rule=nearest", "scale_rule=nearest: must be one of: area, released"),
    ("mean=median", "mean=median: must be one of: constant, image"),
    ("cache_dtype=int8", "cache_dtype=int8: must be one of: float16, float32"),
    ("dataset=voc/2007", "dataset=voc/2007: must be one of: shapes, voc2007"),
    ("rcnn=maybe", "rcnn: expected a bool (true/false), got 'maybe'"),
    ("--preset tiny", "unknown preset 'tiny'; valid: embedded, quick, paper"),
    ("dataset=voc2007", "dataset=voc2007 needs checkpoint=PATH"),
    ("--preset paper", "dataset=voc2007 needs checkpoint=PATH"),
    ("checkpoint=x random_backbone=true", "random_backbone=true and checkpoint=x exclude each other"),
    ("data_dir=/data", "data_dir=/data: the embedded data (dataset=shapes) is generated"),
    ("dataset=voc2007 random_backbone=true test_size=10", "test_size=10: voc2007 uses all its images; add "
                                                         "limit=true"),
    # the pre-grammar flags, each told its new spelling
    ("--quick", "unknown option --quick: use --preset quick"),
    ("--no-rcnn", "unknown option --no-rcnn: use rcnn=false"),
    ("--checkpoint runs/zf5", "unknown option --checkpoint: use checkpoint=PATH"),
    ("--scales 1", "unknown option --scales: use scales=VALUE"),
    ("--data-dir /d", "unknown option --data-dir: use data_dir=DIR"),
    ("--bogus", "unknown option --bogus: the options are --preset, --workdir and key=value"),
    ("runs/zf5", "override 'runs/zf5' is not key=value"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_a_mistake_is_one_line_exit_1_before_any_work(args, message, tmp_path, no_work):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main_mod.main(["--workdir", str(out), *args.split()])
    assert isinstance(e.value.code, str) and e.value.code.startswith(f"error: {message}")  # exit status 1
    assert "\n" not in e.value.code
    assert not out.exists()  # nothing written


def _run_until_backbone(tmp_path, *args):
    out = tmp_path / "out"
    with pytest.raises(Sentinel) as e:
        main_mod.main(["--preset", "quick", "--workdir", str(out), *args])
    return out, e.value.args[0]


def test_the_resolved_config_is_written_and_reads_back(tmp_path, stop_at_backbone):
    out, num_classes = _run_until_backbone(tmp_path, "flip=true", "scales=5", "ft_lrs=0.002,0.0002")
    assert num_classes == 11  # the 10 shapes classes and background
    path = out / "voc_det_config.json"
    raw = json.loads(path.read_text())
    assert raw["scales"] == [5] and raw["flip"] is True and raw["rcnn_images"] == 4 and len(raw) == \
        len(dataclasses.fields(VocDetConfig))
    cfg = grammar.read_config(VocDetConfig, path)
    assert cfg == parse_command_line(["--preset", "quick", "flip=true", "scales=5", "ft_lrs=0.002,0.0002"])[0]


def _quick_ids():
    tr = R.load_records("shapes", "trainval", size=12)
    te = R.load_records("shapes", "test", size=8)
    return [r["image_id"] for r in tr] + [r["image_id"] for r in te]


def test_a_proposals_file_is_checked_before_the_backbone(tmp_path, stop_at_backbone):
    ids = _quick_ids()
    good = {i: np.array([[0, 0, 10, 10], [2, 3, 20, 30]], np.float32) for i in ids}
    ok = tmp_path / "ok.npz"
    np.savez(ok, **good)
    _run_until_backbone(tmp_path, f"proposals={ok}")  # a valid file gets as far as the backbone
    cases = {  # file contents -> the error's words
        "scores.npz": ({**good, ids[3]: np.zeros((2, 5), np.float32)}, f"image {ids[3]!r}: boxes must have "
                                                                     "shape (R, 4)"),
        "nan.npz": ({**good, ids[0]: np.array([[0, 0, np.nan, 4]], np.float32)}, "NaN or infinite"),
        "missing.npz": ({k: v for k, v in good.items() if k != ids[-1]}, "has no proposals for 1 image(s)"),
    }
    for name, (arrays, words) in cases.items():
        path = tmp_path / name
        np.savez(path, **arrays)
        with pytest.raises(SystemExit) as e:
            main_mod.main(["--preset", "quick", "--workdir", str(tmp_path / name[:-4]), f"proposals={path}"])
        assert e.value.code.startswith(f"error: {path}") and words in e.value.code, name
        assert "\n" not in e.value.code and not (tmp_path / name[:-4]).exists()
    with pytest.raises(SystemExit) as e:
        main_mod.main(["--preset", "quick", "--workdir", str(tmp_path / "x"), "proposals=/nonexistent.npz"])
    assert e.value.code == "error: proposal file /nonexistent.npz does not exist"


def test_a_checkpoint_is_checked_before_the_data(tmp_path, no_work):
    wd = tmp_path / "train"
    wd.mkdir()
    (tmp_path / "net.msgpack").write_bytes(b"\x80")
    (tmp_path / "bad.msgpack").write_bytes(b"\x80")
    (tmp_path / "bad.msgpack.json").write_text('{"arch": "zf5"}')
    cases = [
        ("checkpoint=/nonexistent.msgpack", "pretrained network '/nonexistent.msgpack' does not exist"),
        (f"checkpoint={wd}", f"{wd} has no config.json: is it a `make train` workdir?"),
        (f"checkpoint={tmp_path / 'net.msgpack'}", "the JSON sidecar"),
        (f"checkpoint={tmp_path / 'bad.msgpack'}", "bad.msgpack.json lacks width, fc_dim, num_classes"),
        ("second_checkpoint=/nonexistent", "pretrained network '/nonexistent' does not exist"),
    ]
    for arg, words in cases:
        with pytest.raises(SystemExit) as e:
            main_mod.main(["--preset", "quick", "--workdir", str(tmp_path / "out"), arg])
        assert e.value.code.startswith("error: ") and words in e.value.code, arg
        assert not (tmp_path / "out").exists()


def test_a_workdir_without_checkpoints_is_refused_before_the_data(tmp_path, no_work):
    wd = tmp_path / "train"
    grammar.write_config(get_config("embedded"), wd)
    with pytest.raises(SystemExit) as e:
        main_mod.main(["--preset", "quick", "--workdir", str(tmp_path / "out"), f"checkpoint={wd}"])
    assert e.value.code == f"error: no checkpoints in {wd}: train first (make train WORKDIR={wd})"


def test_a_missing_data_dir_is_refused_before_the_data(tmp_path, no_work):
    with pytest.raises(SystemExit) as e:
        main_mod.main(["--preset", "paper", "--workdir", str(tmp_path / "out"), "random_backbone=true",
                       f"data_dir={tmp_path / 'nope'}"])
    assert e.value.code.startswith(f"error: data_dir={tmp_path / 'nope'}: no such directory")


# The recipe written out literally (DETECTION_PRETRAIN, SINGLE_SIZE and QUICK_PRETRAIN on
# the embedded preset), so a change to it is deliberate: a finished pretraining workdir
# refuses a changed config. It pins the former preset's colour input (the preset's gray input
# detects 15 points worse) and no dropout (since 2026-12-06; dropout 0.5 before).
RECIPE = ("model=zf5", "protocols=1crop", "epochs=16", "decay_epochs=12,14", "input_norm=none",
          "dropout=0")
SINGLE = ("size_schedule=single", "sizes=224")
QUICK = ("train_examples=96", "val_examples=16", "epochs=1", "width=0.125", "fc_dim=256", "mean_samples=16")


def _recipe_overrides(quick=False, multisize=False, seed=0):
    over = (*RECIPE, *(() if multisize else SINGLE), f"seed={seed}")
    return over + (QUICK if quick else ())


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("multisize", [False, True])
def test_the_pretraining_recipe_is_the_written_one(quick, multisize):
    cfg = dataclasses.replace(VocDetConfig(), pretrain_quick=quick, pretrain_multisize=multisize)
    want = get_config("embedded", list(_recipe_overrides(quick, multisize)))
    new = C.pretrain_config(cfg)
    assert grammar.config_dict(new) == grammar.config_dict(want) and new == want
    # and it is what the paper's detection backbone is (Section 4: ZF-5, single-size trained),
    # with the former preset's colour input, without dropout
    want_sizes = (180, 224) if multisize else (224,)
    assert (new.model, new.sizes, new.epochs) == ("zf5", want_sizes, 1 if quick else 16)
    assert (new.input_norm, new.dropout) == ("none", 0.0)
    assert C.pretrain_workdir(cfg) == f"runs/zf5-det-{'multi' if multisize else 'single'}" + \
        ("-quick" if quick else "")
    assert C.pretrain_workdir(dataclasses.replace(cfg, pretrain_workdir="w")) == "w" + ("-quick" if quick else "")


def test_a_pretraining_of_another_recipe_stops_with_the_detection_keys(tmp_path, no_work):
    # A pretraining workdir of another recipe (here: gray input, as the training preset has it
    # since 2026-12-04, and dropout 0.5, as this recipe had it before 2026-12-06). The error
    # must name the differing keys and ways out that voc_det takes.
    from spp_jax.train.config import save_config
    cfg = dataclasses.replace(VocDetConfig(), pretrain_quick=True, pretrain_workdir=str(tmp_path / "w"))
    wd = C.pretrain_workdir(cfg)
    old = get_config("embedded", list(_recipe_overrides(quick=True)) + ["input_norm=gray_std", "dropout=0.5"])
    save_config(old, wd)
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.write('{"kind": "train", "step": 1}\n')
    with pytest.raises(SystemExit) as e:
        main_mod.main(["--preset", "quick", "--workdir", str(tmp_path / "out"),
                       f"pretrain_workdir={tmp_path / 'w'}"])
    msg = str(e.value.code)
    assert msg.startswith(f"error: {wd} holds a backbone pretrained with another recipe (")
    assert "dropout 0.5 -> 0.0" in msg and "input_norm gray_std -> none" in msg
    assert f"checkpoint={wd}" in msg and "pretrain_workdir=DIR" in msg and "overwrite" not in msg
    # the same recipe passes the check (and goes on to the backbone, refused by no_work)
    save_config(C.pretrain_config(cfg), wd)
    with pytest.raises(AssertionError, match="expensive work started"):
        main_mod.main(["--preset", "quick", "--workdir", str(tmp_path / "out2"),
                       f"pretrain_workdir={tmp_path / 'w'}"])


def test_a_good_msgpack_passes_the_cheap_check_and_a_bad_sidecar_does_not(tmp_path):
    from spp_jax.errors import UserError
    from spp_jax.pretrained import check_pretrained_path, random_pretrained, save_pretrained
    net = random_pretrained("zf5", width=0.0625, fc_dim=16, num_classes=3)
    path = str(tmp_path / "net.msgpack")
    save_pretrained(path, net.model, net.variables)
    check_pretrained_path(path)  # no error
    meta = json.loads((tmp_path / "net.msgpack.json").read_text())
    (tmp_path / "net.msgpack.json").write_text(json.dumps({**meta, "arch": "alexnet"}))
    with pytest.raises(UserError, match="net.msgpack.json: .*alexnet"):
        check_pretrained_path(path)


def test_finetune_conv_adds_the_end_to_end_column_last():
    from experiments import voc_det_tables as T
    from spp_jax.models import get_model, random_variables
    from spp_jax.pretrained import Pretrained
    from spp_jax.serve import Server
    m = get_model("zf5", width=0.05, fc_dim=16, num_classes=11)
    b = Pretrained(m, random_variables(m, 0), None, "tiny")
    nets = [("", b, Server(m, b.variables, 128.0))]
    inputs = main_mod.Inputs(R.load_records("shapes", "trainval", size=2), R.load_records("shapes", "test", size=2),
                             None, {"proposals": "ss-fast"})
    plain, _ = main_mod.columns_for(parse_command_line(["--preset", "quick"])[0], nets, inputs)
    cfg = parse_command_line(["--preset", "quick", "finetune_conv=conv4", "conv_ft_lrs=2e-3,2e-4"])[0]
    cols, _ = main_mod.columns_for(cfg, nets, inputs)
    assert [c.name for c in cols] == [c.name for c in plain] + [T.COL_SPP1_CONV]  # the others unchanged
    ft = cols[-1]
    assert ft.extractor.scales == (688,) and ft.extractor.server is nets[0][2]
    c = ft.conv_finetune
    assert (c.from_layer, c.lrs, c.iter_scale, c.flip) == ("conv4", (2e-3, 2e-4), 0.05, False)
    assert all(col.conv_finetune is None for col in plain)
