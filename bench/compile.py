"""6. Compilation: the 8 programs of multi-size training (180, 224) and multi-scale testing
(224, 256, 300, 360, 448, 560), cold (a fresh persistent-cache directory) and warm (a new
process reusing that directory).  Each measurement runs in its own child process
(``python -m bench.compile --cache DIR``), so nothing is cached in memory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from bench.common import Config, Row

GOAL = ("<=", 0.10)
TRAIN_SIZES = (180, 224)
TEST_SCALES = (224, 256, 300, 360, 448, 560)


def build_all(cache_dir: str, batch: int, arch: str = "zf5", device: str = "cpu") -> dict:
    from spp_jax.train.steps import enable_compilation_cache
    enable_compilation_cache(cache_dir)  # before the first compile of this process
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding
    from spp_jax import serve
    from spp_jax.models import get_model
    from spp_jax.train.state import create_state, make_optimizer
    from spp_jax.train.steps import CompiledSteps, make_eval_step, make_train_step

    dev = jax.devices(device)[0]
    model = get_model(arch, num_classes=1000)
    tx = make_optimizer(0.01)
    # Shapes only (model.init under eval_shape: nothing is computed or compiled here).
    abstract = jax.eval_shape(lambda k: create_state(
        model.init(k, jnp.zeros((1, 224, 224, 3), jnp.float32))["params"], tx), jax.random.key(0))
    sh = SingleDeviceSharding(dev)
    times, lower = {}, {}
    steps = CompiledSteps(make_train_step(model, tx, 0), make_eval_step(model), abstract, batch, sh, sh)
    for s in TRAIN_SIZES:
        t0 = time.perf_counter()
        steps.build(s)
        times[f"train {s}"] = time.perf_counter() - t0
    variables = {"params": abstract.params}
    for s in TEST_SCALES:  # the serving layer's conv program of each test scale (the dear one)
        images = jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32, sharding=sh)
        valid_hw = jax.ShapeDtypeStruct((2, 2), jnp.int32, sharding=sh)
        t0 = time.perf_counter()
        lowered = serve._conv.lower(model, variables, images, valid_hw, ())
        t1 = time.perf_counter()
        lowered.compile()
        times[f"test {s}"] = time.perf_counter() - t0
        lower[f"test {s}"] = t1 - t0
    return {"times": times, "total": sum(times.values()), "programs": len(times),
            "test_lower": sum(lower.values()), "test_total": sum(v for k, v in times.items() if k in lower)}


def _run_child(cache_dir: str, batch: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "bench.compile", "--cache", cache_dir, "--batch", str(batch),
           "--device", device]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"compile child failed: {p.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["process_wall"] = wall
    return out


def run(cfg: Config, device_kind: str = "cpu") -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="spp_bench_cache_") as d:
        cold = _run_child(d, cfg.compile_batch, device_kind)
        warm = _run_child(d, cfg.compile_batch, device_kind)
        n_files = sum(len(f) for _, _, f in os.walk(d))
    detail = ", ".join(f"{k} {cold['times'][k]:.1f}/{warm['times'][k]:.2f}" for k in cold["times"])
    return [Row("6 compile", f"{cold['programs']} programs (ZF-5, train batch {cfg.compile_batch}: "
                f"train 180, 224; test 224..560)", warm["total"], cold["total"], "s",
                warm["total"] / cold["total"], GOAL,
                f"ratio = warm / cold; spp_jax column = warm, reference = cold; per program cold/warm s: "
                f"{detail}; test programs warm {warm['test_total']:.2f} s of which tracing+lowering "
                f"(not cached) {warm['test_lower']:.2f} s; {n_files} cache files; child process wall cold {cold['process_wall']:.0f} s, "
                f"warm {warm['process_wall']:.0f} s")]


def _main(argv):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    print(json.dumps(build_all(a.cache, a.batch, device=a.device)))


if __name__ == "__main__":
    _main(sys.argv[1:])
