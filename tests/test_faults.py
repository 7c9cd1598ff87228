"""Fault injection (issue 12): everyday mistakes and damaged files must never lose a run.

One tiny `make train` workdir is trained once (module fixture) and copied per test; every
test asserts the safe behaviour against the workdir's file tree hashed before and after.
"""
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import eval as eval_main
from experiments import train as train_main
from spp_jax.errors import CheckpointMismatch, NonFiniteError
from spp_jax.train import train
from spp_jax.train.checkpoint import Checkpointer, checkpoint_steps, read_checkpoint
from spp_jax.train.config import get_config, load_config
from spp_jax.train.testing import TEST_CACHE_DIR, HookedData, tiny_config, tiny_data
from spp_jax.train.workdir import WorkdirLock, config_changes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 images / batch 16 = 4 steps per epoch, 2 epochs, a checkpoint per step (the last 3 kept)
ARGS = ["model=zf5", "width=0.0625", "fc_dim=32", "train_examples=64", "val_examples=16", "epochs=2",
        "decay_epochs=10", "sizes=64", "eval_size=64", "protocols=1crop", "batch_size=16",
        "eval_batch_size=16", "mean_samples=16", "log_every=1", "checkpoint_every=1", "eval_every=0",
        "progress=false",
        "plot=false", f"compile_cache_dir={TEST_CACHE_DIR}"]
STEPS = [6, 7, 8]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    return env


def _tree(workdir):
    """{relative path: sha256} of every file (and directory) under workdir."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(workdir):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), workdir) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, workdir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("faults") / "trained")
    r = subprocess.run([sys.executable, "-m", "experiments.train", "--workdir", wd, *ARGS], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_steps(os.path.join(wd, "checkpoints")) == STEPS
    return wd


@pytest.fixture
def workdir(trained, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(trained, wd)
    return wd


def _run_train(workdir, *extra):
    """experiments.train in this process: its exit message (None for success)."""
    try:
        train_main.main(["--workdir", workdir, *ARGS, *extra])
    except SystemExit as e:
        return str(e.code)
    return None


def _read(workdir):
    """What voc_cls, caltech101 and detection backbones do (spp_jax.pretrained): (variables, meta)."""
    from spp_jax.pretrained import read_workdir
    from spp_jax.train.config import build_model, load_config, trained_num_classes
    cfg = load_config(workdir)
    return read_workdir(workdir, cfg, build_model(cfg, trained_num_classes(cfg)))


def _records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f]


def _damage_newest(workdir, how):
    latest = os.path.join(workdir, "checkpoints", str(STEPS[-1]))
    chunk = max(glob.glob(os.path.join(latest, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    with open(chunk, "r+b") as f:
        if how == "truncate":
            f.truncate(os.path.getsize(chunk) // 2)
        else:  # flip 16 bytes in the middle of the data chunk
            f.seek(os.path.getsize(chunk) // 2)
            data = f.read(16)
            f.seek(os.path.getsize(chunk) // 2)
            f.write(bytes(b ^ 0xFF for b in data))


# ---- item 1: config mismatch is not corruption; readers never change a workdir ---------

def test_changed_architecture_key_stops_before_touching_a_file(workdir):
    before = _tree(workdir)
    msg = _run_train(workdir, "width=0.125", "fc_dim=64")
    assert msg.startswith("error: ") and "\n" not in msg
    assert "width 0.0625 -> 0.125" in msg and "fc_dim 32 -> 64" in msg
    assert "overwrite=true" in msg and "--workdir" in msg and "config.json" in msg
    assert _tree(workdir) == before  # checkpoints, config.json, metrics.jsonl, data: untouched


def test_eval_with_a_changed_key_reads_nothing_and_writes_nothing(workdir):
    os.remove(os.path.join(workdir, "mean_image.npy"))  # eval would have to recreate it
    before = _tree(workdir)
    with pytest.raises(SystemExit, match=r"^error: .*fc_dim 32 -> 64.*drop those overrides"):
        eval_main.main(["--workdir", workdir, "fc_dim=64"])
    assert _tree(workdir) == before


def test_checkpoint_of_another_network_is_a_mismatch_not_corruption(workdir):
    # no config.json to compare with: the stored shapes tell (trainer and readers alike)
    os.remove(os.path.join(workdir, "config.json"))
    before = _tree(workdir)
    with pytest.raises(CheckpointMismatch, match=r"checkpoint 8 .* another network .*fc6/kernel: "
                                                 r"stored \(\d+, 32\) float32, expected \(\d+, 64\)"):
        read_checkpoint(os.path.join(workdir, "checkpoints"), _abstract(fc_dim=64))
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt, pytest.raises(CheckpointMismatch):
        ckpt.restore(_abstract(fc_dim=64))
    assert _tree(workdir) == before


def test_reader_skips_a_corrupt_checkpoint_and_moves_nothing(workdir):
    # what voc_cls / caltech101 / detection backbones call
    _damage_newest(workdir, "truncate")
    before = _tree(workdir)
    with pytest.warns(RuntimeWarning, match="checkpoint 8 .* is corrupt.*skipping it"):
        variables, meta = _read(workdir)
    assert meta["step"] == 7
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
    assert _tree(workdir) == before


def test_reader_leaves_a_running_trainers_tmp_dir_alone(workdir):
    # an in-flight async save of the trainer, as orbax names it while writing
    tmp = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1733000000")
    shutil.copytree(os.path.join(workdir, "checkpoints", "8"), tmp)
    before = _tree(workdir)
    _, meta = _read(workdir)
    assert meta["step"] == 8  # the unfinished save is not a checkpoint
    assert _tree(workdir) == before


def test_flipped_bytes_are_detected_reader_skips_trainer_sets_aside(workdir):
    clean = _read(workdir)[0]
    _damage_newest(workdir, "flip")
    before = _tree(workdir)
    with pytest.warns(RuntimeWarning, match="checkpoint 8 .* fail their SHA-256 check"):
        variables, meta = _read(workdir)
    assert meta["step"] == 7 and _tree(workdir) == before
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(variables)))
    # the trainer (one more epoch may be added on resume) moves it aside and resumes from 7
    with pytest.warns(RuntimeWarning, match="moving it to corrupt_checkpoints"):
        assert _run_train(workdir, "epochs=3") is None
    assert [n.split("-")[0] for n in os.listdir(os.path.join(workdir, "corrupt_checkpoints"))] == ["8"]
    assert checkpoint_steps(os.path.join(workdir, "checkpoints")) == [10, 11, 12]
    steps = [r["step"] for r in _records(workdir) if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # the records after step 7 were redone once


def test_overwrite_moves_the_old_run_aside(workdir):
    before = _tree(workdir)
    assert _run_train(workdir, "overwrite=true") is None
    prev = [d for d in os.listdir(workdir) if d.startswith("previous-")]
    assert len(prev) == 1
    moved = _tree(os.path.join(workdir, prev[0]))
    kept = {k: v for k, v in before.items() if k.split("/")[0] not in ("data", ".lock")}
    assert kept and all(moved[k] == v for k, v in kept.items())  # every old file, byte for byte
    assert checkpoint_steps(os.path.join(workdir, "checkpoints")) == STEPS
    assert load_config(workdir).overwrite is False  # rerunning the command resumes


def test_resumable_keys_and_epochs():
    a = get_config("embedded", ["epochs=12", "decay_epochs=9,11"])
    assert config_changes(a, get_config("embedded", ["epochs=20", "decay_epochs=9,11", "log_every=5",
                                                     "protocols=1crop", "eval_limit=10"])) == []
    b = get_config("embedded", ["epochs=12", "decay_epochs=none"])
    assert config_changes(b, get_config("embedded", ["epochs=20", "decay_epochs=none"])) == [
        "decay epochs 6,10 -> 10,17 (derived from epochs; set decay_epochs=6,10 to keep them)"]
    nan = dataclasses.replace(a, learning_rate=float("nan"))  # as an unchecked config may hold
    assert config_changes(nan, dataclasses.replace(a, learning_rate=float("nan"))) == []
    assert config_changes(a, get_config("embedded", ["epochs=12", "decay_epochs=9,11", "spp=false",
                                                     "seed=3"])) == ["spp True -> False", "size_schedule multi -> single",
                                                                       "sizes 180,224 -> 224", "seed 0 -> 3"]


# ---- item 2: one writer per workdir; no hang ------------------------------------------

def test_second_trainer_exits_at_once_naming_the_holder(workdir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spp_jax.train.workdir import WorkdirLock\n"
         "with WorkdirLock(sys.argv[1]):\n print('locked', flush=True); time.sleep(120)", workdir],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(workdir)
        msg = _run_train(workdir)
        assert msg.startswith("error: ") and f"PID {holder.pid}" in msg
        assert _tree(workdir) == before  # metrics.jsonl not truncated, config.json not rewritten
        # readers work meanwhile
        assert _read(workdir)[1]["step"] == 8
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the OS releases the lock
        holder.wait(timeout=30)
        holder.stdout.close()
    with WorkdirLock(workdir):
        pass


# ---- item 3: the NaN guard -------------------------------------------------------------

# learning_rate=nan / 1e4 and input_scale=nan are now refused by the config check
# (tests/test_faults_inputs.py); these values pass it and still diverge. input_norm=none:
# the preset's gray_std standardises each image, which would undo the huge input scale.
# 1e38 overflows the pixels to inf, so conv1 mixes +inf and -inf into NaN. (1e30 used to
# diverge through LRN's autodiff gradient, inf * 0; the hand-written one saturates to exact
# zeros there, the float32 limit of the true gradient, so that run now trains on.)
@pytest.mark.parametrize("bad, step, own_process", [("input_scale=1e38 input_norm=none", 1, True),
                                                    ("learning_rate=1 optimizer=sgd", None, False)])
def test_non_finite_training_stops_with_a_clear_error(trained, tmp_path, bad, step, own_process):
    wd = str(tmp_path / "run")
    args = [*bad.split(), f"data_dir={os.path.join(trained, 'data')}"]  # the generated data, reused
    if own_process:  # the real exit code, and no hang at exit (timeout)
        r = subprocess.run([sys.executable, "-m", "experiments.train", "--workdir", wd, *ARGS, *args],
                           env=_env(), capture_output=True, text=True, timeout=240)
        assert r.returncode == 1
        err = r.stderr.strip().splitlines()[-1]
    else:
        err = _run_train(wd, *args)
    assert err.startswith("error: training diverged at step ") and "lower learning_rate" in err
    failed = int(err.split("step ")[1].split(":")[0])
    assert failed == step if step else failed > 1
    saved = checkpoint_steps(os.path.join(wd, "checkpoints"))
    assert all(s < failed for s in saved)
    abstract = _abstract(optimizer="sgd") if "optimizer=sgd" in bad else _abstract()
    for s in saved:  # every saved checkpoint is intact and finite
        _, meta, got = read_checkpoint(os.path.join(wd, "checkpoints"), abstract, step=s)
        assert got == s and "integrity" in meta
    losses = [r["loss"] for r in _records(wd) if r["kind"] == "train"]
    assert len(losses) == failed - 1 and all(np.isfinite(losses))
    assert not os.path.exists(os.path.join(wd, "eval.json"))  # no table from a broken model


def _abstract(**changes):
    """The TrainState this module's config (with `changes`) expects, as ShapeDtypeStructs."""
    from spp_jax.train.config import build_model, trained_num_classes
    from spp_jax.train.state import create_state, optimizer_from_config
    cfg = dataclasses.replace(get_config("embedded", ARGS), **changes)
    model, tx = build_model(cfg, trained_num_classes(cfg)), optimizer_from_config(cfg, 1)
    return jax.eval_shape(lambda k: create_state(model.init(k, np.zeros((1, 64, 64, 3), np.float32))
                                                 ["params"], tx), jax.random.key(0))


def _nan_from(step, steps_per_epoch):
    """A HookedData hook: NaN training images from global step `step` (1-based) on."""
    def hook(epoch, position, batch):
        if epoch * steps_per_epoch + position >= step:
            return dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch
    return hook


def test_divergence_mid_run_keeps_the_good_checkpoints(tmp_path):
    wd = str(tmp_path / "run")
    cfg = tiny_config(checkpoint_every=1, log_every=3)
    with pytest.raises(NonFiniteError, match="diverged at step 7: .* lower learning_rate"):
        train(cfg, wd, HookedData(tiny_data(), _nan_from(7, 3)))
    # steps 1..6 were checkpointed (the last 3 kept); nothing from step 7 on
    assert checkpoint_steps(os.path.join(wd, "checkpoints")) == [4, 5, 6]
    r = train(cfg, wd, tiny_data())  # the good state resumes
    assert r.resumed_from == 6 and int(r.state.step) == 9


def test_checkpointer_refuses_a_non_finite_state_and_eval_refuses_one(workdir):
    ckpt_dir = os.path.join(workdir, "checkpoints")
    state, meta, _ = read_checkpoint(ckpt_dir, _abstract())
    bad = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    with Checkpointer(ckpt_dir) as ckpt, pytest.raises(NonFiniteError, match="refusing to save"):
        ckpt.save(9, bad, meta)
    # a NaN checkpoint as the code before the guard wrote them (no integrity record)
    with ocp.CheckpointManager(ckpt_dir, item_names=("state", "meta")) as m:
        m.save(9, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                          meta=ocp.args.JsonSave({"epoch": 2, "step": 9})))
    with pytest.raises(SystemExit, match=r"^error: checkpoint 9 .* NaN or infinite values"):
        eval_main.main(["--workdir", workdir])
