"""The transfer experiments as library functions (``experiments/voc_cls.py``, ``experiments/caltech101.py``).

:func:`run_voc` and :func:`run_caltech` each take a typed config
(:class:`spp_jax.transfer.config.VocClsConfig` / :class:`~spp_jax.transfer.config.CaltechConfig`)
and an output workdir. Both load a pretrained network (:func:`spp_jax.pretrained.load_pretrained`:
a ``make train`` workdir, read only, or a msgpack + sidecar), check the settings fit it,
open the images, write the resolved config as ``<name>_config.json``, extract features
per setting through the serving layer (cached under ``<workdir>/features``), train
linear SVMs per layer and write a table in the paper's layout (rows: layers; columns:
settings) as ``<name>.md`` / ``<name>.json`` plus ``<name>.png`` in the workdir.

As the paper (Appendix A), images are minus the constant 128 by default, not the
training mean image (``mean="image"`` subtracts that instead).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

import numpy as np

from spp_jax import atomic
from spp_jax import config_grammar as grammar
from spp_jax.errors import ConfigError, UserError
from spp_jax.pretrained import Pretrained, load_pretrained
from spp_jax.report import markdown_table, write_report
from spp_jax.serve import Server
from spp_jax.transfer import classify
from spp_jax.transfer.config import (CALTECH_SETTINGS, NO_CHECKPOINT_HELP, VOC_FULL_SIDE, CaltechConfig,
                                     TransferConfig, VocClsConfig, voc_settings)
from spp_jax.transfer.datasets import caltech_data, voc_cls_data
from spp_jax.transfer.features import LAYER_TITLES, FeatureExtractor, Setting

log = logging.getLogger(__name__)

__all__ = ["CALTECH_SETTINGS", "VOC_FULL_SIDE", "load_nets", "resolve_settings", "run_caltech", "run_voc",
           "voc_settings"]


def _input_sides(model) -> list[int]:
    """The square input sides in [1, 1024] the network takes (spp_jax.models.input_sides)."""
    from spp_jax.models import input_sides
    return input_sides(model.arch, model.spp)


def _check_fits(setting: Setting, model) -> None:
    """ConfigError unless the setting's input side fits the network (checked before any image is read)."""
    sides = _input_sides(model)
    if model.spp and setting.size < sides[0]:
        raise ConfigError(f"settings: {setting.key}: a {setting.size} px input is too small for "
                          f"{model.arch} (needs >= {sides[0]})")
    if not model.spp and setting.size not in sides:
        raise ConfigError(f"settings: {setting.key}: the no-SPP {model.arch} takes crops of {sides[0]}-"
                          f"{sides[-1]} px only (the paper's: 224)")


def resolve_settings(names: Sequence[str], nets: dict[bool, Pretrained | None]
                     ) -> tuple[list[Setting], list[str]]:
    """Settings runnable with the available nets, and notes on the skipped ones.

    Raises ConfigError when a setting's input side does not fit its net, or none can run.
    """
    out, notes = [], []
    for n in names:
        s = Setting.parse(n)
        if nets.get(s.spp) is None:
            notes.append(f"{s.title}: skipped, needs a{'n SPP' if s.spp else ' no-SPP'} checkpoint"
                         + ("" if s.spp else " (nospp_checkpoint=DIR: a workdir trained with spp=false, "
                                             "e.g. `make train MODEL=zf5 SPP=false SIZES=224 WORKDIR=runs/zf5-nospp`)"))
            continue
        _check_fits(s, nets[s.spp].model)
        out.append(s)
    if not out:
        raise ConfigError(f"settings: none of {','.join(names)} can run: " + "; ".join(notes))
    return out, notes


def load_nets(checkpoint: str | None, nospp: str | None = None) -> dict[bool, Pretrained | None]:
    """{True: the SPP net, False: the no-SPP net} (either may be None), each a `make train`
    workdir or a msgpack + sidecar (:func:`spp_jax.pretrained.load_pretrained`; nothing is written)."""
    if not checkpoint:
        raise UserError(NO_CHECKPOINT_HELP)
    nets: dict[bool, Pretrained | None] = {True: None, False: None}
    main = load_pretrained(checkpoint)
    nets[bool(main.model.spp)] = main
    if nospp:
        other = load_pretrained(nospp)
        if other.model.spp:
            raise UserError(f"nospp_checkpoint={nospp} holds an SPP net (spp=true): give a workdir "
                            f"trained with spp=false")
        nets[False] = other
    return nets


@dataclasses.dataclass
class _Prepared:
    """What both experiments need before reading any image: the resolved config, the nets,
    the settings that can run (and notes on the skipped ones), one extractor per net."""

    cfg: TransferConfig
    nets: dict[bool, Pretrained | None]
    settings: list[Setting]
    notes: list[str]
    fx: dict[bool, FeatureExtractor]


def _prepare(cfg: TransferConfig) -> _Prepared:
    """Validate ``cfg``, load the nets (read only), resolve and check the settings; no file is written."""
    cfg = grammar.validate(cfg)
    nets = load_nets(cfg.checkpoint, cfg.nospp_checkpoint or None)
    arch = next(n for n in nets.values() if n is not None).model.arch
    cfg = dataclasses.replace(cfg, settings=cfg.default_settings(arch))  # the columns run, as written
    settings, notes = resolve_settings(cfg.settings, nets)
    fx = {spp: FeatureExtractor(Server(net.model, net.variables, net.serving_mean(cfg.mean),
                                       bucket_step=cfg.bucket_step),
                                batch_size=cfg.batch_size, full_batch_size=cfg.full_batch_size)
          for spp, net in nets.items() if net is not None}
    return _Prepared(cfg, nets, settings, notes, fx)


def _write_config(cfg: TransferConfig, workdir: str, name: str) -> str:
    """The resolved config as ``<workdir>/<name>_config.json`` (not config.json: an output
    directory may be a training workdir, whose config.json must stay)."""
    path = grammar.write_config(cfg, workdir, f"{name}_config.json")
    log.info("config: %s", path)
    return path


def _plot(path: str, title: str, ylabel: str, layers: Sequence[str], series: dict[str, list], err=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(layers))
    for name, ys in series.items():
        ys = np.array([np.nan if y is None else y for y in ys], float)
        if err is not None:
            e = np.array([np.nan if v is None else v for v in err[name]], float)
            ax.errorbar(x, ys, yerr=e, marker="o", capsize=3, label=name)
        else:
            ax.plot(x, ys, marker="o", label=name)
    ax.set_xticks(x, [LAYER_TITLES[k] for k in layers])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _net_line(nets, fx, mean: str) -> str:
    parts = []
    for spp, net in nets.items():
        if net is not None:
            m = net.model
            parts.append(f"{'SPP' if spp else 'no-SPP'} {m.arch} (width {m.width}, fc {m.fc_dim}): "
                         f"{net.description} [net {fx[spp].fingerprint}]")
    what = "the constant 128 (Appendix A)" if mean == "constant" else "the training mean image"
    return "; ".join(parts) + f"; subtracting {what}"


LAYER_NOTE = ("conv4/conv5: the last two conv maps max-pooled to the 224-input map grid (13x13 for ZF-5; "
              "for a 224 crop the flattened map); pool5 (6×6): the no-SPP net's pool5, or the SPP pyramid's "
              "6x6 level; SPP pool5: the whole pyramid; fc6/fc7 after ReLU. Features L2-normalised, one "
              "linear SVM per class.")


# ---- VOC 2007 classification --------------------------------------------------------------


def _run_settings(settings, fx, layers, splits: dict, cache: str, progress: bool, score) -> dict:
    """Per setting: the features of every split once (cached), then ``score`` per layer.

    ``splits`` maps a progress label to a dataset; ``score(setting, layer, *features)``
    gets that layer's features of each split in order and returns the result dict,
    to which the SVM time is added. Returns {setting key: {"title", "layers", ...}}.
    """
    results: dict[str, dict] = {}
    for s in settings:
        ex = fx[s.spp]
        use = [k for k in layers if k in ex.layers]
        t = time.perf_counter()
        feats = [ex.extract(d, s, layers=use, cache_dir=cache, data_id=d.data_id, progress=progress,
                            desc=f"{s.key} {label}".strip()) for label, d in splits.items()]
        t_feat = time.perf_counter() - t
        res = {}
        for k in use:
            t = time.perf_counter()
            res[k] = score(s, k, *(f[k] for f in feats))
            res[k]["svm_seconds"] = time.perf_counter() - t
        results[s.key] = {"title": s.title, "layers": res, "feature_seconds": t_feat,
                          "compiled_programs": len(ex.programs.get(s.key, ()))}
        del feats
    return results


def run_voc(cfg: VocClsConfig, workdir: str, *, name: str = "voc_cls") -> dict:
    """Table 6: VOC-2007-classification mAP (%) per layer and setting, written to ``workdir``.

    ``cfg.settings`` none: :func:`voc_settings` of the loaded backbone. The config, and the
    settings against the loaded nets, are checked before any image is read or file written;
    the resolved config is written once the images are open. Returns ``<name>.json``'s data.
    """
    t0 = time.perf_counter()
    workdir = os.path.abspath(workdir)
    prep = _prepare(cfg)
    cfg = prep.cfg
    trainval, test = voc_cls_data(cfg.dataset, cfg.data_dir or None, trainval_size=cfg.trainval_size,
                                  test_size=cfg.test_size, seed=cfg.seed, limit=cfg.limit,
                                  cache_dir=os.path.join(workdir, "labels"), progress=cfg.progress)
    log.info("%s: %d trainval / %d test images, %d classes", cfg.dataset, len(trainval), len(test),
             trainval.num_classes)
    _write_config(cfg, workdir, name)

    def score(s, k, ftr, fte):
        r = classify.voc_classification(ftr, trainval.labels, fte, test.labels, cfg.svm_c)
        out = {"map": 100 * r["map"], "ap": [100 * a for a in r["ap"]], "dim": int(ftr.shape[1]),
               "converged": r["converged"]}
        log.info("%s %s: mAP %.2f (D=%d)", s.key, k, out["map"], out["dim"])
        return out

    results = _run_settings(prep.settings, prep.fx, cfg.layers, {"trainval": trainval, "test": test},
                            os.path.join(workdir, "features"), cfg.progress, score)
    md, data = _voc_report(prep, results, trainval, test)
    data["seconds"] = total = time.perf_counter() - t0
    text = "\n".join(md + [f"- total {total:.1f} s"])
    write_report(workdir, name, text, data)
    _plot(os.path.join(workdir, f"{name}.png"), f"VOC-style classification ({cfg.dataset})", "mAP (%)",
          cfg.layers, {r["title"]: [r["layers"].get(k, {}).get("map") for k in cfg.layers]
                       for r in results.values()})
    print(text, flush=True)
    return data


def _voc_report(prep: _Prepared, results: dict, trainval, test) -> tuple[list[str], dict]:
    """Table 6's markdown lines (without the total time) and JSON data."""
    cfg, layers = prep.cfg, prep.cfg.layers
    rows = [LAYER_TITLES[k] for k in layers]
    cols = [results[s.key]["title"] for s in prep.settings]
    cells = {(LAYER_TITLES[k], r["title"]): r["layers"][k]["map"]
             for r in results.values() for k in layers if k in r["layers"]}
    best = max(((r["layers"][k]["map"], r["title"], k) for r in results.values() for k in r["layers"]))
    per_class = {(n, r["title"]): r["layers"]["fc7"]["ap"][i] for r in results.values() if "fc7" in r["layers"]
                 for i, n in enumerate(trainval.class_names)}
    nets = _net_line(prep.nets, prep.fx, cfg.mean)
    md = [f"## Table 6: VOC 2007-style classification mAP (%), {cfg.dataset} "
          f"({len(trainval)} trainval / {len(test)} test images, {trainval.num_classes} classes)", "",
          markdown_table(rows, cols, cells, corner="layer"), "",
          f"Best (Table 8 style): {best[0]:.2f} mAP, {best[1]}, {LAYER_TITLES[best[2]]}.", "",
          f"Nets: {nets}.", "", LAYER_NOTE + f" SVM C = {cfg.svm_c}.", ""]
    if per_class:
        fc7_cols = [c for c in cols if (trainval.class_names[0], c) in per_class]
        md += ["### Per-class AP (%), fc7", "",
               markdown_table(list(trainval.class_names), fc7_cols, per_class, corner="class"), ""]
    md += _timing_lines(results, prep.notes)
    data = {"table": "6", "dataset": cfg.dataset, "num_trainval": len(trainval), "num_test": len(test),
            "class_names": list(trainval.class_names), "C": cfg.svm_c, "layers": list(layers),
            "settings": [s.key for s in prep.settings], "results": results, "notes": prep.notes,
            "nets": nets, "mean": cfg.mean, "config": grammar.config_dict(cfg)}
    return md, data


def _timing_lines(results: dict, notes: list[str]) -> list[str]:
    return ([f"- {r['title']}: features {r['feature_seconds']:.1f} s, {r['compiled_programs']} compiled "
             f"programs" for r in results.values()] + [f"- {n}" for n in notes])


# ---- Caltech101 ---------------------------------------------------------------------------


def run_caltech(cfg: CaltechConfig, workdir: str, *, name: str = "caltech101") -> dict:
    """Table 7: Caltech101-style accuracy (%), mean +- std over ``cfg.splits`` random splits (10,
    as the paper's "several"), per layer and setting, written to ``workdir``; as :func:`run_voc`."""
    t0 = time.perf_counter()
    workdir = os.path.abspath(workdir)
    prep = _prepare(cfg)
    cfg = prep.cfg
    pool = caltech_data(cfg.dataset, cfg.data_dir or None, pool_size=cfg.pool_size, seed=cfg.seed,
                        cache_dir=os.path.join(workdir, "labels"), progress=cfg.progress)
    k_cls = pool.num_classes
    # Only the images some split uses need features.
    split_idx = [classify.sample_split(pool.labels, k_cls, cfg.train_per_class, cfg.test_per_class, cfg.seed + s)
                 for s in range(cfg.splits)]
    used = np.unique(np.concatenate([np.concatenate(p) for p in split_idx]))
    log.info("%s: pool of %d images, %d classes, %d used by %d splits", cfg.dataset, len(pool), k_cls,
             len(used), cfg.splits)
    _write_config(cfg, workdir, name)
    labels = pool.labels[used]
    local = [(np.searchsorted(used, tr), np.searchsorted(used, te)) for tr, te in split_idx]

    def score(s, k, feats):
        r = classify.caltech_classification(feats, labels, k_cls, split_indices=local, C=cfg.svm_c)
        out = {"mean": 100 * r["mean"], "std": 100 * r["std"], "accuracy": [100 * a for a in r["accuracy"]],
               "overall": [100 * a for a in r["overall"]], "dim": int(feats.shape[1])}
        log.info("%s %s: %.2f +- %.2f (D=%d)", s.key, k, out["mean"], out["std"], out["dim"])
        return out

    results = _run_settings(prep.settings, prep.fx, cfg.layers, {"": _Subset(pool, used)},
                            os.path.join(workdir, "features"), cfg.progress, score)
    md, data = _caltech_report(prep, results, pool, used, [len(p[1]) for p in split_idx])
    data["seconds"] = total = time.perf_counter() - t0
    text = "\n".join(md + [f"- total {total:.1f} s"])
    write_report(workdir, name, text, data)
    _plot(os.path.join(workdir, f"{name}.png"), f"Caltech101-style classification ({cfg.dataset})",
          "accuracy (%)", cfg.layers,
          {r["title"]: [r["layers"].get(k, {}).get("mean") for k in cfg.layers] for r in results.values()},
          err={r["title"]: [r["layers"].get(k, {}).get("std") for k in cfg.layers] for r in results.values()})
    print(text, flush=True)
    return data


def _caltech_report(prep: _Prepared, results: dict, pool, used, n_test: list[int]) -> tuple[list[str], dict]:
    """Table 7's markdown lines (without the total time) and JSON data."""
    cfg, layers, k_cls = prep.cfg, prep.cfg.layers, pool.num_classes
    rows = [LAYER_TITLES[k] for k in layers]
    cols = [results[s.key]["title"] for s in prep.settings]
    cells = {(LAYER_TITLES[k], r["title"]): f"{r['layers'][k]['mean']:.2f} ± {r['layers'][k]['std']:.2f}"
             for r in results.values() for k in layers if k in r["layers"]}
    best = max(((r["layers"][k]["mean"], r["layers"][k]["std"], r["title"], k)
                for r in results.values() for k in r["layers"]))
    nets = _net_line(prep.nets, prep.fx, cfg.mean)
    md = [f"## Table 7: Caltech101-style accuracy (%), {cfg.dataset} ({k_cls} classes, {cfg.train_per_class} "
          f"training and up to {cfg.test_per_class} test images per class, mean ± std over {cfg.splits} random "
          f"splits)", "",
          markdown_table(rows, cols, cells, corner="layer"), "",
          f"Best (Table 8 style): {best[0]:.2f} ± {best[1]:.2f}, {best[2]}, {LAYER_TITLES[best[3]]}.", "",
          f"Accuracy = mean of per-class accuracies. Pool: {len(pool)} images ({len(used)} used); "
          f"test images per split: {min(n_test)}-{max(n_test)}.", "",
          f"Nets: {nets}.", "", LAYER_NOTE + f" SVM C = {cfg.svm_c}.", ""]
    md += _timing_lines(results, prep.notes)
    data = {"table": "7", "dataset": cfg.dataset, "pool_size": len(pool), "num_used": int(len(used)),
            "num_classes": k_cls, "class_names": list(pool.class_names), "splits": cfg.splits,
            "train_per_class": cfg.train_per_class, "test_per_class": cfg.test_per_class,
            "test_images": n_test, "C": cfg.svm_c, "layers": list(layers),
            "settings": [s.key for s in prep.settings], "results": results, "notes": prep.notes,
            "nets": nets, "mean": cfg.mean, "config": grammar.config_dict(cfg)}
    return md, data


class _Subset:
    """Images ``indices`` of a collection, in that order (``data_id`` names the subset)."""

    def __init__(self, base, indices):
        import hashlib

        self.base, self.indices = base, np.asarray(indices)
        h = hashlib.sha1(self.indices.astype(np.int64).tobytes()).hexdigest()[:10]
        self.data_id = f"{base.data_id}-sub{len(self.indices)}-{h}"

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[int(self.indices[i])]
