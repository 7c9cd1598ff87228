"""Run every benchmark in one process and write bench/results/bench.{md,json,png}.

    python -m bench.run [--quick] [--device cpu|gpu] [--only 1,2,...] [--out DIR]

--quick: fewer repeats, smaller batches for the backbones, no XLA-flag sweep
(same code paths); < 5 min on a 2-core CPU.  The full run takes < 30 min.
--device gpu selects the first JAX GPU and torch's CUDA device (untested here:
this machine has no GPU).  Compilation timings (6) run in child processes.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from bench.common import (RESULTS_DIR, Row, configure_pairs, describe_meta, machine_info, make_config,
                          markdown, write_results)

BENCHES = {
    1: "whole-map SPP vs adaptive_max_pool2d",
    2: "window SPP vs torchvision roi_pool",
    3: "backbones vs PyTorch",
    4: "fc6+fc7 with dedup",
    5: "detection per image: SPP vs R-CNN",
    6: "compilation cold vs warm",
    7: "window-SPP backward: conv + roi_pool fwd+bwd",
    8: "input pipeline vs the train step it feeds",
    9: "host memory: the train step with freed memory kept vs glibc defaults",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the < 5 min configuration")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--only", default="", help="comma-separated benchmark numbers (default: all)")
    ap.add_argument("--out", default=RESULTS_DIR, help="results directory")
    ap.add_argument("--name", default=None, help="results file stem (default bench or bench-quick)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = make_config(args.quick, args.device)
    configure_pairs(cfg)
    only = {int(x) for x in args.only.split(",") if x.strip()} or set(BENCHES)
    from bench.common import have_torch
    if not have_torch():
        print("bench needs torch and torchvision: run it in .venv-bench (make bench)", file=sys.stderr)
        return 2
    import jax
    from bench import backbone
    from bench.common import torch_device
    jdev = jax.devices(args.device)[0]
    backbone.setup_torch_threads()
    torch_device(cfg)  # fails early if --device gpu and torch has no CUDA
    meta = machine_info(args.device)
    meta["mode"] = cfg.mode
    meta["jax_device"] = str(jdev)
    from spp_jax import host_memory
    meta["host_malloc"] = host_memory.describe()
    print(describe_meta(meta), flush=True)
    t_start = time.perf_counter()
    rows: list[Row] = []

    def stage(num, fn):
        if num not in only:
            return
        t0 = time.perf_counter()
        print(f"\n== {num}. {BENCHES[num]}", flush=True)
        try:
            got = fn()
        except Exception as e:  # keep the other benchmarks' results
            traceback.print_exc()
            got = [Row(f"{num} {BENCHES[num].split(':')[0]}", "FAILED", note=f"{type(e).__name__}: {e}"[:300])]
        rows.extend(got)
        print(markdown(got), flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)

    peak = {"peak": float("nan")}
    if only & {3, 4}:
        peak = backbone.matmul_peak(cfg, jdev)
        rows.append(Row("0 machine", f"f32 matmul {peak['n']}^3 (best of runs)", peak["jax"], peak["torch"],
                        "GFLOP/s", None, None, f"peak used below = {peak['peak']:.0f} GFLOP/s"))
        print(markdown(rows), flush=True)

    from bench import compile as compile_bench, detection, fc, spp_whole, spp_window
    stage(1, lambda: spp_whole.run(cfg, jdev))
    stage(2, lambda: spp_window.run(cfg, jdev))
    stage(3, lambda: backbone.run(cfg, jdev, peak))
    stage(4, lambda: fc.run(cfg, jdev, peak))
    stage(5, lambda: detection.run(cfg, jdev))
    stage(6, lambda: compile_bench.run(cfg, args.device))
    from bench import roi_grad
    stage(7, lambda: roi_grad.run(cfg, jdev))
    from bench import pipeline
    stage(8, lambda: pipeline.run(cfg, jdev))
    from bench import host_memory as host_bench
    stage(9, lambda: host_bench.run(cfg))

    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    name = args.name or ("bench-quick" if cfg.quick else "bench")
    paths = write_results(rows, meta, args.out, name)
    print("\n# Results\n")
    print(describe_meta(meta))
    print()
    print(markdown(rows))
    print("\nwritten: " + ", ".join(p for p in paths.values() if p))
    failed = [r for r in rows if r.case == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    # Both sides of every comparison run in this process, so both get the allocator the
    # entry points use (spp_jax.host_memory; row 9 measures what it does for each).
    from spp_jax import host_memory
    host_memory.restart_with_kept_memory()
    sys.exit(main())
