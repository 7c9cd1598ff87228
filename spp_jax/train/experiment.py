"""Train-then-test as a library function: what ``make train`` runs.

Builds the named dataset (the embedded ``shapes`` data is generated on first
use), the paper's input pipeline, trains with :func:`spp_jax.train.train`
(resuming from the workdir's checkpoints), and runs the testing protocols on
the validation split, writing ``eval.md`` / ``eval.json`` in the workdir.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from spp_jax import atomic
from spp_jax.config_grammar import config_dict
from spp_jax.data import augment
from spp_jax.data.datasets import PipelineData, classification_dataset, mean_image
from spp_jax.data.pipeline import AugmentConfig
from spp_jax.evaluate import ONE_PASS, PROTOCOL_TITLES, evaluate, full_view_by_side
from spp_jax.models.input_norm import takes_gray_batches
from spp_jax.report import error_pair, markdown_table, write_report
from spp_jax.pretrained import read_workdir
from spp_jax.train.config import TrainConfig, build_model, embedded, trained_num_classes
from spp_jax.train.loop import train
from spp_jax.train.memory import available_ram_bytes
from spp_jax.train.sharding import maybe_initialize_distributed
from spp_jax.train.workdir import training_workdir

log = logging.getLogger(__name__)


def data_dir_for(cfg: TrainConfig, workdir: str) -> str | None:
    if cfg.data_dir:
        return cfg.data_dir
    return os.path.join(workdir, "data") if embedded(cfg.dataset) else None


def cache_budget(cfg: TrainConfig) -> int:
    """Bytes for the resized-image cache: ``data_cache_gb``, but at most a quarter of the RAM
    available now (the cache is a speed-up; it must never be what runs a host out of memory)."""
    avail = available_ram_bytes()
    want = int(cfg.data_cache_gb * 2 ** 30)
    return want if avail is None else min(want, avail // 4)


def prepare_data(cfg: TrainConfig, workdir: str):
    """(ClassificationData, AugmentConfig) for a config; the mean image is cached in the workdir."""
    t = time.perf_counter()
    ds = classification_dataset(cfg.dataset, data_dir_for(cfg, workdir), train_size=cfg.train_examples,
                                val_size=cfg.val_examples, seed=cfg.dataset_seed)
    mean = mean_image(ds.train, os.path.join(workdir, "mean_image.npy"), num_samples=cfg.mean_samples)
    pca = {}
    if cfg.pca_from_data:
        eigval, eigvec = augment.estimate_pca_colour(ds.train, num_samples=min(500, len(ds.train)))
        pca = dict(pca_eigval=eigval, pca_eigvec=eigvec)
    log.info("data %s: %d train / %d validation images, %d classes (ready in %.1f s)", ds.name,
             len(ds.train), len(ds.validation), ds.num_classes, time.perf_counter() - t)
    # A gray_std net averages the channels and standardises each image itself: its training
    # batches can be that gray level already (a third of the bytes, half the host work).
    return ds, AugmentConfig(mean=mean, gray=takes_gray_batches(cfg.input_norm), **pca)


def restore_params(cfg: TrainConfig, workdir: str, num_classes: int):
    """``(model, {"params": ...}, meta)`` of the newest intact checkpoint in ``workdir``;
    read only (:func:`spp_jax.pretrained.read_workdir`: config check, verified checkpoint)."""
    model = build_model(cfg, num_classes)
    variables, meta = read_workdir(workdir, cfg, model)
    return model, variables, meta


def scale_probe_workdir(cfg: TrainConfig, workdir: str, sides) -> dict:
    """The 1-full view of a trained SPP workdir at each test side in ``sides`` (its newest
    checkpoint, the validation split, ``eval_limit`` images), written to
    ``WORKDIR/scale_probe.{md,json}`` (json: ``{"sides": [...], "epoch": the checkpoint's,
    "results": {side: ProtocolResult dict}, "config": cfg's}``; the grid reuses a probe only
    for the config it records).  Reads the workdir only otherwise.
    """
    cfg = cfg.validate()
    model, variables, meta = restore_params(cfg, workdir, trained_num_classes(cfg))
    ds, aug = prepare_data(cfg, workdir)
    res = full_view_by_side(model, variables, ds.validation, tuple(sides), cfg=aug,
                            limit=cfg.eval_limit or None, progress=cfg.progress)
    data = {"sides": [int(s) for s in sides], "epoch": meta.get("epoch"),
            "results": {str(s): r.as_dict() for s, r in res.items()}, "config": config_dict(cfg)}
    rows = [str(s) for s in sides]
    md = (f"1-full top-1 / top-5 error (%) by test shorter side, {ds.name} validation, {cfg.model} "
          f"({variant_title(cfg)}, trained at shorter side {aug.resize_side})\n\n"
          + markdown_table(rows, ["1 full"], {(str(s), "1 full"): error_pair(r.top1_err, r.top5_err)
                                             for s, r in res.items()}, corner="test side"))
    write_report(workdir, "scale_probe", md, data)
    return data


def run_protocols(cfg: TrainConfig, workdir: str, model, variables, ds, aug: AugmentConfig,
                  title: str) -> dict:
    t = time.perf_counter()
    res = evaluate(model, variables, ds.validation, protocols=cfg.protocols, cfg=aug,
                   limit=cfg.eval_limit or None, multiview_limit=cfg.multiview_limit or None,
                   batch_size=cfg.eval_batch_size)
    rows = [PROTOCOL_TITLES[p] for p in res]
    cells = {(PROTOCOL_TITLES[p], title): error_pair(r.top1_err, r.top5_err) for p, r in res.items()}
    shared = ONE_PASS <= set(res)  # then their seconds are one pass's, not each one's own
    md = (f"Top-1 / top-5 error (%), {ds.name} validation, {cfg.model}\n\n"
          + markdown_table(rows, [title], cells, corner="test view")
          + "\n\n" + "\n".join(f"- {PROTOCOL_TITLES[p]}: {r.num_images} images, {r.views_per_image:.1f} "
                               f"views/image, {r.seconds:.1f} s"
                               + (" (one pass for 1 full and multi-view)" if shared and p in ONE_PASS else "")
                               for p, r in res.items()))
    data = {"model": cfg.model, "variant": title, "dataset": ds.name,
            "results": {p: r.as_dict() for p, r in res.items()}, "seconds": time.perf_counter() - t,
            "config": config_dict(cfg)}  # the resolved config these numbers come from
    write_report(workdir, "eval", md, data)
    print(md, flush=True)
    return data


def variant_title(cfg: TrainConfig) -> str:
    if not cfg.spp:
        return "no SPP"
    if cfg.size_schedule == "single" or len(set(cfg.sizes)) == 1:
        return "SPP single-size"
    return "SPP multi-size" if cfg.size_schedule == "multi" else "SPP random-size"


def train_and_evaluate(cfg: TrainConfig, workdir: str) -> dict:
    """``make train``: data, training (resumable), then the testing protocols.

    The config is validated first (a bad value raises ConfigError before any data exists),
    then the workdir is checked and locked (``spp_jax.train.workdir.training_workdir``)
    before any data is generated or any file written.
    """
    cfg = cfg.validate()
    workdir = os.path.abspath(workdir)
    maybe_initialize_distributed(cfg.distributed)
    with training_workdir(workdir, cfg):
        return _train_and_evaluate(dataclasses.replace(cfg, overwrite=False), workdir)


def _train_and_evaluate(cfg: TrainConfig, workdir: str) -> dict:
    t0 = time.perf_counter()
    ds, aug = prepare_data(cfg, workdir)
    data = PipelineData(ds.train, ds.validation, ds.num_classes, aug, seed=cfg.seed,
                        num_threads=cfg.data_threads, cache_bytes=cache_budget(cfg))
    if cfg.eval_size != aug.crop_size:
        cfg = dataclasses.replace(cfg, eval_size=aug.crop_size)
    result = train(cfg, workdir, data)
    t_train = time.perf_counter() - t0
    model = build_model(cfg, ds.num_classes)
    out = run_protocols(cfg, workdir, model, {"params": result.state.params}, ds, aug, variant_title(cfg))
    out["train_seconds"] = t_train
    out["total_seconds"] = time.perf_counter() - t0
    summary = os.path.join(workdir, "run_summary.json")
    # The wall time of the invocation that finished the run: reusing a finished run (detection's
    # pretraining does, every time) trains nothing and must not overwrite it with seconds.
    if result.epochs or not os.path.exists(summary):
        atomic.write_text(summary, json.dumps({k: out[k] for k in ("train_seconds", "total_seconds")}))
    log.info("total %.1f s (data + training %.1f s)", out["total_seconds"], t_train)
    if data.skipped:
        log.warning("validation skipped %d unreadable images", data.skipped)
    return out


def evaluate_workdir(cfg: TrainConfig, workdir: str) -> dict:
    """``make eval``: the testing protocols on a trained workdir's latest checkpoint.

    The config is validated, the checkpoint found and verified, then the data prepared.
    """
    cfg = cfg.validate()
    model, variables, _ = restore_params(cfg, workdir, trained_num_classes(cfg))
    ds, aug = prepare_data(cfg, workdir)
    return run_protocols(cfg, workdir, model, variables, ds, aug, variant_title(cfg))
