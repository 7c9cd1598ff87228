"""The epoch loop: ``train(config, workdir, data)``.

Start-up: (multi-host init), persistent compilation cache, 1-D device mesh, model and
optimizer, restore of the newest usable checkpoint, ahead-of-time compilation of one
train step per input size.  Each epoch: the size schedule picks the input side, the data
yields this process's batches, the compiled step for that side updates the one shared
train state; metrics go to a tqdm bar and ``metrics.jsonl``; checkpoints every
``checkpoint_every`` steps and at every epoch end; validation top-1/top-5 after each
``eval_every`` epochs.  At the end ``curves.png`` plots loss and accuracy.

Safety (see spp_jax.train.workdir and spp_jax.train.checkpoint): before anything is
written the workdir is checked (a run of another config stops here) and locked (one
writer); every restore is verified.  NaN guard: the compiled step applies no update
from a non-finite loss or gradient and reports ``ok`` (False too when an update overflowed a
parameter); the loop checks it at every log interval and
before every checkpoint and stops with ``NonFiniteError`` naming the step (the last
good checkpoints stay; nothing non-finite is saved).

Workdir layout: ``checkpoints/<step>/``, ``metrics.jsonl``, ``curves.png``, ``train.log``,
``config.json``, ``jax_cache/`` (unless configured elsewhere).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.errors import NonFiniteError
from spp_jax.models.input_norm import takes_gray_batches
from spp_jax.models.sppnet import run_once
from spp_jax.train import sharding as shd
from spp_jax.train.checkpoint import Checkpointer
from spp_jax.train.config import TrainConfig, build_model
from spp_jax.train.memory import check_memory
from spp_jax.train.schedule import PlateauController, lr_at, size_schedule
from spp_jax.train.state import create_state, optimizer_from_config, set_lr_scale
from spp_jax.train.steps import (CompiledSteps, enable_compilation_cache, init_key, make_eval_step,
                                 make_train_step, pad_eval_batch)
from spp_jax.train.workdir import training_workdir

log = logging.getLogger("spp_jax.train")


@dataclasses.dataclass
class TrainResult:
    state: Any                      # final TrainState (params: state.params)
    epochs: list[dict]              # the per-epoch metric records of this invocation
    compile_seconds: dict[int, float]
    resumed_from: int | None        # checkpoint step restored at start, if any


class _Interrupt:
    """Turns the first SIGINT into a flag checked between steps (so the state is never
    caught half-donated); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: saving a checkpoint after the current step "
                    "(Ctrl-C again to quit without saving)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False




def _metrics_path(workdir):
    return os.path.join(workdir, "metrics.jsonl")


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop records written after the checkpoint being resumed (they will be redone)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for ln in f:
            try:
                if json.loads(ln).get("step", 0) <= last_step:
                    keep.append(ln)
            except ValueError:  # a line cut short by a kill
                continue
    with open(path, "w") as f:
        f.writelines(keep)


def _check_finite(oks, first_step: int, cfg: TrainConfig) -> None:
    """NonFiniteError naming the first step whose ``ok`` flag (train step metrics) is False."""
    bad = [i for i, ok in enumerate(jax.device_get(list(oks))) if not ok]
    if bad:
        raise NonFiniteError(
            f"training diverged at step {first_step + bad[0]}: the loss, gradient or parameters became "
            f"NaN or infinite, and nothing from that step on was saved (the last good checkpoints "
            f"are kept); lower learning_rate (now {cfg.learning_rate:g}) or check "
            f"input_scale ({cfg.input_scale:g}) and the data, then train in a new --workdir or add "
            f"overwrite=true")


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def evaluate(steps: CompiledSteps, params, data, cfg: TrainConfig, batch_sharding,
             local_eval_bs: int) -> dict:
    """Validation top-1 / top-5 error and loss over ``data.eval_batches``."""
    totals = None
    for batch in data.eval_batches(cfg.eval_size, local_eval_bs, jax.process_index(),
                                   jax.process_count()):
        b = shd.global_batch(pad_eval_batch(batch, local_eval_bs), batch_sharding,
                             local_eval_bs * jax.process_count())
        out = steps.evaluate(params, b)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
        return {}
    t = {k: float(v) for k, v in jax.device_get(totals).items()}
    n = max(t["count"], 1.0)
    return {"val_top1_error": 1.0 - t["top1"] / n, "val_top5_error": 1.0 - t["top5"] / n,
            "val_loss": t["loss"] / n, "val_count": int(t["count"])}


def plot_curves(metrics_path: str, out_png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in open(metrics_path) if ln.strip()]
    tr = [r for r in recs if r.get("kind") == "train"]
    ep = [r for r in recs if r.get("kind") == "epoch"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if tr:
        a1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss")
        a2.plot([r["step"] for r in tr], [1 - r["accuracy"] for r in tr], label="train top-1 error")
    ev = [r for r in ep if "val_loss" in r]
    if ev:
        a1.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val loss")
        a2.plot([r["step"] for r in ev], [r["val_top1_error"] for r in ev], "o-",
                label="val top-1 error")
        a2.plot([r["step"] for r in ev], [r["val_top5_error"] for r in ev], "s-",
                label="val top-5 error")
    for a, t in ((a1, "loss"), (a2, "error")):
        a.set_xlabel("step")
        a.set_ylabel(t)
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def train(config: TrainConfig, workdir: str | os.PathLike, data) -> TrainResult:
    """Train (or resume training) ``config`` on ``data`` (see spp_jax.train.data) in ``workdir``."""
    cfg = config.validate()
    workdir = os.path.abspath(os.fspath(workdir))
    shd.maybe_initialize_distributed(cfg.distributed)
    is_main = jax.process_index() == 0
    with training_workdir(workdir, cfg):  # checks, then locks (raises before touching a file)
        handler = logging.FileHandler(os.path.join(workdir, "train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg_log = logging.getLogger("spp_jax")
        pkg_log.addHandler(handler)
        if pkg_log.level == logging.NOTSET:  # an explicitly set level is respected
            pkg_log.setLevel(logging.INFO)
        try:
            with Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints,
                              cfg.async_checkpointing) as ckpt:  # closed on every path
                return _train(cfg, workdir, data, is_main, ckpt)
        finally:
            pkg_log.removeHandler(handler)
            handler.close()


@dataclasses.dataclass
class _Run:
    """What every epoch of one invocation needs (fixed once the steps are built)."""

    cfg: TrainConfig
    data: Any
    is_main: bool
    ckpt: Checkpointer
    steps: CompiledSteps
    sizes: tuple[int, ...]          # input side of every epoch (the size schedule)
    spe: int                        # steps per epoch
    local_bs: int
    local_eval_bs: int
    batch_sharding: Any
    plateau: PlateauController
    mpath: str                      # metrics.jsonl

    @property
    def epochs(self) -> int:
        return len(self.sizes)


@dataclasses.dataclass
class _Position:
    """Where the run is: its state, the step count (a host copy, so the loop never waits
    on the device for it), and where a resume would start (epoch, batch, data state)."""

    state: Any
    step: int
    epoch: int
    pos: int
    it: Any = None                  # this epoch's data iterator (its state is the resume point)
    data_state: Any = None          # a restored iterator state (first epoch of a resume)
    window: list = dataclasses.field(default_factory=list)  # step metrics not yet logged


def _enable_cache(cfg: TrainConfig, workdir: str) -> None:
    cache = cfg.compile_cache_dir
    if cache.lower() != "none":
        cache = enable_compilation_cache(cache or os.path.join(workdir, "jax_cache"))
        log.info("persistent compilation cache: %s", cache)


def _train_channels(data, cfg: TrainConfig) -> int:
    """The data's training-image channels (3, or 1 gray), checked against the model: gray
    batches carry no colour offset, which only a per-image standardisation makes harmless."""
    c = int(data.train_channels)
    if c not in (1, 3):
        raise ValueError(f"training images must have 3 (RGB) or 1 (gray) channels, the data "
                         f"says {c}")
    if c == 1 and not takes_gray_batches(cfg.input_norm):
        raise ValueError(f"the data yields gray training images, which only an "
                         f"input_norm=gray_std network takes (this one: {cfg.input_norm})")
    return c


def _build(cfg: TrainConfig, data, is_main: bool, ckpt: Checkpointer, workdir: str
           ) -> tuple[_Run, Any, Any, Any]:
    """The mesh, model, optimizer and compiled-step holder; returns (run, init_fn, key,
    replicated sharding)."""
    mesh = shd.make_mesh()
    rep, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
    local_bs = shd.check_batch_size(cfg.batch_size, mesh)
    local_eval_bs = shd.check_batch_size(cfg.eval_batch_size, mesh, "eval_batch_size")
    n_dev = mesh.devices.size
    log.info("mesh: %d devices on axis '%s' (%d per process, %d processes); global batch %d",
             n_dev, shd.DATA_AXIS, jax.local_device_count(), jax.process_count(), cfg.batch_size)
    spe = data.steps_per_epoch(cfg.batch_size)
    if spe < 1:
        raise ValueError(f"the data has fewer samples than one batch of {cfg.batch_size}")
    sizes = tuple(size_schedule(cfg))
    model = build_model(cfg, data.num_classes)
    tx = optimizer_from_config(cfg, spe)
    if jax.default_backend() == "cpu":
        check_memory(cfg.memory_check, model=cfg.model, width=cfg.width, fc_dim=cfg.fc_dim,
                     levels=cfg.levels, num_classes=data.num_classes, sizes=sizes,
                     per_device_batch=cfg.batch_size // n_dev,
                     devices_per_host=jax.local_device_count(), spp=cfg.spp)

    def init_fn(key):
        dummy = jnp.zeros((1, min(sizes), min(sizes), 3), jnp.float32)
        return create_state(model.init(key, dummy)["params"], tx)

    key = init_key(cfg.seed)
    steps = CompiledSteps(make_train_step(model, tx, cfg.seed), make_eval_step(model),
                          jax.eval_shape(init_fn, key), cfg.batch_size, rep, bsh,
                          channels=_train_channels(data, cfg))
    run = _Run(cfg, data, is_main, ckpt, steps, sizes, spe, local_bs, local_eval_bs, bsh,
               PlateauController.from_config(cfg), _metrics_path(workdir))
    return run, init_fn, key, rep


def _restore_or_init(run: _Run, init_fn, key, rep) -> tuple[_Position, int | None]:
    """The newest usable checkpoint's position (plateau state included), else a fresh
    initialisation; returns (position, the restored checkpoint's step or None)."""
    cfg = run.cfg
    restored = run.ckpt.restore(run.steps.abstract_state)  # replicated, as the steps take it
    if restored is None:
        state = run_once(init_fn, key, out_shardings=rep)
        log.info("initialised %s (%d parameters)", cfg.model,
                 sum(x.size for x in jax.tree.leaves(state.params)))
        return _Position(state, int(state.step), 0, 0), None
    state, meta, resumed_from = restored
    if meta.get("plateau"):
        run.plateau.set_state(meta["plateau"])
    if meta.get("seed") != cfg.seed:
        log.warning("checkpoint was written with seed %s, config has %s", meta.get("seed"), cfg.seed)
    prog = _Position(state, int(state.step), int(meta["epoch"]), int(meta["position"]),
                     data_state=meta.get("data_state"))
    log.info("resumed from checkpoint %d: epoch %d, batch %d of %d", resumed_from, prog.epoch,
             prog.pos, run.spe)
    return prog, resumed_from


def _compile(run: _Run, start_epoch: int) -> None:
    """Compile the train step of every input size still to come, ahead of time (a random
    schedule compiles each distinct size on first use instead)."""
    todo = run.sizes[start_epoch:]
    if run.cfg.size_schedule == "random":
        log.info("random-size schedule: %d distinct sizes over %d epochs (%s); one train step "
                 "is compiled per distinct size, on first use", len(set(run.sizes)), run.epochs,
                 sorted(set(run.sizes)))
        return
    for s in sorted(set(todo), key=todo.index):
        run.steps.build(s)
    log.info("compile times: %s", ", ".join(f"{s}: {t:.2f} s" for s, t in run.steps.compile_seconds.items()))


def _save(run: _Run, prog: _Position, epoch: int, position: int, dstate) -> None:
    """Checkpoint the state with where a resume starts (epoch, batch, data state)."""
    meta = {"epoch": epoch, "position": position, "data_state": dstate, "seed": run.cfg.seed,
            "step": int(prog.state.step), "steps_per_epoch": run.spe,
            "plateau": run.plateau.get_state(), "size": run.sizes[epoch] if epoch < run.epochs else None}
    run.ckpt.save(int(prog.state.step), prog.state, meta)


class _EpochMeter:
    """Loss / accuracy of an epoch's logged steps, and the time since the last log line."""

    def __init__(self):
        self.sum, self.n = np.zeros(2), 0
        self.t_start = self.t_last = time.perf_counter()


def _log_window(run: _Run, prog: _Position, size: int, meter: _EpochMeter, bar) -> None:
    """Check the logged steps' NaN guard, then write one train record (and the bar's text)."""
    cfg, vals = run.cfg, jax.device_get(prog.window)
    _check_finite([v["ok"] for v in vals], prog.step - len(vals) + 1, cfg)
    now = time.perf_counter()
    ips = len(vals) * cfg.batch_size / max(now - meter.t_last, 1e-9)
    loss = float(np.mean([v["loss"] for v in vals]))
    acc = float(np.mean([v["accuracy"] for v in vals]))
    meter.sum += np.array([loss, acc]) * len(vals)
    meter.n += len(vals)
    lr = lr_at(cfg, run.spe, prog.step - 1, run.plateau.scale)
    rec = {"kind": "train", "epoch": prog.epoch, "step": prog.step, "size": size, "lr": lr,
           "loss": loss, "accuracy": acc, "images_per_sec": ips,
           "grad_norm": float(np.mean([v["grad_norm"] for v in vals]))}
    if run.is_main:
        _append(run.mpath, rec)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{ips:.0f}", lr=f"{lr:.2g}")
    prog.window, meter.t_last = [], now


def _train_epoch(run: _Run, prog: _Position, intr: _Interrupt) -> _EpochMeter:
    """The steps of epoch ``prog.epoch`` from batch ``prog.pos``: log lines, mid-epoch
    checkpoints, and a KeyboardInterrupt between steps when an interrupt was requested."""
    cfg, size = run.cfg, run.sizes[prog.epoch]
    it = run.data.train_iter(prog.epoch, size, run.local_bs, jax.process_index(), jax.process_count(),
                             state=prog.data_state if prog.pos else None)
    prog.it = it
    bar = None
    if cfg.progress and run.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=run.spe, initial=prog.pos, desc=f"epoch {prog.epoch + 1}/{run.epochs} @{size}",
                   unit="step", leave=True, dynamic_ncols=True)
    prog.window, meter = [], _EpochMeter()
    while prog.pos < run.spe:
        try:
            local = next(it)
        except StopIteration:
            raise RuntimeError(f"the training data ran out after {prog.pos} of {run.spe} "
                               f"batches in epoch {prog.epoch}") from None
        prog.state, m = run.steps(size, prog.state, shd.global_batch(local, run.batch_sharding,
                                                                     cfg.batch_size))
        prog.pos, prog.step = prog.pos + 1, prog.step + 1
        prog.window.append(m)
        if bar is not None:
            bar.update(1)
        if len(prog.window) == cfg.log_every or prog.pos == run.spe:
            _log_window(run, prog, size, meter, bar)
        if intr.requested:
            raise KeyboardInterrupt
        if cfg.checkpoint_every and prog.step % cfg.checkpoint_every == 0 and prog.pos < run.spe:
            _check_finite([w["ok"] for w in prog.window], prog.step - len(prog.window) + 1, cfg)
            _save(run, prog, prog.epoch, prog.pos, it.get_state())
    if bar is not None:
        bar.close()
    return meter


def _end_epoch(run: _Run, prog: _Position, meter: _EpochMeter) -> dict:
    """Validation, the plateau controller, the epoch record, and the epoch-end checkpoint."""
    cfg, epoch = run.cfg, prog.epoch
    dt = max(time.perf_counter() - meter.t_start, 1e-9)
    rec = {"kind": "epoch", "epoch": epoch, "step": prog.step, "size": run.sizes[epoch],
           "lr": lr_at(cfg, run.spe, prog.step - 1, run.plateau.scale),
           "loss": float(meter.sum[0] / meter.n) if meter.n else None,
           "accuracy": float(meter.sum[1] / meter.n) if meter.n else None,
           "images_per_sec": meter.n * cfg.batch_size / dt}
    if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
        rec.update(evaluate(run.steps, prog.state.params, run.data, cfg, run.batch_sharding,
                            run.local_eval_bs))
        if cfg.lr_schedule == "plateau" and "val_top1_error" in rec:
            if run.plateau.update(rec["val_top1_error"]):
                prog.state = set_lr_scale(prog.state, run.plateau.scale)
    log.info("epoch %d: %s", epoch, {k: v for k, v in rec.items() if k != "kind"})
    if run.is_main:
        _append(run.mpath, rec)
    _save(run, prog, epoch + 1, 0, None)
    prog.epoch, prog.pos, prog.it, prog.data_state = epoch + 1, 0, None, None
    return rec


def _save_interrupted(run: _Run, prog: _Position) -> None:
    """On Ctrl-C: checkpoint where the run stands, unless a step was cut off mid-donation."""
    state = prog.state
    if any(x.is_deleted() for x in jax.tree.leaves(state) if hasattr(x, "is_deleted")):
        log.error("interrupted inside a step; the state was donated, no checkpoint saved")
        return
    _check_finite([w["ok"] for w in prog.window], prog.step - len(prog.window) + 1, run.cfg)
    dstate = prog.it.get_state() if prog.it is not None else (prog.data_state if prog.pos else None)
    log.warning("interrupted: saving checkpoint at step %d (epoch %d, batch %d)", int(state.step),
                prog.epoch, prog.pos)
    _save(run, prog, prog.epoch, prog.pos, dstate)


def _train(cfg: TrainConfig, workdir: str, data, is_main: bool, ckpt: Checkpointer) -> TrainResult:
    _enable_cache(cfg, workdir)
    run, init_fn, key, rep = _build(cfg, data, is_main, ckpt, workdir)
    prog, resumed_from = _restore_or_init(run, init_fn, key, rep)
    if is_main:
        _truncate_metrics(run.mpath, prog.step)
    _compile(run, prog.epoch)
    epoch_records = []
    try:
        with _Interrupt() as intr:
            while prog.epoch < run.epochs:
                meter = _train_epoch(run, prog, intr)
                epoch_records.append(_end_epoch(run, prog, meter))
                if intr.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        _save_interrupted(run, prog)
        raise
    if is_main and cfg.plot and os.path.exists(run.mpath):
        plot_curves(run.mpath, os.path.join(workdir, "curves.png"))
    return TrainResult(prog.state, epoch_records, dict(run.steps.compile_seconds), resumed_from)
