"""The multi-host path, run for real: two processes on this machine (CPU, jax.distributed on
localhost, gloo collectives), each loading its own shard, against a one-process run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from spp_jax.train import train
from spp_jax.train.checkpoint import checkpoint_steps
from spp_jax.train.testing import flat_params, tiny_config, tiny_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One input size, no validation: one compiled program per process keeps the module fast.
SETTINGS = ["sizes=48", "size_schedule=single", "eval_every=0", "epochs=2", "decay_epochs=1"]
STEPS = 6  # 24 images / global batch 8 = 3 steps per epoch, 2 epochs
# The 2-process step all-reduces two partial gradient sums (another summation order than
# one process): equal to float32 rounding, as for 4 devices in test_train_sharding.py.
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, out_prefix, extra=(), delay=0.0):
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   SPP_JAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   SPP_JAX_NUM_PROCESSES="2", SPP_JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                   SPP_JAX_HEARTBEAT_TIMEOUT="5")  # a dead peer is noticed within 5 s
        env.pop("XLA_FLAGS", None)  # one CPU device per process
        cmd = [sys.executable, "-m", "spp_jax.train.testing", workdir, "--out", f"{out_prefix}{i}.npz",
               "--delay", str(delay), *SETTINGS, *extra]
        with open(f"{out_prefix}{i}.log", "w") as log:  # a file: a full pipe would block the child
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log))
    return procs


def _finish(procs, out_prefix, timeout):
    """Wait for the processes (killing any still running after ``timeout``); their logs."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [_read(f"{out_prefix}{i}.log") for i in range(len(procs))]


def _read(path):
    with open(path) as f:
        return f.read()


def _cfg():
    return tiny_config(sizes=(48,), size_schedule="single", eval_every=0, epochs=2, decay_epochs=(1,))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 2-process run (subprocesses) and, meanwhile, the 1-process run (here)."""
    root = tmp_path_factory.mktemp("multihost")
    procs = _launch(str(root / "two"), str(root / "p"))
    data = tiny_data()
    one = train(_cfg(), str(root / "one"), data)
    errs = _finish(procs, str(root / "p"), timeout=150)
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return root, flat_params(one.state.params), data.loaded


def test_two_processes_equal_one_process(reference):
    root, params, one_loaded = reference
    info = [json.loads(_read(root / f"p{i}.npz.json")) for i in range(2)]
    assert [i["step"] for i in info] == [STEPS, STEPS]
    # each process loaded only its own half of every global batch of 8 (4 per process)
    shards = [np.array(i["train_indices"]).reshape(STEPS, 4) for i in info]
    np.testing.assert_array_equal(np.concatenate(shards, axis=1).ravel(), one_loaded)
    for i in range(2):
        with np.load(root / f"p{i}.npz") as z:
            assert set(z.files) == set(params)
            for k in params:
                np.testing.assert_allclose(z[k], params[k], rtol=RTOL, atol=ATOL, err_msg=k)
    # only process 0 wrote the bookkeeping; the checkpoints hold the final step
    steps = [json.loads(ln)["step"] for ln in _read(root / "two" / "metrics.jsonl").splitlines()
             if '"train"' in ln]
    assert steps == list(range(1, STEPS + 1))
    assert checkpoint_steps(root / "two" / "checkpoints")[-1] == STEPS


def test_killing_one_process_leaves_a_resumable_checkpoint(reference, tmp_path):
    _, params, _ = reference
    wd = str(tmp_path / "run")
    procs = _launch(wd, str(tmp_path / "p"), ["checkpoint_every=1"], delay=0.3)
    try:
        deadline = time.time() + 120
        while not checkpoint_steps(os.path.join(wd, "checkpoints")):
            assert all(p.poll() is None for p in procs), "a process exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGKILL)
        # the survivor stops with an error once its peer misses heartbeats (5 s here): no hang
        assert procs[0].wait(timeout=60) != 0
    finally:
        _finish(procs, str(tmp_path / "p"), timeout=30)
    steps = checkpoint_steps(os.path.join(wd, "checkpoints"))
    assert steps and steps[-1] < STEPS, steps
    # the newest checkpoint restores (verified) and the run completes on one process with
    # the parameters of the uninterrupted runs (the global batches do not depend on the
    # process count)
    r = train(_cfg(), wd, tiny_data())
    assert r.resumed_from == steps[-1]
    got = flat_params(r.state.params)
    for k in params:
        np.testing.assert_allclose(got[k], params[k], rtol=RTOL, atol=ATOL, err_msg=k)
