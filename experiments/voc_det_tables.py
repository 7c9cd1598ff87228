"""Assembling the paper's Table 9, its timings, and Table 12 (the voc_det experiment's tables).

Built from the detection library's pieces (:mod:`spp_jax.detection`: feature caches,
fine-tuning, detector); ``experiments/voc_det.py`` chooses the columns and runs this.

One *column* is a feature extractor (SPP at 1 or 5 scales, or R-CNN mode); for
each it caches pool5 of the trainval and test windows, fine-tunes fc6/fc7/fc8,
and trains and tests one detector per *row*:

=========  =========================================  =========================
row        SVM features                                box regression
=========  =========================================  =========================
pool5      pooled conv5                                no
fc6        pretrained fc6                              no
ftfc6      fine-tuned fc6                              no
ftfc7      fine-tuned fc7                              no
ftfc7 bb   fine-tuned fc7 (the ftfc7 detector)         yes, after NMS
=========  =========================================  =========================

Timing rows are per test image, measured warm (compiled) outside the caches:
conv, pool, fc (fc6 + fc7 of every window), their total, and the speed-up of
each column's total over R-CNN mode's (proposals are excluded, as in the paper).

Table 12 (model combination): two columns' ``ftfc7 bb`` detectors score the
test windows and NMS runs on the union (:func:`spp_jax.detection.detector.test_combined`).

A column with ``conv_finetune`` settings (the "SPP 1-scale, conv fine-tuned" column, beyond the
paper) first fine-tunes its network end to end from a conv layer up
(:mod:`spp_jax.detection.finetune_conv`), then runs the same caches, SVMs, box regression and
tests on the fine-tuned network's features; its ftfc6 / ftfc7 rows use the end-to-end fc6 / fc7
(no second, fc-only fine-tuning) and it has no fc6 row (there is no pretrained fc6 for the new
conv features). The fine-tuned network is kept in the cache directory, so a rerun reuses it and
its feature caches, and the other columns' caches are untouched (they are keyed by network).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Sequence

import numpy as np

from spp_jax.detection import cache as F
from spp_jax.detection import detector as D
from spp_jax.detection import finetune as FT
from spp_jax.detection import finetune_conv as FC
from spp_jax.report import markdown_table, write_report

log = logging.getLogger(__name__)

ROWS = ("pool5", "fc6", "ftfc6", "ftfc7", "ftfc7 bb")
COL_SPP1, COL_SPP5, COL_RCNN = "SPP 1-scale", "SPP 5-scale", "R-CNN"
COL_SPP1_CONV = "SPP 1-scale, conv fine-tuned"
T_CONV, T_POOL, T_FC = "conv s/image", "pool s/image", "fc6+fc7 s/image"
T_TOTAL, T_SPEEDUP = "total s/image (conv+pool+fc)", "speed-up vs R-CNN (total)"
T_PROPOSALS = "selective search s/image (1 worker)"
T_FT, T_COLUMN = "fine-tuning s", "column wall s"
T_FT_ITER = "fine-tuning s/iteration (conv fine-tuning, warm)"
TIMING_ORDER = (T_CONV, T_POOL, T_FC, T_TOTAL, T_SPEEDUP, T_PROPOSALS, T_FT, T_FT_ITER)

__all__ = ["ROWS", "COL_SPP1", "COL_SPP5", "COL_RCNN", "COL_SPP1_CONV", "Table9Config", "Column",
           "ColumnResult", "conv_finetuned", "run_column", "measure_speed", "combine_columns", "run_table9", "write_tables"]


@dataclasses.dataclass
class Table9Config:
    """Settings shared by every column.

    Attributes:
      finetune: fine-tuning settings (:class:`~spp_jax.detection.finetune.FinetuneConfig`).
      detector: SVM / NMS / box-regression settings.
      flip_finetune: also fine-tune on the left-right flipped training images (the released
        code does; their pool5 is cached next to the unflipped one).
      timing_images: test images timed per column (each run once untimed to compile).
      timing_windows: R-CNN mode times at most this many windows per image and
        extrapolates linearly (logged and named in the timing row); None = all windows.
      cache_dtype: pool5 on disk, "float16" or "float32" (see FeatureCache).
      proposals_key: what the proposals are (part of the feature-cache keys).
    """

    finetune: FT.FinetuneConfig = dataclasses.field(default_factory=FT.FinetuneConfig)
    detector: D.DetectorConfig = dataclasses.field(default_factory=D.DetectorConfig)
    flip_finetune: bool = False
    timing_images: int = 10
    timing_windows: int | None = None
    cache_dtype: str = "float16"
    proposals_key: dict = dataclasses.field(default_factory=lambda: {"proposals": "ss-fast"})


@dataclasses.dataclass
class Column:
    """name: the column title; extractor: SPPExtractor or RCNNExtractor; head0: the pretrained
    fc params ({"fc6", "fc7", ...}); trainval / test: record sources (R-CNN mode may use a subset);
    conv_finetune: end-to-end fine-tuning settings (None: the paper's fc-only fine-tuning) of the
    SPP extractor's network, at the extractor's scales (see the module doc)."""

    name: str
    extractor: Any
    head0: dict
    trainval: Any
    test: Any
    conv_finetune: FC.ConvFinetuneConfig | None = None


@dataclasses.dataclass
class ColumnResult:
    """results: row -> DetectionResult; bb_detector: the ftfc7 detector with box regressors;
    test_cache: its FeatureCache; timing: row title -> seconds; finetune: FinetuneResult."""

    name: str
    results: dict
    bb_detector: Any
    test_cache: Any
    timing: dict
    finetune: Any


def measure_speed(extractor, records, proposals, n_images: int = 3, max_windows: int | None = None
                  ) -> dict:
    """Warm per-image conv / pool seconds on the first test images with proposals (not the cache).

    SPP: each image is run twice and the second run timed. R-CNN: the windows (at most
    ``max_windows``, then extrapolated linearly, which the returned row name says) are timed
    after one warm-up call. Returns {row title: seconds per image}; {} without usable images.
    """
    from spp_jax.detection.rcnn import time_windows
    conv = pool = 0.0
    n, extrapolated = 0, False
    for i in range(len(records)):
        if n == n_images:
            break
        rec = records[i]
        boxes = proposals.get(rec["image_id"])
        if boxes is None or len(boxes) == 0:
            continue
        if extractor.kind == "rcnn":
            t = time_windows(extractor, rec["image"], boxes, max_windows)
            conv += t["seconds"]
            extrapolated |= t["extrapolated"]
        else:
            extractor.pool5(rec["image"], boxes)
            st = dict(extractor.stats)
            extractor.pool5(rec["image"], boxes)
            conv += extractor.stats["conv_s"] - st["conv_s"]
            pool += extractor.stats["pool_s"] - st["pool_s"]
        n += 1
    if n == 0:
        return {}
    if extractor.kind == "rcnn":
        if extrapolated:
            log.info("R-CNN timing: %d windows per image timed, extrapolated linearly to all", max_windows)
            return {f"{T_CONV} (warp+conv+pool, extrapolated from {max_windows} windows)": conv / n}
        return {T_CONV: conv / n}  # warp + conv + pool of every window
    return {T_CONV: conv / n, T_POOL: pool / n}


def conv_finetuned(col: Column, props_tr: dict, num_classes: int, cache_root: str, proposals_key: dict):
    """The column's extractor on its network fine-tuned end to end, and the fine-tuning result.

    The fine-tuned variables and the result's numbers are stored under ``cache_root`` keyed by
    the pretrained network, the settings, the training records and the proposals, so a rerun
    in the same workdir reuses them (and with them the fine-tuned network's feature caches).
    """
    import flax.serialization
    from spp_jax.detection.features import SPPExtractor
    from spp_jax.serve import Server

    ex, cfg = col.extractor, dataclasses.replace(col.conv_finetune, scales=tuple(col.extractor.scales))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "log_every"}
    key = {"net": ex.server.fingerprint, "config": settings, "split": col.trainval.split,
           "n": len(col.trainval), "classes": num_classes, **proposals_key}
    stem = os.path.join(cache_root, "convft-" + hashlib.sha1(
        json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12])
    model = ex.server.model.clone(num_classes=num_classes)
    if os.path.exists(stem + ".json") and os.path.exists(stem + ".msgpack"):
        with open(stem + ".msgpack", "rb") as f:
            variables = flax.serialization.msgpack_restore(f.read())
        with open(stem + ".json") as f:
            meta = json.load(f)
        res = FC.ConvFinetuneResult(model, variables, variables["params"]["classifier"],
                                    tuple(meta["trained"]), meta["history"], meta["seconds"],
                                    meta["seconds_per_iter"], [tuple(s) for s in meta["shapes"]])
        log.info("conv fine-tuning: reusing %s.msgpack (%.0f s when it ran)", stem, res.seconds)
    else:
        os.makedirs(cache_root, exist_ok=True)
        res = FC.finetune_conv(ex.server, col.trainval, props_tr, num_classes, cfg)
        meta = {"key": key, "trained": list(res.trained), "history": res.history, "seconds": res.seconds,
                "seconds_per_iter": res.seconds_per_iter, "shapes": [list(s) for s in res.shapes]}
        for path, blob, mode in ((stem + ".msgpack", flax.serialization.msgpack_serialize(res.variables), "wb"),
                                 (stem + ".json", json.dumps(meta, default=float), "w")):
            with open(path + ".tmp", mode) as f:
                f.write(blob)
            os.replace(path + ".tmp", path)  # the .json last: present means complete
    server = Server(res.model, res.variables, ex.server.mean, bucket_step=ex.server.bucket_step,
                    pool_chunk=ex.server.pool_chunk)
    return SPPExtractor(server, ex.scales, ex.rule), res


def run_column(col: Column, props_tr: dict, props_te: dict, num_classes: int, cache_root: str,
               cfg: Table9Config, class_names: Sequence[str]) -> ColumnResult:
    """Fill one column: (end-to-end fine-tuning,) caches, fine-tuning, the rows, timing."""
    t0 = time.perf_counter()
    ex, K = col.extractor, num_classes
    pkey = cfg.proposals_key
    conv_ft = None
    if col.conv_finetune is not None:
        ex, conv_ft = conv_finetuned(col, props_tr, K + 1, cache_root, pkey)
    tr_cache = F.cache_features(
        col.trainval, props_tr, ex,
        F.FeatureCache(cache_root, {**ex.key(), **pkey, "split": col.trainval.split, "n": len(col.trainval)},
                       cfg.cache_dtype), flip=cfg.flip_finetune and conv_ft is None)  # flips: fc fine-tuning
    te_cache = F.cache_features(
        col.test, props_te, ex,
        F.FeatureCache(cache_root, {**ex.key(), **pkey, "split": col.test.split, "n": len(col.test),
                                    "gt": False}, cfg.cache_dtype), include_gt=False)
    timing = dict(measure_speed(ex, col.test, props_te, cfg.timing_images, cfg.timing_windows))
    if conv_ft is None:
        ft = FT.finetune(tr_cache, col.head0, K + 1, cfg.finetune, flips=cfg.flip_finetune)
    else:  # the end-to-end fc6-fc8 are the fine-tuned ones
        ft = FT.FinetuneResult(conv_ft.head, conv_ft.history[-1]["iter"], conv_ft.history, conv_ft.seconds)
        timing[T_FT_ITER] = conv_ft.seconds_per_iter
    timing[T_FT] = ft.seconds
    results, bb_det = {}, None
    rows = (("pool5", "pool5", None, False), ("fc6", "fc6", col.head0, False),
            ("ftfc6", "ftfc6", ft.params, False), ("ftfc7", "ftfc7", ft.params, True))
    for row, layer, head, bb in rows:
        if row == "fc6" and conv_ft is not None:
            continue  # no pretrained fc6 for the fine-tuned conv features
        det = D.train_detector(tr_cache, layer, K, head=head, bbox_reg=bb, config=cfg.detector)
        results[row] = D.test_detector(det, te_cache, class_names=class_names)
        timing[f"SVM train + mining s ({row})"] = det.timing["total_s"]
        if row in ("fc6", "ftfc6") and T_FC not in timing:
            timing[T_FC] = results[row].timing["fc_s_per_image"]
        if bb:
            results["ftfc7 bb"] = D.test_detector(det, te_cache, use_bbox_reg=True, class_names=class_names)
            bb_det = det
    conv = next((v for k, v in timing.items() if k.startswith(T_CONV)), None)
    if conv is not None:
        timing[T_TOTAL] = conv + timing.get(T_POOL, 0.0) + timing[T_FC]
    timing[T_COLUMN] = time.perf_counter() - t0
    log.info("column %s: %s; %.0f s", col.name, ex.describe(), timing[T_COLUMN])
    return ColumnResult(col.name, results, bb_det, te_cache, timing, ft)


def combine_columns(a: ColumnResult, b: ColumnResult, class_names=None) -> Any:
    """Table 12: the ``ftfc7 bb`` detectors of two columns, NMS over the union of their windows."""
    return D.test_combined([a.bb_detector, b.bb_detector], [a.test_cache, b.test_cache],
                           use_bbox_reg=True, class_names=class_names)


def _speedups(columns: Sequence[ColumnResult]) -> None:
    ref = next((c for c in columns if c.name == COL_RCNN and T_TOTAL in c.timing), None)
    if ref is None:
        return
    for c in columns:
        if T_TOTAL in c.timing and c.timing[T_TOTAL] > 0:
            c.timing[T_SPEEDUP] = ref.timing[T_TOTAL] / c.timing[T_TOTAL]


def run_table9(columns: Sequence[Column], props_tr: dict, props_te: dict, num_classes: int,
               cache_root: str, cfg: Table9Config, class_names: Sequence[str],
               combos: Sequence[tuple[str, str]] = (), proposal_seconds: float | None = None
               ) -> tuple[list[ColumnResult], dict]:
    """Run every column, then the requested combinations (pairs of column names).

    Returns (column results, {"A + B": DetectionResult}).
    """
    out = []
    for col in columns:
        log.info("=== column %s ===", col.name)
        out.append(run_column(col, props_tr, props_te, num_classes, cache_root, cfg, class_names))
        if proposal_seconds is not None:
            out[-1].timing[T_PROPOSALS] = proposal_seconds
    _speedups(out)
    by_name = {c.name: c for c in out}
    combined = {}
    for a, b in combos:
        if a in by_name and b in by_name:
            combined[f"{a} + {b}"] = combine_columns(by_name[a], by_name[b], class_names)
    return out, combined


def _ap_cells(name, res, class_names, cells):
    cells[(name, "mAP")] = 100 * res.mAP
    for nm, ap in zip(class_names, res.aps):
        cells[(name, nm)] = None if np.isnan(ap) else 100 * float(ap)


def _result_json(res) -> dict:
    """A DetectionResult as JSON: mAP and per-class APs (None for classes without objects)."""
    return {"mAP": res.mAP, "aps": [None if np.isnan(x) else float(x) for x in res.aps]}


def write_tables(workdir: str, title: str, columns: Sequence[ColumnResult], combined: dict,
                 class_names: Sequence[str], meta: dict) -> tuple[str, str]:
    """``voc_det.md`` / ``voc_det.json``: Table 9 (mAP), timing, per-class APs, Table 12."""
    cols = [c.name for c in columns]
    cells = {(row, c.name): 100 * c.results[row].mAP for c in columns for row in ROWS if row in c.results}
    timing = {(k, c.name): v for c in columns for k, v in c.timing.items()}
    seen = {k for k, _ in timing}
    # Per-image rows first (the paper's), then training stages, the column's wall time last.
    trows = ([r for r in TIMING_ORDER if r in seen]
             + sorted(r for r in seen if r not in TIMING_ORDER and r != T_COLUMN)
             + [r for r in (T_COLUMN,) if r in seen])
    md = [f"# Table 9 reproduction ({title})", "", "VOC 2007 11-point mAP (%) on the test split.", "",
          markdown_table(ROWS, cols, cells, corner="layer"), "",
          "## Timing (seconds per test image on this CPU, warm; training stages in seconds)", "",
          markdown_table(trows, cols, timing, corner="stage"), ""]
    ap_cols = ["mAP", *class_names]
    ap_cells = {}
    for c in columns:
        _ap_cells(f"{c.name} ftfc7 bb", c.results["ftfc7 bb"], class_names, ap_cells)
    md += ["## ftfc7 bb: AP per class (%)", "",
           markdown_table([f"{c} ftfc7 bb" for c in cols], ap_cols, ap_cells, corner="method"), ""]
    if combined:
        t12, rows12 = {}, []
        for name, res in combined.items():
            parts = name.split(" + ")
            for p in parts:
                r = f"{p} ftfc7 bb"
                if r not in rows12:
                    rows12.append(r)
                    t12.update({k: v for k, v in ap_cells.items() if k[0] == r})
            rows12.append(f"combination: {name}")
            _ap_cells(rows12[-1], res, class_names, t12)
        md += ["## Table 12: model combination (NMS over the union of scored windows)", "",
               markdown_table(rows12, ap_cols, t12, corner="method"), ""]
    md.append(f"Total wall time {meta.get('total_seconds', float('nan')):.0f} s.")
    data = {**meta, "rows": list(ROWS), "columns": cols,
            "cells": {f"{r}|{c}": v for (r, c), v in cells.items()},
            "timing": {f"{r}|{c}": v for (r, c), v in timing.items()},
            "results": {c.name: {r: _result_json(v) for r, v in c.results.items()} for c in columns},
            "finetune": {c.name: {"best_iter": c.finetune.best_iter, "seconds": c.finetune.seconds,
                                  "history": c.finetune.history} for c in columns},
            "combination": {n: _result_json(r) for n, r in combined.items()}}
    md_path, json_path = write_report(workdir, "voc_det", "\n".join(md), data)
    print("\n".join(md), flush=True)
    return md_path, json_path
