"""Checkpoint / resume: SIGKILL mid-epoch + restart == uninterrupted run (bit-exact on CPU),
corrupt-latest-checkpoint fallback, Ctrl-C saves a checkpoint."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from spp_jax.train import Checkpointer, train
from spp_jax.train.testing import HookedData, flat_params, tiny_config, tiny_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 9  # 24 images / batch 8 = 3 steps per epoch, 3 epochs


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


def _committed_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its workdir and final params."""
    wd = str(tmp_path_factory.mktemp("ref"))
    r = train(tiny_config(), wd, tiny_data())
    assert int(r.state.step) == TOTAL_STEPS and r.resumed_from is None
    return wd, flat_params(r.state.params)


def _assert_params_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        # Exact: CPU XLA programs are deterministic and a resumed run replays the same
        # batches, dropout keys (seed, step) and learning rates.
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(reference, tmp_path):
    ref_wd, ref_params = reference
    wd = str(tmp_path / "run")
    out = str(tmp_path / "final.npz")
    cmd = [sys.executable, "-m", "spp_jax.train.testing", wd]
    proc = subprocess.Popen(cmd + ["--delay", "0.5"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not _committed_steps(wd):
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    steps = _committed_steps(wd)
    assert steps and steps[-1] < TOTAL_STEPS, steps
    killed_at = steps[-1]
    meta = json.load(open(os.path.join(wd, "checkpoints", str(killed_at), "meta", "metadata")))
    assert meta["position"] > 0 and meta["data_state"]["position"] == meta["position"]  # mid-epoch
    # metrics of the killed run go up to where it died, possibly past the checkpoint
    r = subprocess.run(cmd + ["--out", out], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.load(open(out + ".json"))
    assert info["resumed_from"] == killed_at and info["step"] == TOTAL_STEPS
    with np.load(out) as z:
        _assert_params_equal({k: z[k] for k in z.files}, ref_params)
    # metrics.jsonl has exactly one record per step after the resume truncated it
    recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [0, 1, 2]


def _abstract_state(wd):
    from spp_jax.train.config import build_model
    from spp_jax.train.sharding import make_mesh, replicated
    from spp_jax.train.state import create_state, optimizer_from_config
    from spp_jax.train.steps import abstract_with_sharding
    cfg = tiny_config()
    model = build_model(cfg, 4)
    tx = optimizer_from_config(cfg, 3)
    ab = jax.eval_shape(lambda k: create_state(model.init(k, np.zeros((1, 48, 48, 3), np.float32))
                                               ["params"], tx), jax.random.key(0))
    return abstract_with_sharding(ab, replicated(make_mesh()))


@pytest.mark.parametrize("damage", ["truncate_data", "delete_meta"])
def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path, damage):
    ref_wd, ref_params = reference
    wd = str(tmp_path / "run")
    shutil.copytree(ref_wd, wd, ignore=shutil.ignore_patterns("jax_cache"))
    steps = _committed_steps(wd)
    assert steps[-1] == TOTAL_STEPS and len(steps) == 3  # keep the last k = 3
    latest = os.path.join(wd, "checkpoints", str(steps[-1]))
    if damage == "truncate_data":
        files = glob.glob(os.path.join(latest, "state", "**", "d", "*"), recursive=True)
        big = max(files, key=os.path.getsize)
        with open(big, "r+b") as f:
            f.truncate(os.path.getsize(big) // 2)
    else:
        os.remove(os.path.join(latest, "meta", "metadata"))
    ck = Checkpointer(os.path.join(wd, "checkpoints"), 3)
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = ck.restore(_abstract_state(wd))
    ck.close()
    assert got is not None
    _, meta, step = got
    assert step == steps[-2] and meta["step"] == step
    assert not os.path.exists(latest)  # moved aside
    assert os.listdir(os.path.join(wd, "corrupt_checkpoints"))
    # training resumes from the previous checkpoint and ends where the reference ended
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = train(tiny_config(), wd, tiny_data())
    assert r.resumed_from == steps[-2]
    _assert_params_equal(flat_params(r.state.params), ref_params)


def _interrupt_at(at_epoch, at_batch):
    """A HookedData hook that sends SIGINT to this process when batch `at_batch` of
    `at_epoch` is fetched."""
    def hook(epoch, position, batch):
        if (epoch, position) == (at_epoch, at_batch):
            os.kill(os.getpid(), signal.SIGINT)
        return batch
    return hook


def test_ctrl_c_saves_checkpoint_and_resumes(reference, tmp_path):
    _, ref_params = reference
    wd = str(tmp_path / "run")
    # SIGINT while fetching batch 2 of epoch 1 (global step 5, not a checkpoint step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), wd, HookedData(tiny_data(), _interrupt_at(1, 2)))
    assert _committed_steps(wd)[-1] == 5
    r = train(tiny_config(), wd, tiny_data())
    assert r.resumed_from == 5
    _assert_params_equal(flat_params(r.state.params), ref_params)
