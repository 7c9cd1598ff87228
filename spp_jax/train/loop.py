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
writer); every restore is verified.  NaN guard: the compiled step never applies a
non-finite update and reports ``ok``; the loop checks it at every log interval and
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
from spp_jax.models.sppnet import run_once
from spp_jax.train import sharding as shd
from spp_jax.train.checkpoint import Checkpointer
from spp_jax.train.config import TrainConfig, build_model
from spp_jax.train.memory import check_memory
from spp_jax.train.schedule import PlateauController, lr_at, size_schedule
from spp_jax.train.state import create_state, optimizer_from_config, set_lr_scale
from spp_jax.train.steps import (CompiledSteps, abstract_with_sharding, enable_compilation_cache,
                                 init_key, make_eval_step, make_train_step, pad_eval_batch)
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
            f"training diverged at step {first_step + bad[0]}: the loss or gradient became NaN or "
            f"infinite, so that update was not applied and nothing after it was saved (the last "
            f"good checkpoints are kept); lower learning_rate (now {cfg.learning_rate:g}) or check "
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


def _train(cfg: TrainConfig, workdir: str, data, is_main: bool, ckpt: Checkpointer) -> TrainResult:
    cache = cfg.compile_cache_dir
    if cache.lower() != "none":
        cache = enable_compilation_cache(cache or os.path.join(workdir, "jax_cache"))
        log.info("persistent compilation cache: %s", cache)

    mesh = shd.make_mesh()
    rep, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
    local_bs = shd.check_batch_size(cfg.batch_size, mesh)
    local_eval_bs = shd.check_batch_size(cfg.eval_batch_size, mesh, "eval_batch_size")
    n_dev, pidx, pcount = mesh.devices.size, jax.process_index(), jax.process_count()
    log.info("mesh: %d devices on axis '%s' (%d per process, %d processes); global batch %d",
             n_dev, shd.DATA_AXIS, jax.local_device_count(), pcount, cfg.batch_size)

    spe = data.steps_per_epoch(cfg.batch_size)
    if spe < 1:
        raise ValueError(f"the data has fewer samples than one batch of {cfg.batch_size}")
    epochs = cfg.num_epochs
    sizes = size_schedule(cfg)
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
    abstract_state = jax.eval_shape(init_fn, key)
    steps = CompiledSteps(make_train_step(model, tx, cfg.seed), make_eval_step(model),
                          abstract_state, cfg.batch_size, rep, bsh)

    plateau = PlateauController.from_config(cfg)
    restored = ckpt.restore(abstract_with_sharding(abstract_state, rep))
    if restored is not None:
        state, meta, resumed_from = restored
        start_epoch, start_pos = int(meta["epoch"]), int(meta["position"])
        data_state = meta.get("data_state")
        if meta.get("plateau"):
            plateau.set_state(meta["plateau"])
        if meta.get("seed") != cfg.seed:
            log.warning("checkpoint was written with seed %s, config has %s", meta.get("seed"),
                        cfg.seed)
        log.info("resumed from checkpoint %d: epoch %d, batch %d of %d", resumed_from,
                 start_epoch, start_pos, spe)
    else:
        state = run_once(init_fn, key, out_shardings=rep)
        start_epoch, start_pos, data_state, resumed_from = 0, 0, None, None
        log.info("initialised %s (%d parameters)", cfg.model,
                 sum(x.size for x in jax.tree.leaves(state.params)))
    if is_main:
        _truncate_metrics(_metrics_path(workdir), int(state.step))

    todo = sizes[start_epoch:]
    if cfg.size_schedule == "random":
        log.info("random-size schedule: %d distinct sizes over %d epochs (%s); one train step "
                 "is compiled per distinct size, on first use", len(set(sizes)), epochs,
                 sorted(set(sizes)))
    else:
        for s in sorted(set(todo), key=todo.index):
            steps.build(s)
        log.info("compile times: %s", ", ".join(f"{s}: {t:.2f} s"
                                                 for s, t in steps.compile_seconds.items()))

    def meta_for(epoch, position, dstate):
        return {"epoch": epoch, "position": position, "data_state": dstate, "seed": cfg.seed,
                "step": int(state.step), "steps_per_epoch": spe, "plateau": plateau.get_state(),
                "size": sizes[epoch] if epoch < epochs else None}

    def save(epoch, position, dstate):
        ckpt.save(int(state.step), state, meta_for(epoch, position, dstate))

    mpath = _metrics_path(workdir)
    epoch_records = []
    step = int(state.step)  # host-side copy, so the loop never waits on the device for it
    window = []  # metrics of the steps since the last log line (their `ok` flags not yet checked)
    cur = {"epoch": start_epoch, "pos": start_pos, "it": None}  # where a resume would start
    try:
        with _Interrupt() as intr:
            for epoch in range(start_epoch, epochs):
                size = sizes[epoch]
                pos = start_pos if epoch == start_epoch else 0
                it = data.train_iter(epoch, size, local_bs, pidx, pcount,
                                     state=data_state if (epoch == start_epoch and pos) else None)
                cur.update(epoch=epoch, pos=pos, it=it)
                bar = None
                if cfg.progress and is_main:
                    from tqdm.auto import tqdm
                    bar = tqdm(total=spe, initial=pos, desc=f"epoch {epoch + 1}/{epochs} @{size}",
                               unit="step", leave=True, dynamic_ncols=True)
                window, t_last, t_epoch = [], time.perf_counter(), time.perf_counter()
                ep_sum, ep_n = np.zeros(2), 0
                while pos < spe:
                    try:
                        local = next(it)
                    except StopIteration:
                        raise RuntimeError(f"the training data ran out after {pos} of {spe} "
                                           f"batches in epoch {epoch}") from None
                    batch = shd.global_batch(local, bsh, cfg.batch_size)
                    state, m = steps(size, state, batch)
                    pos, step = pos + 1, step + 1
                    cur["pos"] = pos
                    window.append(m)
                    if bar is not None:
                        bar.update(1)
                    if len(window) == cfg.log_every or pos == spe:
                        vals = jax.device_get(window)
                        _check_finite([v["ok"] for v in vals], step - len(vals) + 1, cfg)
                        now = time.perf_counter()
                        ips = len(window) * cfg.batch_size / max(now - t_last, 1e-9)
                        loss = float(np.mean([v["loss"] for v in vals]))
                        acc = float(np.mean([v["accuracy"] for v in vals]))
                        ep_sum += np.array([loss, acc]) * len(vals)
                        ep_n += len(vals)
                        lr = lr_at(cfg, spe, step - 1, plateau.scale)
                        rec = {"kind": "train", "epoch": epoch, "step": step, "size": size,
                               "lr": lr, "loss": loss, "accuracy": acc, "images_per_sec": ips,
                               "grad_norm": float(np.mean([v["grad_norm"] for v in vals]))}
                        if is_main:
                            _append(mpath, rec)
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}",
                                            img_s=f"{ips:.0f}", lr=f"{lr:.2g}")
                        window, t_last = [], now
                    if intr.requested:
                        raise KeyboardInterrupt
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and pos < spe:
                        _check_finite([w["ok"] for w in window], step - len(window) + 1, cfg)
                        save(epoch, pos, it.get_state())
                if bar is not None:
                    bar.close()
                # ---- epoch end: validation, plateau controller, record, checkpoint ----
                dt = max(time.perf_counter() - t_epoch, 1e-9)
                rec = {"kind": "epoch", "epoch": epoch, "step": step, "size": size,
                       "lr": lr_at(cfg, spe, step - 1, plateau.scale),
                       "loss": float(ep_sum[0] / ep_n) if ep_n else None,
                       "accuracy": float(ep_sum[1] / ep_n) if ep_n else None,
                       "images_per_sec": ep_n * cfg.batch_size / dt}
                if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
                    rec.update(evaluate(steps, state.params, data, cfg, bsh, local_eval_bs))
                    if cfg.lr_schedule == "plateau" and "val_top1_error" in rec:
                        if plateau.update(rec["val_top1_error"]):
                            state = set_lr_scale(state, plateau.scale)
                log.info("epoch %d: %s", epoch, {k: v for k, v in rec.items() if k != "kind"})
                if is_main:
                    _append(mpath, rec)
                epoch_records.append(rec)
                save(epoch + 1, 0, None)
                cur.update(epoch=epoch + 1, pos=0, it=None)
                if intr.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if any(x.is_deleted() for x in jax.tree.leaves(state) if hasattr(x, "is_deleted")):
            log.error("interrupted inside a step; the state was donated, no checkpoint saved")
        else:
            _check_finite([w["ok"] for w in window], step - len(window) + 1, cfg)
            dstate = (cur["it"].get_state() if cur["it"] is not None
                      else (data_state if cur["pos"] else None))
            log.warning("interrupted: saving checkpoint at step %d (epoch %d, batch %d)",
                        int(state.step), cur["epoch"], cur["pos"])
            save(cur["epoch"], cur["pos"], dstate)
        raise
    if is_main and cfg.plot and os.path.exists(mpath):
        plot_curves(mpath, os.path.join(workdir, "curves.png"))
    return TrainResult(state, epoch_records, dict(steps.compile_seconds), resumed_from)
