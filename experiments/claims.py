"""The paper's classification claims in miniature: Table 2 and the testing views, over seeds.

    python -m experiments.claims [--workdir runs/claims] [--preset embedded|quick] [key=value ...]

Trains every (model, variant, seed) of the grid in WORKDIR/<model>/<variant>/seed<k>, each
a `make train` run (resumable; a run whose eval.json holds its exact config is reused), on
the same embedded images (data_seed) with different initialisations (seed), tests each with
the protocols, and writes WORKDIR/claims.md, claims.json and claims.png: Table 2 and the
views tables with mean ± std over seeds, and a verdict per claim.  Every finished SPP run
is then also tested whole at several test scales (`scale_sides`; claims_scale.png): how
far multi-size training makes the network robust to objects bigger or smaller than in
training; on the embedded data, each run's errors are also split by the size of the images'
main object (terciles). Variants are compared paired over seeds (a seed fixes the initial
weights and the images, order and augmentation of every variant).

A controlled probe: `baseline=runs/claims baseline_keys=dataset=shapes` in a grid trained
with `dataset=shapes_wide` reads the baseline grid's finished runs (never trains them) and
reports whether each claim's gain grows from the baseline to this grid, paired over seeds,
and the change's own effect per cell (top-1 error per view, epochs on the chance plateau);
a training change works alike, e.g. `variants=multi dropout=0 baseline=runs/claims
baseline_keys=dropout=0.5`.

Keys: the grid's own (listed below) and any training key (`python -m experiments.train
--help`), which then applies to every run, e.g. `val_examples=2000`.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from spp_jax import config_grammar as grammar
from spp_jax import host_memory
from spp_jax.config_grammar import option, user_errors
from spp_jax.devices import log_devices
from spp_jax.errors import ConfigError
from spp_jax.train.config import PRESETS as TRAIN_PRESETS
from spp_jax.train.config import TrainConfig


def _models():
    from spp_jax.models import MODEL_NAMES
    return MODEL_NAMES


def _variant_keys():
    from spp_jax.train.grid import VARIANTS
    return tuple(v.key for v in VARIANTS)


@dataclasses.dataclass
class ClaimsConfig:
    models: tuple[str, ...] = option(("zf5", "overfeat7"), "backbones (rows of Table 2)",
                                     choices=_models, min_len=1)
    variants: tuple[str, ...] = option(("nospp", "single", "multi"),
                                       "no SPP (224), SPP single-size (224), SPP multi-size "
                                       "(180/224): the columns", choices=_variant_keys, min_len=1)
    seeds: tuple[int, ...] = option((0, 1, 2), "initialisation seeds (the `seed` key of each "
                                               "run)", ge=0, lt=2 ** 31, min_len=1)
    data_seed: int = option(0, "the embedded images' seed, the same in every run", ge=0,
                            lt=2 ** 31)
    train_preset: str = option("embedded", "training preset every run starts from",
                               choices=tuple(TRAIN_PRESETS))
    scale_sides: tuple[int, ...] = option(
        (160, 192, 224, 256, 320, 384), "the test-scale probe: every SPP run's 1-full view at "
        "these test shorter sides (pixels; empty: no probe)", ge=96, le=1024)
    train: bool = option(True, "false: train nothing; tables from the runs finished so far, "
                               "the others listed as missing")
    baseline: str = option("", "a controlled probe: the workdir of the same grid trained with "
                               "`baseline_keys` instead (its finished runs are read, never "
                               "trained); the report compares each claim's gain in the two")
    baseline_keys: tuple[str, ...] = option((), "the training keys (key=value) that the baseline "
                                                "grid had, e.g. dataset=shapes")


PRESETS = {
    "embedded": {},
    # A smoke run of the whole pipeline: one model, two seeds (add tiny training keys).
    "quick": {"models": ("zf5",), "seeds": (0, 1)},
}


def split_overrides(items) -> tuple[list[str], list[str]]:
    """(grid keys, training keys) of ``key=value`` strings; unknown keys are a ConfigError."""
    mine = {f.name for f in dataclasses.fields(ClaimsConfig)}
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    grid_items, train_items = [], []
    for item in items:
        key = item.split("=", 1)[0].strip()
        if key in mine:
            grid_items.append(item)
        elif key in train:
            if key in ("model", "seed", "data_seed", "spp", "sizes", "size_schedule"):
                raise ConfigError(f"{key} is set by the grid for each run; use models=, seeds=, "
                                  f"data_seed= or variants= instead")
            train_items.append(item)
        else:
            raise ConfigError(f"unknown key {key!r}: neither a grid key ({', '.join(sorted(mine))}) "
                              f"nor a training key (python -m experiments.train --help)")
    return grid_items, train_items


def plan_baseline(cfg: ClaimsConfig, train_items: list[str], variants, first: TrainConfig):
    """(planned runs of the baseline grid, (this grid's, the baseline's) differing keys as
    ``key=value`` text); ([], None) without a baseline.  Checked before anything trains, so
    a wrong baseline fails now rather than after the grid's hours of training."""
    from spp_jax.train import grid
    if bool(cfg.baseline) != bool(cfg.baseline_keys):
        raise ConfigError("baseline= and baseline_keys= go together: the baseline grid's workdir "
                          "and the training keys it differs in")
    if not cfg.baseline:
        return [], None
    if not os.path.isdir(cfg.baseline):
        raise ConfigError(f"baseline={cfg.baseline}: no such directory")
    grid_items, base_items = split_overrides(cfg.baseline_keys)
    if grid_items or not base_items:
        raise ConfigError(f"baseline_keys={','.join(cfg.baseline_keys)}: must be training keys")
    runs = grid.plan(cfg.train_preset, [*train_items, *base_items], cfg.baseline,
                     models=cfg.models, variants=variants, seeds=cfg.seeds, data_seed=cfg.data_seed)
    keys = [i.split("=", 1)[0].strip() for i in base_items]
    mine, theirs = grammar.config_dict(first), grammar.config_dict(runs[0].config)
    here = ", ".join(f"{k}={mine[k]}" for k in keys)
    there = ", ".join(f"{k}={theirs[k]}" for k in keys)
    if here == there:
        raise ConfigError(f"baseline_keys={','.join(cfg.baseline_keys)}: the same as this grid's")
    if not any(grid.finished(r) for r in runs):
        raise ConfigError(_no_baseline_runs(cfg))
    return runs, (here, there)


def _no_baseline_runs(cfg: ClaimsConfig) -> str:
    return (f"baseline={cfg.baseline}: no run of that grid has finished with "
            f"{','.join(cfg.baseline_keys)} and this grid's other keys")


def main(argv=None):
    ap = grammar.cli_parser(ClaimsConfig, __doc__, presets=PRESETS, default_preset="embedded")
    ap.add_argument("--workdir", default="runs/claims", help="the grid's root (default: runs/claims)")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A no-op when an import already configured logging (absl does, at WARNING, when orbax
    # logs at import): the package level makes the start-up lines show either way.
    logging.getLogger("spp_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain chatter
    from spp_jax.train import claims, controlled, grid, object_size
    with user_errors(FileNotFoundError):
        grid_items, train_items = split_overrides(args.overrides)
        cfg = grammar.from_preset(ClaimsConfig, PRESETS, args.preset, grid_items)
        variants = [v for v in grid.VARIANTS if v.key in cfg.variants]
        runs = grid.plan(cfg.train_preset, train_items, args.workdir, models=cfg.models,
                         variants=variants, seeds=cfg.seeds, data_seed=cfg.data_seed)
        base_runs, labels = plan_baseline(cfg, train_items, variants, runs[0].config)
        log_devices(runs[0].config.distributed)
        if cfg.train:  # a report-only pass leaves the grid's recorded config alone
            grammar.write_config(cfg, args.workdir, "claims_config.json")
        logging.info("claims grid: %d runs in %s", len(runs), os.path.abspath(args.workdir))
        results = grid.run_grid(runs, train=cfg.train)
        if not results:
            raise ConfigError(f"train=false and no run of the grid has finished in {args.workdir}")
        missing = grid.unfinished(runs, results)
        results = grid.probe_scales(results, cfg.scale_sides)
        first = runs[0].config
        baseline = None
        if base_runs:
            # Read again: the baseline grid may have finished more runs while this one trained.
            done = grid.run_grid(base_runs, train=False)
            if not done:
                raise ConfigError(_no_baseline_runs(cfg))
            baseline = controlled.Baseline(*labels, cfg.baseline, tuple(done))
        md = claims.write_claims(args.workdir, results, "SPP-net classification claims, "
                                 f"{first.dataset} data, {len(cfg.seeds)} seeds", variants,
                                 missing=missing,
                                 size_bins=object_size.size_bins_for(first), baseline=baseline)
    print(md)


if __name__ == "__main__":
    host_memory.restart_with_kept_memory()  # once, before any work: CPU steps stop page-faulting
    main()
