"""Shared pieces of the benchmarks: config, timing, the result row and table writer.

Nothing here imports torch, and JAX only lazily, so the table writer and the
config are testable in the project venv (tests/test_bench.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class Config:
    """What every benchmark runs; ``quick`` shrinks repeats and batch sizes, not the code."""

    quick: bool = False
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 7
    min_seconds: float = 6.0  # cheap kernels: repeat until this much timed work (see time_pair)
    # 1. whole-map SPP
    spp_shapes: tuple = ((128, 13, 13, 256), (128, 10, 10, 256), (32, 18, 18, 512))
    # 2. window SPP
    windows: int = 2000
    window_map: tuple = (42, 56, 256)
    # 3. backbones
    backbones: tuple = ("zf5", "overfeat7")
    batch: int = 32
    batch_overfeat: int = 32
    big_image: tuple = (688, 917)
    bb_repeats: int = 3
    train_repeats: int = 2
    matmul_n: int = 4096
    flag_variants: bool = True
    lrn_variants: tuple = ("library (separable, hand-written backward)", "pow",
                          "reduce_window (before 2026-12-06)", "none (bound)")
    fc_repeats: int = 5
    flag_train_batch: int = 8  # train step of the XLA-flag sweep (0: forward only)
    # 5. detection
    rcnn_windows: int = 128  # R-CNN is timed on this many windows and extrapolated
    det_repeats: int = 2
    # 6. compilation
    compile_batch: int = 32
    # every comparison: pairs until the median ratio is stable (bench.common.time_pair_samples)
    pair_tol: float = 0.03
    min_pairs: int = 7
    max_pair_seconds: float = 60.0
    embedded_sizes: tuple = (180, 224)  # the embedded preset's own train step
    # 8. input pipeline
    pipeline_examples: int = 2000  # generated training images (the per-image cost does not
    pipeline_batches: int = 60     # depend on how many); batches timed alone; steps per
    pipeline_steps: int = 20       # timed call, fed vs resident

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


def make_config(quick: bool = False, device: str = "cpu") -> Config:
    if not quick:
        return Config(quick=False, device=device)
    return Config(quick=True, device=device, warmup=1, repeats=3, min_seconds=1.0,
                  spp_shapes=((128, 13, 13, 256), (128, 10, 10, 256), (32, 18, 18, 512)),
                  batch=8, batch_overfeat=4, bb_repeats=2, train_repeats=1,
                  flag_variants=False, rcnn_windows=32, fc_repeats=1,
                  lrn_variants=("library (separable, hand-written backward)", "none (bound)"), det_repeats=1, compile_batch=8,
                  pair_tol=0.05, min_pairs=5, max_pair_seconds=15.0,
                  pipeline_examples=800, pipeline_batches=20, pipeline_steps=8)


# --------------------------------------------------------------------------- rows and table

@dataclasses.dataclass
class Row:
    """One line of the result table.

    ``ratio`` is what the goal is stated in: for a comparison it is
    reference time / spp_jax time (> 1: spp_jax faster); for an efficiency row
    it is a fraction (of peak, or warm / cold).  Comparisons use the median over
    back-to-back pairs of (reference / spp_jax), see :func:`time_pair_samples`.  ``goal`` is ``(op, value)``
    with op ``">="`` or ``"<="``.
    """

    bench: str
    case: str
    jax: float | None = None
    ref: float | None = None
    unit: str = ""
    ratio: float | None = None
    goal: tuple | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.ratio is None or not math.isfinite(self.ratio):
            return None
        op, v = self.goal
        return self.ratio >= v if op == ">=" else self.ratio <= v

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["met"] = self.met
        return d


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def goal_text(goal) -> str:
    if goal is None:
        return ""
    op, v = goal
    return f"{'≥' if op == '>=' else '≤'} {_fmt(float(v))}"


def markdown(rows: Sequence[Row]) -> str:
    """The result table (one line per row) in markdown."""
    head = ["#", "case", "spp_jax", "reference", "unit", "ratio", "goal", "met", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        met = r.met
        cells = [r.bench, r.case, _fmt(r.jax), _fmt(r.ref), r.unit,
                 _fmt(r.ratio), goal_text(r.goal), "" if met is None else ("yes" if met else "**no**"),
                 r.note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: Sequence[Row], meta: dict, out_dir: str = RESULTS_DIR, name: str = "bench",
                  png: bool = True) -> dict:
    """Write ``name.md``, ``name.json`` and (optionally) ``name.png`` into out_dir; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    md = "# spp_jax benchmark ({})\n\n{}\n\n{}\n".format(meta.get("mode", "?"), describe_meta(meta),
                                                      markdown(rows))
    data = {"meta": meta, "rows": [r.as_dict() for r in rows]}
    paths = {}
    for ext, text in (("md", md), ("json", json.dumps(data, indent=2, default=str) + "\n")):
        path = os.path.join(out_dir, f"{name}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        paths[ext] = path
    if png:
        paths["png"] = plot_ratios(rows, os.path.join(out_dir, f"{name}.png"), meta)
    return paths


def plot_ratios(rows: Sequence[Row], path: str, meta: dict | None = None) -> str | None:
    """Horizontal bar chart of every row's ratio with its goal marked (log x axis)."""
    rows = [r for r in rows if r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(rows) + 1.5))
    labels = [f"{r.bench} {r.case}"[:64] for r in rows]
    colors = ["#999999" if r.met is None else ("#2a9d4b" if r.met else "#d1495b") for r in rows]
    y = range(len(rows))[::-1]
    ax.barh(list(y), [r.ratio for r in rows], color=colors)
    for yi, r in zip(y, rows):
        if r.goal is not None:
            ax.plot([r.goal[1]] * 2, [yi - 0.4, yi + 0.4], color="black", lw=1.5)
        ax.text(r.ratio, yi, f" {_fmt(r.ratio)}", va="center", fontsize=7)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("ratio (speed-up vs reference, or fraction of peak / of cold); black tick = goal")
    title = "spp_jax benchmark"
    if meta:
        title += f" ({meta.get('mode', '')}, {meta.get('cpu', '')}, {meta.get('cores', '')} cores)"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(left=0.42)  # room for the row labels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    import importlib.metadata as md
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "device": device}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except ImportError:
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def describe_meta(meta: dict) -> str:
    keys = ["mode", "cpu", "cores", "device", "python", "jax", "jaxlib", "flax", "numpy", "torch",
            "torchvision", "torch_threads", "xla_flags", "seconds"]
    return "\n".join(f"- {k}: {meta[k]}" for k in keys if k in meta and meta[k] not in (None, ""))


# --------------------------------------------------------------------------- timing

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def steady_call(fn: Callable[[], Any]) -> float:
    """Seconds per call of ``fn()`` as a loop sees it: one untimed call, then the mean of
    ``BLOCK`` back-to-back timed calls.

    Why not one call after a short sleep (the protocol up to 2026-12-03): a call that starts
    after the other library's work or after a sleep pays for waking its own worker threads and
    reloading its data, and that cost is not the same for both libraries. Measured
    2026-12-04 in one process (the 2-core AMD EPYC): ``spp_jax.pool`` forward+backward on
    128x10x10x256 took 10-12 ms back to back, 14-20 ms right after a torch call and 15-22 ms
    after a 50 ms sleep, while torch's 13-17 ms barely moved; the old protocol reported 0.91x
    where back-to-back blocks give 1.1-1.3x. The untimed call also outlasts the other
    library's spinning worker threads (OpenMP in torch, XLA's pool), which the sleep was for.
    """
    fn()
    t0 = time.perf_counter()
    for _ in range(BLOCK):
        fn()
    return (time.perf_counter() - t0) / BLOCK


def time_fn(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median seconds per call of ``fn()`` (which must block until its result is ready),
    each sample a :func:`steady_call`."""
    for _ in range(warmup):
        fn()
    return median([steady_call(fn) for _ in range(repeats)])


def time_pair(fa: Callable[[], Any], fb: Callable[[], Any], warmup: int, repeats: int,
              min_seconds: float = 0.0, max_repeats: int = 200) -> tuple[float, float]:
    """Medians of two functions timed *interleaved* (a block, b block, ...) after warm-up.

    Interleaving makes the ratio robust to load from other processes on a shared
    machine.  At least ``repeats`` pairs; more (up to ``max_repeats``) until
    ``min_seconds`` of timed work has accumulated, so cheap kernels get many samples.
    """
    ta, tb = time_pair_samples(fa, fb, warmup, repeats, min_seconds, max_repeats)
    return median(ta), median(tb)


def time_pair_samples(fa, fb, warmup: int, repeats: int, min_seconds: float = 0.0,
                      max_repeats: int = 200) -> tuple[list, list]:
    """The per-call seconds behind :func:`time_pair`.

    Each sample is a :func:`steady_call` (an untimed call, then ``BLOCK`` timed calls back
    to back), a's and b's alternating, so both are timed as a loop runs them and slow
    phases of a shared machine hit both alike.

    Adaptive: after ``repeats`` pairs and ``min_seconds`` of timed work, pairs continue
    until the median per-pair ratio is stable (:func:`ratio_stable`: the median's
    approximate 95 % interval, 1.58 IQR / sqrt(n), within ``PAIRS.tol`` of it), capped at
    ``max_repeats`` pairs and ``PAIRS.max_seconds`` of timed work.
    """
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    while True:
        ta.append(steady_call(fa))
        tb.append(steady_call(fb))
        n, spent = len(ta), BLOCK * (sum(ta) + sum(tb))
        if n < max(repeats, PAIRS.min_pairs) or spent < min_seconds:
            continue
        if ratio_stable([b / a for a, b in zip(ta, tb)]) or n >= max_repeats \
                or spent >= PAIRS.max_seconds:
            break
    r = sorted(b / a for a, b in zip(ta, tb))
    q = lambda f: r[min(len(r) - 1, int(f * len(r)))]
    LAST_PAIRS.update(ratio=median(r), q1=q(0.25), q3=q(0.75), n=len(r), stable=ratio_stable(r))
    return ta, tb


@dataclasses.dataclass
class PairSettings:
    """How long :func:`time_pair_samples` goes on (set from the Config by :func:`configure_pairs`)."""

    tol: float = 0.03  # stable: the median ratio's ~95 % interval within +-3 % of it
    min_pairs: int = 5
    max_seconds: float = 60.0  # cap of timed work per comparison
    wide: float = 0.5  # IQR / median above this: the row warns "wide spread"


PAIRS = PairSettings()


def configure_pairs(cfg: Config) -> None:
    PAIRS.tol, PAIRS.min_pairs, PAIRS.max_seconds = cfg.pair_tol, cfg.min_pairs, cfg.max_pair_seconds


def ratio_stable(ratios) -> bool:
    """True when the median's approximate 95 % interval (box-plot notch) is within PAIRS.tol."""
    r = sorted(ratios)
    n = len(r)
    if n < 3:
        return False
    med = median(r)
    iqr = r[min(n - 1, int(0.75 * n))] - r[int(0.25 * n)]
    return 1.58 * iqr / math.sqrt(n) <= PAIRS.tol * abs(med)


# Per-pair ratio statistics (reference / spp_jax, each pair timed back to back) of the
# last time_pair call: on a shared machine these are steadier than a ratio of medians.
LAST_PAIRS: dict = {}


def pair_ratio() -> float:
    """Median over the last time_pair's pairs of (reference time / spp_jax time)."""
    return LAST_PAIRS["ratio"]


def pair_spread() -> str:
    """"N pairs, ratio IQR a-b", plus warnings when the spread is wide or the median unstable."""
    p = LAST_PAIRS
    text = f"{p['n']} pairs, ratio IQR {p['q1']:.2f}-{p['q3']:.2f}"
    if p["ratio"] and (p["q3"] - p["q1"]) / abs(p["ratio"]) > PAIRS.wide:
        text += ", WIDE SPREAD (noisy machine?)"
    if not p.get("stable", True):
        text += f", median not stable to {PAIRS.tol:.0%} (cap reached)"
    return text


BLOCK = 3  # timed back-to-back calls per sample (steady_call)


def block(x):
    """Block on every JAX array in a pytree (no-op for other leaves)."""
    import jax
    for leaf in jax.tree_util.tree_leaves(x):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return x


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_delta(fn: Callable[[], Any], interval: float = 0.0005) -> int:
    """Peak resident-set growth (bytes) while ``fn()`` runs, sampled by a thread.

    glibc's free lists are returned to the OS first (malloc_trim), otherwise memory
    freed by an earlier call would be reused without showing up as growth.
    """
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], rss_bytes())
    return peak[0] - base


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        return True
    except ImportError:
        return False


def torch_device(cfg: Config):
    """torch's device for ``cfg.device`` ("gpu" -> CUDA; raises when torch has none)."""
    import torch
    if cfg.device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("--device gpu: torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def tsync(dev) -> None:
    """Wait for queued torch work on ``dev`` (a no-op on the CPU)."""
    if getattr(dev, "type", "cpu") == "cuda":
        import torch
        torch.cuda.synchronize()
