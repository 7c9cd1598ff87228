"""9. Host memory: the embedded train step with freed memory kept (spp_jax.host_memory, how
every entry point and this bench run) vs glibc's defaults.

The setting is fixed at process start, so each side is its own worker process (the same
step, the same batch) and the parent alternates them: one block of steps in one, then in
the other, many times; the ratio is the median over pairs. The same for the torch net, to
show what the allocator does for the reference (both sides of rows 3 run with it).

    python -m bench.host_memory --worker jax|torch --side 224   (a worker; reads step counts)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench.common import Config, Row, median
from spp_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(argv) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=("jax", "torch"), required=True)
    ap.add_argument("--side", type=int, required=True)
    a = ap.parse_args(argv)
    import jax
    from bench import backbone
    jstep, tc, model, _ = backbone.embedded_jax_step(a.side, jax.devices("cpu")[0])
    b = tc.batch_size
    if a.worker == "torch":
        del jstep
        backbone.setup_torch_threads()
        step = backbone.embedded_torch_step(a.side, tc, model.channels)
    else:
        step = jstep
    step()
    print("ready", flush=True)
    for line in sys.stdin:
        step()  # untimed: the other process just ran
        r0, ts = resource.getrusage(resource.RUSAGE_SELF), []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        n = len(ts)
        print(json.dumps({"s": median(ts), "faults": (r1.ru_minflt - r0.ru_minflt) / n,
                          "sys_ms": (r1.ru_stime - r0.ru_stime) / n * 1e3, "kept": host_memory.is_kept(),
                          "batch": b}),
              flush=True)


def _start(framework: str, side: int, kept: bool) -> subprocess.Popen:
    env = host_memory.with_glibc_defaults(os.environ)
    if kept:
        env = host_memory.with_kept_memory(dict(env, **{host_memory.ENV: "1"}))
    cmd = [sys.executable, "-m", "bench.host_memory", "--worker", framework, "--side", str(side)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{framework} worker at {side} px did not start")
    return p


def _ask(p: subprocess.Popen, steps: int) -> dict:
    p.stdin.write(f"{steps}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def compare(framework: str, side: int, pairs: int, steps: int = 3) -> Row:
    procs = {kept: _start(framework, side, kept) for kept in (False, True)}
    try:
        got = {False: [], True: []}
        for _ in range(pairs):
            for kept in (False, True):
                got[kept].append(_ask(procs[kept], steps))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=120)
    assert all(r["kept"] for r in got[True]) and not any(r["kept"] for r in got[False])
    ratios = sorted(d["s"] / k["s"] for d, k in zip(got[False], got[True]))
    q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]
    stat = lambda kept, key: median([r[key] for r in got[kept]])
    b = got[True][0]["batch"]
    return Row("9 host memory", f"{framework} embedded overfeat7 train step @{side}: freed memory kept "
               f"vs glibc defaults", b / stat(True, "s"), b / stat(False, "s"), "img/s", median(ratios), None,
               f"page faults per step {stat(False, 'faults'):.0f} -> {stat(True, 'faults'):.0f}, kernel time "
               f"{stat(False, 'sys_ms'):.0f} -> {stat(True, 'sys_ms'):.0f} ms; {len(ratios)} pairs of "
               f"{steps}-step blocks in two processes, ratio IQR {q(0.25):.2f}-{q(0.75):.2f}")


def run(cfg: Config) -> list[Row]:
    pairs = 6 if cfg.quick else 20
    return [compare(fw, side, pairs) for side in cfg.embedded_sizes for fw in ("jax", "torch")]


if __name__ == "__main__":
    _worker(sys.argv[1:])
