"""A grid of training runs (models x variants x seeds), each resumable in its own workdir.

Table 2 of the paper is such a grid (one model, its three variants) and so is the claims
experiment (two models, three variants, three seeds).  Every run is ``make train`` in
``<root>/<model>/<variant>/seed<k>``: trained (resuming from its checkpoints if it was
interrupted) and tested with the protocols, which write ``eval.json`` with the resolved
config.  A run whose ``eval.json`` holds exactly the planned config is finished and is
read back instead of trained again, so a grid restarts at the granularity of one run.

All configs are built and validated by :func:`plan` before anything is trained, so a
mistake in the overrides costs nothing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Sequence

from spp_jax.config_grammar import config_dict, with_file_defaults
from spp_jax.errors import NoCheckpoint
from spp_jax.train.config import TrainConfig, embedded, get_config
from spp_jax.train.workdir import RESUMABLE_KEYS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A column of Table 2: sub-workdir name, title, and the keys it sets."""

    key: str
    title: str
    overrides: tuple[str, ...]


VARIANTS = (
    Variant("nospp", "no SPP", ("spp=false", "sizes=224", "size_schedule=single")),
    Variant("single", "SPP single-size", ("spp=true", "sizes=224", "size_schedule=single")),
    Variant("multi", "SPP multi-size", ("spp=true", "sizes=180,224", "size_schedule=multi")),
)

# The paper's claims between variants: (claim, worse variant key, better variant key).
VARIANT_CLAIMS = (("SPP beats no SPP", "nospp", "single"),
                  ("multi-size training beats single-size", "single", "multi"))


@dataclasses.dataclass(frozen=True)
class Run:
    """One planned training run of the grid."""

    model: str
    variant: Variant
    seed: int | None   # None: the config's own seed (a one-seed grid such as Table 2)
    workdir: str
    config: TrainConfig


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run measured: per protocol (top-1, top-5) error in percent."""

    run: Run
    errors: dict[str, tuple[float, float]]
    seconds: float | None   # data + training + testing wall time of the invocation that
                            # finished it (run_summary.json; None when not recorded)
    reused: bool            # read back from a finished workdir, not run now
    # Per protocol, per image index: (top-1 hit, top-5 hit), when the testing recorded them
    # (protocols on different numbers of images are then compared on the same images).
    hits: dict[str, dict[int, tuple[bool, bool]]] = dataclasses.field(default_factory=dict)
    # Validation top-1 error (%) after each epoch, from the run's metrics.jsonl: when the
    # network left chance, and whether it was still improving when training stopped.
    val_curve: tuple[float, ...] = ()
    # The test-scale probe (scale_probe.json, SPP runs): 1-full (top-1, top-5) error in
    # percent per test shorter side; {} when not probed.
    scale_errors: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)
    # Per protocol, how many test images its error counts (eval.json's num_images): the
    # measurement's step, 100 / images points.
    images: dict[str, int] = dataclasses.field(default_factory=dict)

    def images_on(self, protocol: str) -> int:
        """How many test images ``protocol``'s error counts (0: not recorded)."""
        return self.images.get(protocol) or len(self.hits.get(protocol, {}))


CHANCE_EXIT = 80.0  # % top-1: clearly below chance (90 % for the 10 embedded classes)


def left_chance(curve: Sequence[float], below: float = CHANCE_EXIT) -> int | None:
    """The first epoch (1-based) whose validation top-1 error is below ``below`` percent."""
    return next((e + 1 for e, v in enumerate(curve) if v < below), None)


def epochs_at_chance(curve: Sequence[float]) -> float | None:
    """How many epochs a run's validation top-1 error stayed at or above ``CHANCE_EXIT``
    before it first fell below: the length of the chance plateau.  A run that never left
    counts all its epochs (a lower bound); None without a curve."""
    if not curve:
        return None
    k = left_chance(curve)
    return float(len(curve) if k is None else k - 1)


def plan(preset: str, overrides: Sequence[str], root: str, *, models: Sequence[str],
         variants: Sequence[Variant] = VARIANTS, seeds: Sequence[int] | None = None,
         data_seed: int | None = None, by_model: bool = True) -> list[Run]:
    """Every run's validated config, models outermost, seeds innermost.

    ``seeds`` set ``seed`` (initialisation, augmentation, data order); ``data_seed`` fixes
    the embedded images across seeds (the claims compare initialisations on one data set).
    Workdirs: ``root/<model>/<variant>/seed<k>``; without the model level when
    ``by_model`` is false (Table 2's one-model ``runs/<model>-table2/<variant>``), without
    the seed level when ``seeds`` is None.  The embedded data is generated once, in
    ``root/data``, for every run (unless ``data_dir`` is given): the runs of a grid train on
    the same images, and a copy per run would cost 3.2 GB of disk each at the preset's size.
    """
    shared = [] if any(o.split("=", 1)[0].strip() == "data_dir" for o in overrides) else [
        f"data_dir={os.path.join(root, 'data')}"]
    runs = []
    for model in models:
        for v in variants:
            for seed in (seeds if seeds is not None else [None]):
                extra = [f"model={model}", *v.overrides]
                if seed is not None:
                    extra.append(f"seed={seed}")
                if data_seed is not None:
                    extra.append(f"data_seed={data_seed}")
                cfg = get_config(preset, [*overrides, *extra])
                if embedded(cfg.dataset) and shared:
                    cfg = get_config(preset, [*overrides, *extra, *shared])
                sub = os.path.join(root, model if by_model else "", v.key,
                                   "" if seed is None else f"seed{seed}")
                runs.append(Run(model, v, seed, os.path.normpath(sub), cfg))
    return runs


def _errors(report: dict) -> dict[str, tuple[float, float]]:
    return {p: (float(r["top1_err"]), float(r["top5_err"])) for p, r in report["results"].items()}


def _hits(report: dict) -> dict[str, dict[int, tuple[bool, bool]]]:
    return {p: {int(i): (bool(a), bool(b)) for i, a, b in zip(r["indices"], r["top1_hits"],
                                                            r["top5_hits"])}
            for p, r in report["results"].items() if r.get("indices")}


def _image_counts(report: dict) -> dict[str, int]:
    return {p: int(r["num_images"]) for p, r in report["results"].items() if "num_images" in r}


def _val_curve(workdir: str) -> tuple[float, ...]:
    """Per-epoch validation top-1 error (%) recorded in ``metrics.jsonl`` (a resumed run's
    later record of an epoch wins); () when there is none."""
    by_epoch = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind") == "epoch" and rec.get("val_top1_error") is not None:
                    by_epoch[int(rec["epoch"])] = 100.0 * float(rec["val_top1_error"])
    except (OSError, ValueError):
        return ()
    return tuple(by_epoch[e] for e in sorted(by_epoch))


def _scale_errors(workdir: str, config: TrainConfig, sides: Sequence[int] | None = None
                  ) -> dict[int, tuple[float, float]]:
    """The run's ``scale_probe.json`` as {side: (top-1, top-5)}; {} when there is none, when
    it was probed from another config (e.g. before the run was trained further: the same
    rule as :func:`finished`), or (with ``sides``) when it probed other sides."""
    try:
        with open(os.path.join(workdir, "scale_probe.json")) as f:
            data = json.load(f)
        got = {int(k): (float(r["top1_err"]), float(r["top5_err"])) for k, r in data["results"].items()}
        recorded = data["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not same_results_config(recorded, config):
        log.info("%s: scale_probe.json is from another config; not used", workdir)
        return {}
    return got if sides is None or set(sides) <= set(got) else {}


def _result(run: Run, report: dict, seconds: float | None, reused: bool) -> RunResult:
    return RunResult(run, _errors(report), seconds, reused, _hits(report), _val_curve(run.workdir),
                     _scale_errors(run.workdir, run.config), _image_counts(report))


# The keys a resumed run may change (workdir.RESUMABLE_KEYS) minus those that change its
# test errors (the epochs, which views are tested and on how many images, the validation
# cadence that the plateau schedule reads, the device layout): what is left only changes
# how a run is watched, logged, checkpointed or where its data lives, so a finished run is
# reused whatever they are (a grid restarted with progress=false, or from a copy of
# committed results). eval_size is among them: it is set from the data at run time.
NOT_RESULTS = RESUMABLE_KEYS - {"epochs", "protocols", "eval_limit", "multiview_limit",
                                "eval_every", "distributed"}


def same_results_config(recorded: dict, cfg: TrainConfig) -> bool:
    """Whether a config recorded with results (eval.json, scale_probe.json) equals ``cfg`` in
    every key outside :data:`NOT_RESULTS`: the results are then this config's."""
    want = json.loads(json.dumps(config_dict(cfg)))  # tuples -> lists, as on disk
    recorded = with_file_defaults(TrainConfig, recorded)  # keys added since it was written
    return ({k: v for k, v in recorded.items() if k not in NOT_RESULTS}
            == {k: v for k, v in want.items() if k not in NOT_RESULTS})


def finished(run: Run) -> RunResult | None:
    """The run's result if its workdir already holds the testing of this config
    (:func:`same_results_config`)."""
    path = os.path.join(run.workdir, "eval.json")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    if not same_results_config(report.get("config", {}), run.config):
        log.info("%s: eval.json is from another config; running it again", run.workdir)
        return None
    return _result(run, report, _recorded_seconds(run.workdir), reused=True)


def _recorded_seconds(workdir: str) -> float | None:
    """Wall time that ``run_summary.json`` recorded (the invocation that finished the run)."""
    try:
        with open(os.path.join(workdir, "run_summary.json")) as f:
            return float(json.load(f)["total_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_grid(runs: Sequence[Run], train_fn: Callable[[TrainConfig, str], dict] | None = None,
             train: bool = True) -> list[RunResult]:
    """Run (or read back) every run in order; ``train_fn(cfg, workdir) -> eval report``.

    ``train_fn`` defaults to :func:`spp_jax.train.experiment.train_and_evaluate`.  With
    ``train=False`` nothing is trained: the finished runs are read back and the others left
    out (tables of a grid still in progress, e.g. while another process trains it).
    """
    if train_fn is None and train:
        from spp_jax.train.experiment import train_and_evaluate as train_fn
    out = []
    for i, run in enumerate(runs):
        done = finished(run)
        if done is not None:
            log.info("[%d/%d] %s: finished earlier, reused", i + 1, len(runs), run.workdir)
            out.append(done)
            continue
        if not train:
            log.info("[%d/%d] %s: not finished, left out (train=false)", i + 1, len(runs), run.workdir)
            continue
        log.info("[%d/%d] %s: training", i + 1, len(runs), run.workdir)
        t = time.perf_counter()
        report = train_fn(run.config, run.workdir)
        out.append(_result(run, report, time.perf_counter() - t, reused=False))
    return out


def probe_scales(results: Sequence[RunResult], sides: Sequence[int],
                 probe_fn: Callable[[TrainConfig, str, Sequence[int]], dict] | None = None
                 ) -> list[RunResult]:
    """The test-scale probe on every finished SPP run that has not probed ``sides`` yet
    (``probe_fn(cfg, workdir, sides)``, default
    :func:`spp_jax.train.experiment.scale_probe_workdir`, writes ``scale_probe.json``).

    A run with no checkpoint (e.g. a copy of committed results) keeps what it has, with a
    log line: the probe needs the trained network.  Returns the results, probes included.
    """
    if probe_fn is None:
        from spp_jax.train.experiment import scale_probe_workdir as probe_fn
    out = []
    for r in results:
        if sides and r.run.config.spp and not _scale_errors(r.run.workdir, r.run.config, sides):
            try:
                probe_fn(r.run.config, r.run.workdir, tuple(sides))
            except NoCheckpoint:
                log.info("%s: no checkpoint, so no test-scale probe", r.run.workdir)
            r = dataclasses.replace(r, scale_errors=_scale_errors(r.run.workdir, r.run.config, sides))
        out.append(r)
    return out


def unfinished(runs: Sequence[Run], results: Sequence[RunResult]) -> list[Run]:
    """The planned runs that have no result (left out by ``run_grid(..., train=False)``)."""
    done = {r.run.workdir for r in results}
    return [r for r in runs if r.workdir not in done]
