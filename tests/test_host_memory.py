"""spp_jax.host_memory: an entry point restarted with freed memory kept stops page-faulting
its CPU train step's buffers in on every step.

The reference is the kernel's own count of minor page faults (getrusage), in fresh
processes: one started as the entry points start (restart_with_kept_memory), one with
``$SPP_JAX_KEEP_FREED_MEMORY=0`` as the control that shows the faults exist on this jaxlib.
"""
import json
import os
import subprocess
import sys

import pytest

from spp_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, resource
from spp_jax import host_memory
host_memory.restart_with_kept_memory()
import jax, jax.numpy as jnp, numpy as np
from spp_jax.train.config import build_model, get_config
from spp_jax.train.state import create_state, optimizer_from_config
from spp_jax.train.steps import CompiledSteps, make_eval_step, make_train_step
# The embedded Overfeat-7 train step at 180 px, batch 32, as `make train` compiles it: its
# conv weight gradients' Eigen packing buffers (up to ~140 MB) are far above what a thread
# arena holds, so with glibc's defaults they are mmapped and faulted in on every step.
tc = get_config("embedded", ["model=overfeat7"])
model, tx = build_model(tc, 10), optimizer_from_config(tc, 100)
rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
state = jax.device_put(create_state(model.init(jax.random.key(0), jnp.zeros((1, 180, 180, 3)))["params"], tx), rep)
steps = CompiledSteps(make_train_step(model, tx, 0), make_eval_step(model), jax.eval_shape(lambda s: s, state),
                      tc.batch_size, rep, rep)
rng = np.random.default_rng(0)
batch = jax.device_put({"image": jnp.asarray(rng.standard_normal((tc.batch_size, 180, 180, 3), np.float32)),
                        "label": jnp.asarray(rng.integers(0, 10, tc.batch_size).astype(np.int32))}, rep)
# The heap settles into reusing its blocks within a few steps: warm up 4, then the median of 8.
faults = []
for i in range(12):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, m = steps(180, state, batch)
    m["loss"].block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"faults_per_step": sorted(faults[4:])[4], "kept": host_memory.is_kept(),
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""), "line": host_memory.describe()}))
"""


def _run(keep: bool) -> dict:
    env = host_memory.with_glibc_defaults(os.environ)
    env.update({host_memory.ENV: "1" if keep else "0", "PYTHONPATH": ROOT})  # "1": it restarts itself
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.is_glibc(), reason="glibc's malloc only")
def test_restarted_process_stops_the_per_call_page_faults():
    control, kept = _run(False), _run(True)
    assert not control["kept"] and control["tunables"] == "" and "=0" in control["line"]
    assert kept["kept"] and "glibc.malloc.arena_max=1" in kept["tunables"]
    if control["faults_per_step"] < 5000:  # 20 MB
        pytest.skip(f"this jaxlib does not fault its buffers in per step "
                    f"({control['faults_per_step']} faults): nothing to keep")
    # Kept: the buffers come back from the heap. A few stray faults are allowed (thread stacks,
    # bookkeeping): 0 alone, 183 beside another test process, against 17,600 for the control.
    assert kept["faults_per_step"] < 0.03 * control["faults_per_step"], (kept, control)


def test_tunables_are_added_to_the_users_own_and_never_override_them():
    env = host_memory.with_kept_memory({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.x=1", "A": "b"})
    got = dict(kv.split("=", 1) for kv in env["GLIBC_TUNABLES"].split(":"))
    assert got["glibc.malloc.arena_max"] == "4" and got["glibc.x"] == "1"  # the user's, kept
    assert got["glibc.malloc.mmap_max"] == "0" and env["A"] == "b"
    assert host_memory.with_kept_memory({})["GLIBC_TUNABLES"] == ":".join(
        f"{k}={v}" for k, v in host_memory.SETTINGS)
    assert not host_memory.enabled({"SPP_JAX_KEEP_FREED_MEMORY": "no"}) and host_memory.enabled({})
