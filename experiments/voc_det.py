"""Table 9: SPP-net detection (1 and 5 scales) vs R-CNN mode, on shapes or VOC 2007; Table 12.

    python -m experiments.voc_det [--preset embedded|quick|paper] [--workdir DIR] [key=value ...]

Examples:
    python -m experiments.voc_det                                  # embedded data (make voc_det)
    python -m experiments.voc_det scales=1 rcnn=false              # the SPP 1-scale column alone
    python -m experiments.voc_det scales=5 rcnn=false second_checkpoint=runs/zf5-seed1   # Table 12
    python -m experiments.voc_det --preset quick --workdir /tmp/vd  # a tiny end-to-end run
    python -m experiments.voc_det finetune_conv=conv3              # + "SPP 1-scale, conv fine-tuned"
    python -m experiments.voc_det --preset paper checkpoint=runs/zf5 data_dir=/data/tfds

The preset (``embedded`` by default) sets its keys, then each key=value wins; the
defaults listed below are the paper's (VOC 2007).  The config, the checkpoints, the TFDS
directory and a proposals file are all checked before any backbone is pretrained or
loaded; the resolved config is written to ``WORKDIR/voc_det_config.json``.  Writes
``WORKDIR/voc_det.md`` / ``.json`` (rows pool5, fc6, ftfc6, ftfc7, ftfc7 bb; columns
SPP 1-scale, SPP 5-scale, R-CNN; timing rows; AP per class; Table 12's model
combination) and ``WORKDIR/voc_det_detections.png``, assembled by
:mod:`experiments.voc_det_tables`; caches (proposals, pool5) go to ``WORKDIR/cache``
so an interrupted run resumes.  Without ``checkpoint``, on the embedded data, the
ZF-5 backbone is pretrained first (single-size, as the paper's detection backbone;
``pretrain_multisize=true`` for the 180/224 one), or the finished run in the
pretraining workdir is reused.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from spp_jax import config_grammar as grammar
from spp_jax import host_memory
from spp_jax.config_grammar import user_errors
from spp_jax.detection.config import (VocDetConfig, check_data_dir, parse_command_line, pretrain_config,
                                      pretrain_workdir)
from spp_jax.devices import log_devices

log = logging.getLogger("experiments.voc_det")

CONFIG_FILE = "voc_det_config.json"


def main(argv=None):
    with user_errors(FileNotFoundError, KeyError, ValueError):
        cfg, workdir = parse_command_line(argv, __doc__)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain chatter
        log_devices()
        run(cfg, workdir)


@dataclasses.dataclass
class Inputs:
    """The images and, when given as a file, the proposals (validated against the images' ids)."""

    trainval: object
    test: object
    proposals: dict | None  # image_id -> (R, 4) boxes, from cfg.proposals; None: selective search
    proposals_key: dict


def check_files(cfg: VocDetConfig) -> None:
    """The cheap checks of every path the config names (no arrays read, nothing written)."""
    from spp_jax.pretrained import check_pretrained_path

    check_data_dir(cfg)
    for path in (cfg.checkpoint, cfg.second_checkpoint):
        if path:
            check_pretrained_path(path)
    check_pretraining(cfg)


def pretrains_here(cfg: VocDetConfig) -> bool:
    """Whether the backbone is pretrained in :func:`pretrain_workdir` (no checkpoint given, on
    the embedded data, not the pipeline-only random backbone)."""
    return not cfg.checkpoint and not cfg.random_backbone and cfg.dataset == "shapes"


def check_pretraining(cfg: VocDetConfig) -> None:
    """A pretraining workdir that holds another recipe's run (e.g. one trained there by hand
    with the training preset, whose input and dropout the recipe does not share) stops here,
    with the detection keys that get past it: training's own error names --workdir and
    overwrite=true, which voc_det does not take."""
    from spp_jax.errors import UserError
    from spp_jax.train.workdir import run_changes

    if not pretrains_here(cfg):
        return
    workdir = pretrain_workdir(cfg)
    changes = run_changes(workdir, pretrain_config(cfg))
    if changes:
        raise UserError(f"{workdir} holds a backbone pretrained with another recipe "
                        f"({'; '.join(changes)}): detect with it as checkpoint={workdir}, or "
                        f"pretrain anew with pretrain_workdir=DIR")


def open_inputs(cfg: VocDetConfig) -> Inputs:
    """The two splits and a proposals file, read and checked (before any backbone work)."""
    from spp_jax.detection import proposals as P
    from spp_jax.detection import records as R

    def split(name, size):
        return R.load_records(cfg.dataset, name, size=size if cfg.sized() else None,
                              data_dir=cfg.data_dir or None)

    tr, te = split("trainval", cfg.trainval_size), split("test", cfg.test_size)
    if not cfg.proposals:
        return Inputs(tr, te, None, {"proposals": "ss-fast"})
    ids = [r["image_id"] for r in tr] + [r["image_id"] for r in te]
    props = P.load_proposal_file(cfg.proposals, ids)
    return Inputs(tr, te, props, {"proposals": "file", "proposals_sha1": P.file_sha1(cfg.proposals)})


def backbone(cfg: VocDetConfig, num_classes: int):
    """The pretrained network to detect with: checkpoint, a random one, or pretrained here."""
    from spp_jax.pretrained import load_pretrained, random_pretrained

    if cfg.checkpoint:
        return load_pretrained(cfg.checkpoint)
    if not pretrains_here(cfg):
        return random_pretrained("zf5", num_classes=num_classes)
    from spp_jax.train.experiment import train_and_evaluate

    workdir, tcfg = pretrain_workdir(cfg), pretrain_config(cfg)
    done = os.path.exists(os.path.join(workdir, "run_summary.json"))
    log.info("no checkpoint: %s %s on the embedded data in %s", "reusing the finished" if done
             else "pretraining (or resuming)", tcfg.model, workdir)
    train_and_evaluate(tcfg, workdir)
    return load_pretrained(workdir)


def columns_for(cfg: VocDetConfig, nets, inputs: Inputs):
    """Table 9's columns (SPP per scale count and network, R-CNN) and the pairs to combine (Table 12).

    ``nets``: [(suffix, Pretrained, Server)], the first network first. A new column is one
    more ``T.Column`` here (with its key in VocDetConfig).
    """
    from experiments import voc_det_tables as T
    from spp_jax.detection import scales as S
    from spp_jax.detection.features import SPPExtractor
    from spp_jax.detection.rcnn import RCNNExtractor

    tr, te = inputs.trainval, inputs.test
    columns, combos = [], []
    first_n = 5 if cfg.scales == (5,) else 1  # the second network's column is at the first one's scales
    for suffix, b, sv in nets:
        head0 = b.variables["params"]["classifier"]
        for n, name in ((1, T.COL_SPP1), (5, T.COL_SPP5)):
            if n in cfg.scales and (not suffix or n == first_n):
                ex = SPPExtractor(sv, S.scales_by_name(n, cfg.use_874), cfg.scale_rule)
                columns.append(T.Column(name + suffix, ex, head0, tr, te))
    if cfg.rcnn:
        tr_c, te_c = tr, te
        if cfg.rcnn_images is not None:
            tr_c = tr.subset(range(min(cfg.rcnn_images, len(tr))), tr.split + "-rcnn")
            te_c = te.subset(range(min(cfg.rcnn_images, len(te))), te.split + "-rcnn")
            log.info("R-CNN column on %d/%d images only", len(tr_c), len(te_c))
        columns.append(T.Column(T.COL_RCNN, RCNNExtractor(nets[0][2]), nets[0][1].variables["params"]["classifier"],
                                tr_c, te_c))
    if cfg.finetune_conv != "none":  # last: the other columns are done (and cached) first
        from spp_jax.detection.finetune_conv import ConvFinetuneConfig
        conv_ft = ConvFinetuneConfig(from_layer=cfg.finetune_conv, lrs=cfg.conv_ft_lrs,
                                     iter_scale=cfg.conv_ft_iter_scale, flip=cfg.flip)
        columns.append(T.Column(T.COL_SPP1_CONV, SPPExtractor(nets[0][2], S.SCALES_1, cfg.scale_rule),
                                nets[0][1].variables["params"]["classifier"], tr, te, conv_finetune=conv_ft))
    names = [c.name for c in columns]
    if T.COL_SPP1 in names and T.COL_SPP5 in names:
        combos.append((T.COL_SPP1, T.COL_SPP5))  # two detectors of one network
    if len(nets) > 1:
        first = T.COL_SPP5 if first_n == 5 else T.COL_SPP1
        combos.append((first, first + " (2)"))  # the paper's Table 12: two networks
    return columns, combos


def run(cfg: VocDetConfig, workdir: str) -> None:
    from experiments import voc_det_tables as T
    from spp_jax.detection import proposals as P
    from spp_jax.detection.draw import draw_detections
    from spp_jax.detection.finetune import FinetuneConfig
    from spp_jax.pretrained import load_pretrained
    from spp_jax.serve import Server

    t0 = time.perf_counter()
    check_files(cfg)  # every check before the first expensive step (pretraining, loading, proposals)
    inputs = open_inputs(cfg)
    tr, te = inputs.trainval, inputs.test
    grammar.write_config(cfg, workdir, CONFIG_FILE)
    K = len(tr.classes)
    net = backbone(cfg, K + 1)
    log.info("backbone: %s", net.description)
    cache = os.path.join(workdir, "cache")
    pst = {}
    if inputs.proposals is not None:
        props_tr = props_te = inputs.proposals
    else:
        props_tr = P.compute_proposals(tr, cache, workers=cfg.workers, stats=pst)
        props_te = P.compute_proposals(te, cache, workers=cfg.workers)

    def server(b):  # one serving layer per network: its programs are shared by its columns
        return Server(b.model, b.variables, b.serving_mean(cfg.mean))

    nets = [("", net, server(net))]
    if cfg.second_checkpoint:
        second = load_pretrained(cfg.second_checkpoint)
        log.info("second network: %s", second.description)
        nets.append((" (2)", second, server(second)))
    columns, combos = columns_for(cfg, nets, inputs)
    tcfg = T.Table9Config(finetune=FinetuneConfig(lrs=cfg.ft_lrs, iter_scale=cfg.ft_iter_scale),
                          flip_finetune=cfg.flip, timing_windows=cfg.rcnn_timing_windows,
                          cache_dtype=cfg.cache_dtype, proposals_key=inputs.proposals_key)
    results, combined = T.run_table9(columns, props_tr, props_te, K, cache, tcfg, tr.classes, combos,
                                     pst.get("seconds_per_image"))
    meta = {"dataset": cfg.dataset, "backbone": net.description, "trainval_images": len(tr),
            "test_images": len(te), "total_seconds": time.perf_counter() - t0,
            "config": grammar.config_dict(cfg), "flip_finetune": cfg.flip, "mean": cfg.mean}
    md_path, _ = T.write_tables(workdir, f"{cfg.dataset}, backbone: {net.description}", results, combined,
                                tr.classes, meta)
    best = next((r for r in results if r.name == T.COL_SPP1), results[0])
    draw_detections(te, best.results["ftfc7 bb"].detections,
                    os.path.join(workdir, "voc_det_detections.png"), tr.classes)
    log.info("wrote %s (%.0f s in all)", md_path, time.perf_counter() - t0)


if __name__ == "__main__":
    host_memory.restart_with_kept_memory()  # once, before any work: CPU steps stop page-faulting
    main()
