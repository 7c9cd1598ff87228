"""The transfer experiments' configs: :class:`VocClsConfig` (Table 6) and :class:`CaltechConfig` (Table 7).

Both are declared with :func:`spp_jax.config_grammar.option`, so ``python -m
experiments.voc_cls`` and ``python -m experiments.caltech101`` share the grammar of
``experiments.train``: ``--preset NAME``, then ``key=value`` overrides (typed, range
checked, one-line errors), ``--help`` listing every key.  The dataclass defaults are the
paper's settings on the real data (VOC 2007, Caltech101 from TFDS; SPP_FACTS section 5);
the presets:

* ``embedded`` (the entry points' default): the same on the embedded shapes data;
* ``quick``: a smoke run on the embedded data (a few images, 2 small splits);
* ``paper``: the defaults (the real data, prepared once with TFDS).

A config is checked whole before any work (:func:`spp_jax.config_grammar.validate`):
types, ranges, setting names, no repeated setting or layer, a checkpoint given, and
(Caltech on the embedded data) a pool large enough for the splits.  What depends on the
network (do the settings' input sides fit it?) is checked by
:func:`spp_jax.transfer.run.resolve_settings` once the network is loaded, still before any
image is read.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

from spp_jax import config_grammar as grammar
from spp_jax.config_grammar import option
from spp_jax.data import shapes
from spp_jax.errors import ConfigError
from spp_jax.pretrained import MEAN_CHOICES
from spp_jax.train.config import SEED_LIMIT
from spp_jax.transfer.classify import DEFAULT_C
from spp_jax.transfer.datasets import CALTECH_DATASETS, VOC_DATASETS
from spp_jax.transfer.features import LAYERS, Setting

__all__ = ["CALTECH_PRESETS", "CALTECH_SETTINGS", "CaltechConfig", "NO_CHECKPOINT_HELP", "TransferConfig",
           "VOC_PRESETS", "VocClsConfig", "output_workdir", "parse_command_line"]

CALTECH_SETTINGS = ("nospp_crop224", "spp_crop224", "spp_full224")
NO_CHECKPOINT_HELP = (
    "checkpoint: a pretrained network is needed: pass checkpoint=DIR, a workdir made by `make train`, "
    "e.g. `make train MODEL=zf5 WORKDIR=runs/zf5` (embedded data), then checkpoint=runs/zf5 "
    "(`make voc_cls WORKDIR=runs/zf5` does both)")


def _settings_violation(names: Sequence[str]) -> str | None:
    """Why a tuple of setting names is not usable (unparseable, impossible, repeated), or None."""
    for n in names:
        try:
            Setting.parse(n)
        except ValueError as e:
            return str(e)
    return _repeated(names)


def _repeated(values: Sequence) -> str | None:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    return f"{seen[0]} is given twice" if seen else None


def _dataset(default: str, help: str, choices: Sequence[str] | None):
    return option(default, help, group="data", choices=choices)


def _settings(default, help: str):
    return option(default, "columns: spp|nospp _ crop|full SIDE [r RESIZE], e.g. spp_full392; " + help,
                  group="features", min_len=1, check=_settings_violation)


@dataclasses.dataclass
class TransferConfig:
    """The keys both transfer experiments share (use :class:`VocClsConfig` or :class:`CaltechConfig`)."""

    # --- the pretrained networks (spp_jax.pretrained.load_pretrained; only read) ---
    checkpoint: str = option("", "the SPP net: a `make train` workdir (e.g. runs/zf5), or a .msgpack "
                                 "file with its .json sidecar; required", group="network")
    nospp_checkpoint: str = option("", "a workdir trained with spp=false, for the 'no SPP crop 224' "
                                       "column ('': that column is skipped)")
    mean: str = option("constant", "constant: subtract 128 (the paper's Appendix A); image: the "
                                   "training mean image", choices=MEAN_CHOICES)

    # --- data ---
    dataset: str = _dataset("", "the images (declared by each experiment)", None)
    data_dir: str = option("", "TFDS data_dir of the real datasets ('': TFDS's default, "
                               "~/tensorflow_datasets)")
    seed: int = option(0, "seed of the embedded images (and of Caltech's random splits)", ge=0,
                       lt=SEED_LIMIT)

    # --- features (spp_jax.transfer.features) ---
    settings: Optional[tuple[str, ...]] = _settings(None, "none: the experiment's table")
    layers: tuple[str, ...] = option(LAYERS, "rows: the layers whose features are classified",
                                     choices=LAYERS, min_len=1, check=_repeated)
    batch_size: int = option(16, "crops per compiled batch", ge=1)
    full_batch_size: int = option(4, "full images per compiled batch (a bucket's last batch is padded)",
                                  ge=1)
    bucket_step: float = option(0.5, "full images are padded to multiples of this fraction of their "
                                     "shorter side (fewer compiled shapes; results are exact)", gt=0, le=1)

    # --- classifier, run ---
    svm_c: float = option(DEFAULT_C, "linear SVM C (features are L2-normalised)", group="classifier", gt=0)
    progress: bool = option(True, "progress bars on stderr", group="run")

    def cross_check(self) -> None:
        if not self.checkpoint:
            raise ConfigError(NO_CHECKPOINT_HELP)

    def default_settings(self, arch: str) -> tuple[str, ...]:
        """The columns used when ``settings`` is none (the experiment's table for backbone ``arch``)."""
        raise NotImplementedError


# Table 6's best full-image size: 392 for ZF-5, 364 for Overfeat-7 (SPP_FACTS section 5).
# Convnet*-5 shares ZF-5's stride 16 and Overfeat-5 Overfeat-7's stride 12; giving them
# 392 and 364 is our choice (the paper states the two above only).
VOC_FULL_SIDE = {"zf5": 392, "convnet5": 392, "overfeat5": 364, "overfeat7": 364}


def voc_settings(arch: str) -> tuple[str, ...]:
    """Table 6's columns for a backbone: no-SPP crop, SPP crop, SPP full 224 and full 392 / 364."""
    return ("nospp_crop224", "spp_crop224", "spp_full224", f"spp_full{VOC_FULL_SIDE[arch]}")


@dataclasses.dataclass
class VocClsConfig(TransferConfig):
    """Table 6: VOC 2007 classification mAP with linear SVMs (``python -m experiments.voc_cls``)."""

    dataset: str = _dataset("voc/2007", "voc/2007: TFDS (trainval: train + validation; test), "
                                        "prepared once (README); shapes: the embedded multi-label "
                                        "variant", VOC_DATASETS)
    settings: Optional[tuple[str, ...]] = _settings(
        None, "none: Table 6's nospp_crop224, spp_crop224, spp_full224 and spp_full392 (zf5, "
              "convnet5) or spp_full364 (overfeat5, overfeat7)")
    trainval_size: int = option(500, "shapes: trainval images generated; voc/2007 with limit=true: "
                                     "the first N trainval images", group="image counts", ge=1)
    test_size: int = option(300, "shapes: test images generated; voc/2007 with limit=true: the first N",
                            ge=1)
    limit: bool = option(False, "voc/2007: use only the first trainval_size / test_size images (a "
                                "smoke run); false: all of them")

    def default_settings(self, arch: str) -> tuple[str, ...]:
        return self.settings or voc_settings(arch)


@dataclasses.dataclass
class CaltechConfig(TransferConfig):
    """Table 7: Caltech101 accuracy with linear SVMs over random splits (``python -m experiments.caltech101``)."""

    dataset: str = _dataset("caltech101", "caltech101: TFDS (train + test pooled, 102 classes), "
                                          "prepared once (README); shapes: the embedded 30-class fine "
                                          "variant", CALTECH_DATASETS)
    settings: Optional[tuple[str, ...]] = _settings(CALTECH_SETTINGS, "none: the default")
    pool_size: int = option(2400, "shapes: images in the pool the splits draw from (about pool_size / "
                                  "30 per class)", group="splits", ge=1)
    splits: int = option(10, "random train/test splits; accuracy is mean +- std over them", ge=1)
    train_per_class: int = option(30, "training images per class and split", ge=1)
    test_per_class: int = option(50, "test images per class and split, at most (of the rest)", ge=1)

    def cross_check(self) -> None:
        super().cross_check()
        k = shapes.num_classes("fine")
        need = k * (self.train_per_class + 1)
        if self.dataset == "shapes" and self.pool_size < need:
            raise ConfigError(f"pool_size={self.pool_size} is too small for train_per_class="
                              f"{self.train_per_class}: the {k} classes need {self.train_per_class} "
                              f"training images and one test image each, so pool_size >= {need}")

    def default_settings(self, arch: str) -> tuple[str, ...]:
        return self.settings or CALTECH_SETTINGS


VOC_PRESETS: dict[str, dict[str, Any]] = {
    "embedded": {"dataset": "shapes"},
    "quick": {"dataset": "shapes", "trainval_size": 40, "test_size": 24, "limit": True},
    "paper": {},
}
CALTECH_PRESETS: dict[str, dict[str, Any]] = {
    "embedded": {"dataset": "shapes"},
    "quick": {"dataset": "shapes", "pool_size": 450, "splits": 2, "train_per_class": 3, "test_per_class": 3},
    "paper": {},
}
DEFAULT_PRESET = "embedded"

# The pre-grammar flags, for the one-line error that names their key=value spelling.
_OLD_FLAGS = {"checkpoint_workdir": "checkpoint=DIR", "nospp_checkpoint_workdir": "nospp_checkpoint=DIR",
              "quick": "--preset quick", "no_progress": "progress=false"}


def parse_command_line(cls, presets: Mapping[str, Mapping[str, Any]], description: str,
                       argv: Sequence[str] | None, task: str) -> tuple[Any, str]:
    """``[--preset NAME] [--workdir DIR] [key=value ...]`` -> (validated config, output workdir).

    ``--help`` prints every key and exits 0; every mistake raises ConfigError (nothing is
    read or written here).  ``task`` names the default output workdir, ``<checkpoint>-<task>``.
    """
    ap = grammar.cli_parser(cls, description, presets=presets, default_preset=DEFAULT_PRESET)
    ap.add_argument("--workdir", default=None, help=f"output directory (default: <checkpoint>-{task})")
    args, extras = ap.parse_known_intermixed_args(argv)
    grammar.reject_flags(extras, cls, _OLD_FLAGS)
    if extras:
        raise ConfigError(f"unexpected argument {extras[0]!r} (see --help)")
    cfg = grammar.from_preset(cls, presets, args.preset, args.overrides)
    return cfg, output_workdir(cfg, args.workdir, task)


def output_workdir(cfg: TransferConfig, workdir: str | None, task: str) -> str:
    """``workdir``, or by default ``<checkpoint>-<task>`` next to the checkpoint."""
    return workdir or os.path.normpath(cfg.checkpoint) + f"-{task}"
