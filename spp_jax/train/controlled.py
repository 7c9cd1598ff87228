"""A controlled probe: the claims grid against a baseline grid that differs in a few keys.

Why: when a claim does not hold on the embedded data, the question is which property of
the data (or of training) it depends on.  Train the same grid twice, changing only that
property (e.g. ``dataset=shapes`` against ``dataset=shapes_wide``: the same images with the
main object over a wider range of sizes), and ask of every variant claim whether the
better variant's *gain* grows from the baseline to the probe.

Per model, claim (SPP against no SPP, multi- against single-size) and view (1 crop,
1 full, 10-view), each grid gives per seed the gain ``error(worse) - error(better)``
(points of top-1 error).  The two grids are paired by seed (a seed fixes the initial
weights and the image order and augmentation in both), so the test is a paired t-test of
the per-seed difference of gains (:func:`spp_jax.seedstats.compare`; each gain is the
difference of two measured errors, so the measurement-step floor counts four).

The change's own effect is reported too, per cell (model, variant): its top-1 error per
view in both grids, and the length of its chance plateau (epochs whose validation error
stayed at or above :data:`~spp_jax.train.grid.CHANCE_EXIT`), each paired over seeds.  A
training change such as ``dropout=0`` against ``dropout=0.5`` asks exactly this; a grid
of one variant has no claims to compare, only these effects.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from spp_jax import seedstats
from spp_jax.evaluate.protocols import PROTOCOL_TITLES as VIEW_TITLES
from spp_jax.report import markdown_table
from spp_jax.train.grid import CHANCE_EXIT, VARIANT_CLAIMS, VARIANTS, RunResult, epochs_at_chance

VIEWS = ("1crop", "1full", "10view")
PLATEAU = "plateau"   # a cell's measure besides the views: epochs_at_chance of its run
MEASURE_TITLES = {**{v: VIEW_TITLES[v] for v in VIEWS}, PLATEAU: "epochs at chance"}
VARIANT_TITLES = {v.key: v.title for v in VARIANTS}


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The finished runs of the baseline grid, and what tells the two grids apart.

    ``here`` / ``there``: the differing keys as ``key=value`` in this grid and in the
    baseline (e.g. ``"dataset=shapes_wide"`` / ``"dataset=shapes"``); ``workdir``: its root.
    """

    here: str
    there: str
    workdir: str
    results: tuple[RunResult, ...]


@dataclasses.dataclass(frozen=True)
class PairedCell:
    """One row of the comparison, per seed in each grid: a (model, claim, view)'s gain of
    the better variant, or a (model, variant, measure)'s own value."""

    here: seedstats.SeedStats
    there: seedstats.SeedStats


def values(results: Sequence[RunResult], model: str, variant: str, measure: str
           ) -> dict[int | None, float]:
    """``{seed: value}`` of one cell: top-1 error (points) of a view, or epochs at chance."""
    out = {}
    for r in results:
        if (r.run.model, r.run.variant.key) != (model, variant):
            continue
        if measure == PLATEAU:
            v = epochs_at_chance(r.val_curve)
        else:
            v = r.errors[measure][0] if measure in r.errors else None
        if v is not None:
            out[r.run.seed] = v
    return out


def gains(results: Sequence[RunResult], model: str, worse: str, better: str, view: str
          ) -> dict[int | None, float]:
    """``{seed: top-1 error of worse - top-1 error of better}`` (points) on the seeds where
    both variants measured ``view``."""
    w, b = values(results, model, worse, view), values(results, model, better, view)
    return {s: w[s] - b[s] for s in w if s in b}


def _images(results: Sequence[RunResult], view: str) -> int:
    """The fewest test images behind any run's ``view`` (0 if a run did not record them)."""
    return min((r.images_on(view) for r in results if view in r.errors), default=0)


def gain_cells(results: Sequence[RunResult], base: Baseline
               ) -> dict[tuple[str, str, str], PairedCell]:
    """``{(model, claim, view): PairedCell}`` wherever both grids measured the gain."""
    out = {}
    for model in sorted({r.run.model for r in results}):
        for claim, worse, better in VARIANT_CLAIMS:
            for view in VIEWS:
                here = gains(results, model, worse, better, view)
                there = gains(base.results, model, worse, better, view)
                if here and there:
                    out[(model, claim, view)] = PairedCell(seedstats.by_seed(here),
                                                           seedstats.by_seed(there))
    return out


def gain_verdicts(cells: dict[tuple[str, str, str], PairedCell], base: Baseline,
                  images: dict[str, int] | None = None) -> list[seedstats.Verdict]:
    """Per cell: "the gain is larger with ``base.here`` than with ``base.there``", paired
    over the seeds both grids have.  ``images``: per view, the fewest test images behind
    any error (the measurement step; a missing view: no floor)."""
    out = []
    for (model, claim, view), c in cells.items():
        # compare() tests "better has the lower error": pass the negated gains (how much
        # worse the better variant is), so its diff is gain here - gain there.
        here, there = seedstats.on_shared_seeds(c.here, c.there)
        if here:
            out.append(seedstats.compare(
                f"{model}, {VIEW_TITLES[view]}: {claim}: gain larger with {base.here} than with "
                f"{base.there}", (f"with {base.there}", [-g for g in there]),
                (f"with {base.here}", [-g for g in here]), paired=True,
                images=(images or {}).get(view, 0), terms=2))
    return out


def _two_grid_table(rows: list[str], cols: list[str], cells: dict, corner: str) -> str:
    """A markdown table: one row per cell, columns (baseline grid, this grid), mean ± std."""
    tv = {}
    for row, cell in zip(rows, cells.values()):
        tv[(row, cols[0])], tv[(row, cols[1])] = cell.there.cell(), cell.here.cell()
    return markdown_table(rows, cols, tv, corner=corner)


def baseline_markdown(cells: dict[tuple[str, str, str], PairedCell], base: Baseline) -> str:
    """Rows (model, claim, view); columns the gain in each grid, mean ± std over seeds."""
    rows = [f"{m}, {VIEW_TITLES[w]}: {c}" for m, c, w in cells]
    return "\n".join([
        "The better variant's gain in top-1 error (points; positive: the claim's direction), "
        "mean ± std over seeds, in each grid; the grids differ only in these keys.", "",
        _two_grid_table(rows, [f"gain with {base.there}", f"gain with {base.here}"], cells,
                        "model, view: claim")])


def effect_cells(results: Sequence[RunResult], base: Baseline
                 ) -> dict[tuple[str, str, str], PairedCell]:
    """``{(model, variant key, measure): PairedCell}`` where both grids measured the cell
    on at least one shared seed: the controlled change's own effect."""
    out = {}
    for model in sorted({r.run.model for r in results}):
        for variant in (v.key for v in VARIANTS):
            for measure in (*VIEWS, PLATEAU):
                here = values(results, model, variant, measure)
                there = values(base.results, model, variant, measure)
                if set(here) & set(there):
                    out[(model, variant, measure)] = PairedCell(seedstats.by_seed(here),
                                                                seedstats.by_seed(there))
    return out


def effect_verdicts(cells: dict[tuple[str, str, str], PairedCell], base: Baseline,
                    images: dict[str, int] | None = None) -> list[seedstats.Verdict]:
    """Per cell: "lower with ``base.here`` than with ``base.there``", paired over shared
    seeds.  Errors are floored at their test set's step (``images`` per view), the plateau
    at its resolution of one epoch."""
    out = []
    for (model, variant, measure), c in cells.items():
        floor = dict(step=1.0, unit="epochs") if measure == PLATEAU else dict(
            images=(images or {}).get(measure, 0))
        out.append(seedstats.compare_cells(
            f"{model}, {VARIANT_TITLES[variant]}, {MEASURE_TITLES[measure]}: lower with {base.here} "
            f"than with {base.there}", (f"with {base.there}", c.there),
            (f"with {base.here}", c.here), **floor))
    return out


def effect_markdown(cells: dict[tuple[str, str, str], PairedCell], base: Baseline) -> str:
    """Rows (model, variant, measure); columns the value in each grid, mean ± std."""
    rows = [f"{m}, {VARIANT_TITLES[v]}: {MEASURE_TITLES[k]}" for m, v, k in cells]
    return "\n".join([
        f"### The change itself: {base.here} against {base.there}, per cell", "",
        "Top-1 error (%) per view, and the epochs whose validation top-1 error stayed at or "
        f"above {CHANCE_EXIT:.0f} % before it first fell below (a run that never fell counts all "
        "its epochs), mean ± std over seeds.", "",
        _two_grid_table(rows, [f"with {base.there}", f"with {base.here}"], cells,
                        "model, variant: measure")])


def _verdict_lines(found: Sequence[seedstats.Verdict]) -> list[str]:
    return ["Verdicts (paired over seeds, two-sided t-test at 5 %):", "",
            *[f"- {v.sentence()}" for v in found]]


def baseline_section(results: Sequence[RunResult], base: Baseline) -> tuple[str, dict]:
    """The report's controlled-probe section: (markdown, JSON-ready dict)."""
    cells, effects = gain_cells(results, base), effect_cells(results, base)
    if not cells and not effects:
        return "", {}
    images = {v: _images([*results, *base.results], v) for v in VIEWS}
    found = gain_verdicts(cells, base, images)
    effect_found = effect_verdicts(effects, base, images)
    md = [f"## Controlled probe: {base.here} against {base.there} (`{base.workdir}`)", ""]
    if cells:
        md += [baseline_markdown(cells, base), "", *_verdict_lines(found), ""]
    if effects:
        md += [effect_markdown(effects, base), "", *_verdict_lines(effect_found)]
    data = {"here": base.here, "there": base.there, "workdir": base.workdir,
            "cells": [{"model": m, "claim": c, "view": w, "gain_here": g.here.as_dict(),
                       "gain_there": g.there.as_dict()} for (m, c, w), g in cells.items()],
            "verdicts": [v.as_dict() for v in found],
            "effects": [{"model": m, "variant": v, "measure": k, "here": g.here.as_dict(),
                         "there": g.there.as_dict()} for (m, v, k), g in effects.items()],
            "effect_verdicts": [v.as_dict() for v in effect_found]}
    return "\n".join(md).rstrip(), data
