"""Fault injection for issue 12 items 4-5: every bad config value, config file, proposal file,
cell window, box and geometry is refused with one clear line before any work, or (under jit)
gives a documented NaN result, never a real cell's values."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from experiments import eval as eval_main
from experiments import train as train_main
from spp_jax.config_grammar import spec_of
from spp_jax.detection.proposals import load_proposal_file, save_proposal_file
from spp_jax.errors import ConfigError, InputError
from spp_jax.geometry import INVALID_CELLS
from spp_jax.models import get_model
from spp_jax.roi import roi_pool_cells
from spp_jax.train.config import PRESETS, TrainConfig, build_model, get_config, save_config
from tests.reference import appendix_a_bins, pool_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZF = spp_jax.Geometry(stride=16, offset=20, slack=1.5)


# --------------------------------------------------------------------------------------------
# Item 4: every TrainConfig value is checked before any data is generated
# --------------------------------------------------------------------------------------------
BAD_TRAIN_VALUES = [  # (overrides, the one error line after "error: ")
    ("levels=0", "levels=0: each value must be >= 1 (got 0)"),
    ("levels=", "levels='': must have at least 1 value"),
    ("train_examples=0", "train_examples=0: must be >= 1"),
    ("train_examples=8", "train_examples=8 is less than one batch (batch_size=32)"),
    ("width=0", "width=0.0: must be > 0"),
    ("dropout=1.5", "dropout=1.5: must be in [0, 1)"),
    ("learning_rate=nan", "learning_rate=nan: must be a finite number"),
    ("learning_rate=1e4", "learning_rate=10000.0: must be in (0, 1]"),
    ("input_scale=nan", "input_scale=nan: must be a finite number"),
    ("input_scale=-1", "input_scale=-1.0: must be > 0"),
    ("fc_dim=0", "fc_dim=0: must be >= 1"),
    ("momentum=1", "momentum=1.0: must be in [0, 1)"),
    ("weight_decay=-1e-4", "weight_decay=-0.0001: must be in [0, 1)"),
    ("decay_factor=0", "decay_factor=0.0: must be in (0, 1]"),
    ("decay_epochs=0,5", "decay_epochs=0,5: each value must be >= 1 (got 0)"),
    ("epochs=0", "epochs=0: must be >= 1"),
    ("seed=-1", "seed=-1: must be in [0, 2147483648)"),
    ("data_threads=0", "data_threads=0: must be >= 1"),
    ("mean_samples=0", "mean_samples=0: must be >= 1"),
    ("eval_limit=-1", "eval_limit=-1: must be >= 0"),
    ("sizes=16", "sizes: 16 px is too small for zf5 (needs >= 31)"),
    ("eval_size=0", "eval_size=0: must be >= 1"),
    ("spp=false sizes=180,224", "sizes: 180 px does not fit the no-SPP zf5, which takes one side in "
                                "207-238 (the paper's is 224): set sizes=224"),
    ("protocols=1crop,5view", "protocols=1crop,5view: each value must be one of: 1crop, 1full, 10view, "
                              "multiview (got 5view)"),
    ("model=vgg16", "model=vgg16: must be one of: zf5, convnet5, overfeat5, overfeat7"),
    ("init_scheme=xavier", "init_scheme=xavier: must be one of: paper, he"),
    ("optimizer=rmsprop", "optimizer=rmsprop: must be one of: sgd, adam"),
    ("lr_schedule=plateau eval_every=0", "lr_schedule='plateau' needs validation: set eval_every >= 1"),
    ("batch_size=big", "batch_size: expected an int, got 'big'"),
    ("lr=0.1", "unknown config key 'lr'; valid keys: model, spp,"),
]


@pytest.mark.parametrize("overrides, message", BAD_TRAIN_VALUES)
def test_train_refuses_bad_values_before_any_work(tmp_path, overrides, message):
    wd = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_main.main(["--workdir", str(wd), *overrides.split()])
    assert str(e.value.code).startswith(f"error: {message}")
    assert "\n" not in str(e.value.code)
    assert not wd.exists()  # no data generated, no workdir, nothing to clean up


def test_bad_preset_and_table2_variants_are_refused_before_any_work(tmp_path):
    from experiments import table2
    wd = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_main.main(["--workdir", str(wd), "--preset", "cifar"])
    assert e.value.code == "error: unknown preset 'cifar'; valid: imagenet, embedded"
    # eval_size=180 suits the base (SPP) config but not the no-SPP variant: the variants'
    # own configs are checked before any training.
    with pytest.raises(SystemExit) as e:
        table2.main(["--workdir", str(wd), "eval_size=180"])
    assert e.value.code.startswith("error: eval_size: 180 px does not fit the no-SPP zf5")
    assert not wd.exists()


def test_every_train_key_is_documented_and_checked():
    # Numbers have a range, strings a list of choices (or are free paths), so no value
    # of any key reaches the training loop unchecked.
    free_text = {"data_dir", "compile_cache_dir"}
    for f in TrainConfig.__dataclass_fields__.values():
        spec = spec_of(f)
        assert spec.help, f"{f.name} has no help text"
        if f.type in ("bool",) or f.name in free_text:
            continue
        assert spec.describe(), f"{f.name} has no allowed range or choices"


def test_train_help_lists_every_key_default_and_range(capsys):
    with pytest.raises(SystemExit) as e:
        train_main.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    cfg = TrainConfig()
    for name in TrainConfig.__dataclass_fields__:
        assert f"  {name}=" in out, name
    assert "  dropout=0.5" in out and "[in [0, 1)]" in out and f"  batch_size={cfg.batch_size}" in out
    assert "embedded: dataset=shapes" in out  # the presets and what they set


def test_train_bad_value_in_a_subprocess_exits_1_with_one_line(tmp_path):
    wd = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "experiments.train", "--workdir", str(wd), "dropout=1.5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == "error: dropout=1.5: must be in [0, 1)"
    assert "Traceback" not in p.stderr and not wd.exists()


def test_no_spp_implies_one_224_input():
    # `make train MODEL=overfeat7 SPP=0` passes exactly these overrides (Makefile OVERRIDES).
    cfg = get_config("embedded", ["model=overfeat7", "spp=0"])
    assert (cfg.sizes, cfg.size_schedule, cfg.eval_size) == ((224,), "single", 224)
    # ... and the no-SPP net accepts that input: fc6 sees the 6x6 pool5 (traced, not run)
    model = build_model(get_config("embedded", ["model=overfeat7", "spp=0", "width=0.0625"]), 10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert shapes["params"]["classifier"]["fc6"]["kernel"].shape[0] == model.channels * 36
    # The multi-size default it replaced does not fit that net (the old failure, after data):
    with pytest.raises(ValueError, match="6x6"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 180, 180, 3)))
    # Sizes the user gives stand (and are checked); SPP nets keep their multi-size default.
    assert get_config("embedded", ["spp=0", "sizes=230"]).sizes == (230,)
    assert get_config("embedded", ["spp=1"]).sizes == (180, 224)
    with pytest.raises(ConfigError, match="no-SPP"):
        get_config("embedded", ["spp=0", "size_schedule=multi"])


def test_library_configs_are_validated_too(tmp_path):
    from spp_jax.train.experiment import train_and_evaluate
    bad = TrainConfig(**{**PRESETS["embedded"], "levels": (6, 0)})
    with pytest.raises(ConfigError, match="levels=6,0"):
        train_and_evaluate(bad, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    for kw, msg in [({"num_classes": 0}, "num_classes=0: must be >= 1"), ({"width": 0}, "width=0.0"),
                    ({"dropout": 1.5}, "dropout=1.5"), ({"fc_dim": 0}, "fc_dim=0"),
                    ({"input_scale": float("nan")}, "input_scale=nan"), ({"levels": (3, 0)}, "levels=3,0")]:
        with pytest.raises(ConfigError, match=msg):
            get_model("zf5", **kw)


# --------------------------------------------------------------------------------------------
# Item 4: a workdir's config.json is read with types checked, the file named in every error
# --------------------------------------------------------------------------------------------
def _workdir_with_config(tmp_path, mutate):
    wd = tmp_path / "w"
    path = save_config(get_config("embedded", ["width=0.0625", "fc_dim=32"]), str(wd))
    if callable(mutate):
        raw = json.load(open(path))
        mutate(raw)
        text = json.dumps(raw)
    else:
        text = mutate
    with open(path, "w") as f:
        f.write(text)
    return wd, path


@pytest.mark.parametrize("mutate, message", [
    ("{not json", "not a readable JSON config file"),
    ("", "not a readable JSON config file"),
    ("[1, 2]", "expected a JSON object of config keys, got list"),
    (lambda c: c.update(batch_size="sixteen"), "batch_size: expected an int, got 'sixteen'"),
    (lambda c: c.update(levels="6,3"), "levels: expected a comma-separated list of ints, got '6,3'"),
    (lambda c: c.update(spp="false"), "spp: expected a bool (true/false), got 'false'"),
    (lambda c: c.update(dropout=1.5), "dropout=1.5: must be in [0, 1)"),
    (lambda c: c.update(lerning_rate=0.1), "unknown config key 'lerning_rate'"),
    (lambda c: c.pop("fc_dim"), "missing key fc_dim"),
])
def test_eval_refuses_a_bad_config_file_naming_it(tmp_path, mutate, message):
    wd, path = _workdir_with_config(tmp_path, mutate)
    with pytest.raises(SystemExit) as e:
        eval_main.main(["--workdir", str(wd)])
    assert str(e.value.code).startswith(f"error: {path}: ") and message in str(e.value.code)
    assert sorted(os.listdir(wd)) == ["config.json"]  # no data prepared, nothing moved


def test_config_files_written_before_later_keys_still_load():
    # The config.json of a run trained before data_seed existed (the previous
    # results/overfeat7-embedded, kept as test data): it has no data_seed key.
    from spp_jax.train.config import load_config
    cfg = load_config(os.path.join(ROOT, "tests", "data", "config-before-data-seed"))
    assert cfg.data_seed is None and cfg.dataset_seed == cfg.seed and cfg.model == "overfeat7"


def test_eval_without_a_config_file(tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_main.main(["--workdir", str(tmp_path)])
    assert e.value.code == f"error: {tmp_path}/config.json not found: is {tmp_path} a training workdir?"
    assert os.listdir(tmp_path) == []


def test_eval_bad_config_in_a_subprocess_exits_1_with_one_line(tmp_path):
    wd, path = _workdir_with_config(tmp_path, "{not json")
    p = subprocess.run([sys.executable, "-m", "experiments.eval", "--workdir", str(wd)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {path}: not a readable JSON config file")


# --------------------------------------------------------------------------------------------
# Item 5: proposal files
# --------------------------------------------------------------------------------------------
def _npz(tmp_path, name="p.npz", **arrays):
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, message", [
    ({"img1": np.arange(40, dtype=np.float32).reshape(8, 5)},
     "image 'img1': boxes must have shape (R, 4) as (x1, y1, x2, y2), got (8, 5) (drop the score column"),
    ({"img1": np.zeros((2, 2, 4))}, "image 'img1': boxes must have shape (R, 4)"),
    ({"img1": np.zeros(8)}, "image 'img1': boxes must have shape (R, 4)"),
    ({"img1": np.array([[0, 0, np.nan, 4]])}, "image 'img1': box 0 has a NaN or infinite coordinate"),
    ({"img1": np.array([[0, 0, 5, 5], [0, 0, np.inf, 4]])}, "image 'img1': box 1 has a NaN"),
    ({"img1": np.array([["a", "b", "c", "d"]])}, "image 'img1': boxes must be numbers"),
    ({}, "holds no arrays"),
])
def test_proposal_file_schema(tmp_path, arrays, message):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(InputError) as e:
        load_proposal_file(path)
    assert str(e.value).startswith(path) and message in str(e.value)


def test_proposal_file_kinds_and_ids(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    npy = str(tmp_path / "boxes.npy")
    np.save(npy, np.zeros((3, 4), np.float32))
    text = tmp_path / "boxes.npz"
    text.write_text("0 0 10 10\n")
    for path, message in [(str(empty), "is empty"), (npy, "holds a single array of shape (3, 4)"),
                          (str(text), "is not an .npz archive"),
                          (str(tmp_path / "nope.npz"), "does not exist")]:
        with pytest.raises(InputError, match="expected an .npz archive|does not exist") as e:
            load_proposal_file(path)
        assert path in str(e.value) and message in str(e.value)
    good = str(tmp_path / "good.npz")
    save_proposal_file(good, {"a": np.array([[0, 0, 9, 9]]), "b": np.zeros((0, 4))})
    with pytest.raises(InputError, match=r"good.npz has no proposals for 2 image\(s\), e.g. 'c', 'd'"):
        load_proposal_file(good, ["a", "c", "b", "d"])
    out = load_proposal_file(good, ["a", "b"])  # the valid file still loads, (0, 4) included
    assert out["a"].tolist() == [[0, 0, 9, 9]] and out["b"].shape == (0, 4)


# --------------------------------------------------------------------------------------------
# Item 5: roi_pool_cells cells, NaN boxes, Geometry
# --------------------------------------------------------------------------------------------
FMAP = np.random.default_rng(3).standard_normal((7, 9, 3)).astype(np.float32)  # H=7, W=9
LEVELS = (2, 1)
GOOD_CELLS = np.array([[0, 0, 8, 6], [2, 1, 5, 4]], np.int32)
BAD_CELLS = np.array([[0, 0, 9, 6],      # x_end == W: out of the map
                      [4, 0, 1, 3],      # start > end
                      [-1, 0, 2, 2],     # negative start
                      [0, 5, 3, 7]], np.int32)  # y_end == H


@pytest.mark.parametrize("row", range(len(BAD_CELLS)))
def test_concrete_bad_cells_are_refused(row):
    cells = np.concatenate([GOOD_CELLS, BAD_CELLS[row:row + 1]])
    for c in (cells, jnp.asarray(cells)):
        with pytest.raises(InputError, match=re.escape(f"cells[2] = {BAD_CELLS[row].tolist()} is not "
                                                       f"inside the 7x9 map with start <= end")):
            roi_pool_cells(FMAP, c, LEVELS)


def test_cells_shape_and_dtype():
    with pytest.raises(InputError, match=r"shape \(R, 4\)"):
        roi_pool_cells(FMAP, np.zeros((2, 3), np.int32))
    with pytest.raises(InputError, match="integer"):
        roi_pool_cells(FMAP, GOOD_CELLS.astype(np.float32))


def test_bad_cells_under_jit_pool_to_nan_and_pass_no_gradient():
    cells = jnp.asarray(np.concatenate([GOOD_CELLS, BAD_CELLS]))
    pooled = jax.jit(lambda f, c: roi_pool_cells(f, c, LEVELS))
    out = np.asarray(pooled(FMAP, cells))
    assert np.isnan(out[2:]).all()  # every value of every bad window: never a real cell
    for (x0, y0, x1, y1), got in zip(GOOD_CELLS, out[:2]):  # good windows: brute force
        np.testing.assert_array_equal(got, pool_ref(FMAP[None, y0:y1 + 1, x0:x1 + 1], LEVELS)[0])
    g = jax.grad(lambda f: jnp.nansum(pooled(f, cells)))(jnp.asarray(FMAP))
    # Brute force: d(sum of bin maxima)/d(cell) counts the bins of the good windows whose
    # max the cell is (random floats: no ties); bad windows add nothing.
    want = np.zeros_like(FMAP)
    for x0, y0, x1, y1 in GOOD_CELLS:
        win = FMAP[y0:y1 + 1, x0:x1 + 1]
        for n in LEVELS:
            for by0, by1 in appendix_a_bins(win.shape[0], n):
                for bx0, bx1 in appendix_a_bins(win.shape[1], n):
                    for ch in range(FMAP.shape[2]):
                        b = win[by0:by1, bx0:bx1, ch]
                        iy, ix = np.unravel_index(np.argmax(b), b.shape)
                        want[y0 + by0 + iy, x0 + bx0 + ix, ch] += 1
    np.testing.assert_array_equal(g, want)


def test_nan_boxes_raise_when_concrete_and_pool_to_nan_under_jit():
    boxes = np.array([[0, 0, 150, 110], [np.nan, 0, 50, 50], [0, 0, np.inf, 50], [-np.inf, 0, 9, 9]],
                     np.float32)
    with pytest.raises(InputError, match=r"boxes\[1\] = \[nan, 0.0, 50.0, 50.0\] \(3 of 4\)"):
        spp_jax.roi_pool(FMAP, boxes, LEVELS, geometry=ZF)
    with pytest.raises(InputError, match="NaN or infinite"):
        spp_jax.project_boxes(boxes, ZF, FMAP.shape[:2], xp=np)
    out = np.asarray(jax.jit(lambda f, b: spp_jax.roi_pool(f, b, LEVELS, geometry=ZF))(FMAP, boxes))
    assert np.isnan(out[1:]).all() and not np.isnan(out[0]).any()
    np.testing.assert_array_equal(out[0], spp_jax.roi_pool(FMAP, boxes[:1], LEVELS, geometry=ZF)[0])
    cells = jax.jit(lambda b: spp_jax.project_boxes(b, ZF, FMAP.shape[:2]))(boxes)
    assert np.asarray(cells)[1:].tolist() == [list(INVALID_CELLS)] * 3


def test_huge_finite_boxes_clamp_instead_of_overflowing():
    # |x| / stride beyond int32 used to wrap around in the cast; now it clamps like any
    # window running past the map.
    big = np.array([[-1e30, -1e30, 1e30, 1e30], [1e30, 1e30, 2e30, 2e30]], np.float32)
    want = [[0, 0, 8, 6], [8, 6, 8, 6]]  # the whole map; the far corner cell
    assert spp_jax.project_boxes(big, ZF, (7, 9), xp=np).tolist() == want
    assert np.asarray(jax.jit(lambda b: spp_jax.project_boxes(b, ZF, (7, 9)))(big)).tolist() == want


@pytest.mark.parametrize("kw, field", [
    (dict(stride=16, offset=float("nan")), "offset"), (dict(stride=16, offset=float("inf")), "offset"),
    (dict(stride=16, offset=20, slack=float("nan")), "slack"),
    (dict(stride=16, offset=20, slack=float("-inf")), "slack"),
    (dict(stride=float("nan"), offset=0), "stride"), (dict(stride=float("inf"), offset=0), "stride"),
])
def test_geometry_rejects_non_finite_values(kw, field):
    with pytest.raises(InputError, match=f"Geometry.{field} must be a finite number"):
        spp_jax.Geometry(**kw)
