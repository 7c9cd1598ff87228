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
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from spp_jax import seedstats
from spp_jax.evaluate.protocols import PROTOCOL_TITLES as VIEW_TITLES
from spp_jax.report import markdown_table
from spp_jax.train.grid import VARIANT_CLAIMS, RunResult

VIEWS = ("1crop", "1full", "10view")


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
class GainCell:
    """One (model, claim, view): the better variant's per-seed gain in each grid."""

    here: seedstats.SeedStats
    there: seedstats.SeedStats


def gains(results: Sequence[RunResult], model: str, worse: str, better: str, view: str
          ) -> dict[int | None, float]:
    """``{seed: top-1 error of worse - top-1 error of better}`` (points) on the seeds where
    both variants measured ``view``."""
    err = {(r.run.variant.key, r.run.seed): r.errors[view][0] for r in results
           if r.run.model == model and view in r.errors}
    return {s: err[(worse, s)] - err[(better, s)] for (v, s) in err
            if v == worse and (better, s) in err}


def _images(results: Sequence[RunResult], view: str) -> int:
    """The fewest test images behind any run's ``view`` (0 if a run did not record them)."""
    return min((r.images_on(view) for r in results if view in r.errors), default=0)


def gain_cells(results: Sequence[RunResult], base: Baseline
               ) -> dict[tuple[str, str, str], GainCell]:
    """``{(model, claim, view): GainCell}`` wherever both grids measured the gain."""
    out = {}
    for model in sorted({r.run.model for r in results}):
        for claim, worse, better in VARIANT_CLAIMS:
            for view in VIEWS:
                here = gains(results, model, worse, better, view)
                there = gains(base.results, model, worse, better, view)
                if here and there:
                    out[(model, claim, view)] = GainCell(seedstats.by_seed(here),
                                                         seedstats.by_seed(there))
    return out


def gain_verdicts(cells: dict[tuple[str, str, str], GainCell], base: Baseline,
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


def baseline_markdown(cells: dict[tuple[str, str, str], GainCell], base: Baseline) -> str:
    """Rows (model, claim, view); columns the gain in each grid, mean ± std over seeds."""
    rows = [f"{m}, {VIEW_TITLES[w]}: {c}" for m, c, w in cells]
    cols = [f"gain with {base.there}", f"gain with {base.here}"]
    tv = {}
    for row, cell in zip(rows, cells.values()):
        tv[(row, cols[0])], tv[(row, cols[1])] = cell.there.cell(), cell.here.cell()
    return "\n".join([
        f"## Controlled probe: {base.here} against {base.there} (`{base.workdir}`)", "",
        "The better variant's gain in top-1 error (points; positive: the claim's direction), "
        "mean ± std over seeds, in each grid; the grids differ only in these keys.", "",
        markdown_table(rows, cols, tv, corner="model, view: claim")])


def baseline_section(results: Sequence[RunResult], base: Baseline) -> tuple[str, dict]:
    """The report's controlled-probe section: (markdown, JSON-ready dict)."""
    cells = gain_cells(results, base)
    if not cells:
        return "", {}
    images = {v: _images([*results, *base.results], v) for v in VIEWS}
    found = gain_verdicts(cells, base, images)
    md = "\n".join([baseline_markdown(cells, base), "",
                    "Verdicts (top-1 error; paired over seeds, two-sided t-test at 5 %):", "",
                    *[f"- {v.sentence()}" for v in found]])
    data = {"here": base.here, "there": base.there, "workdir": base.workdir,
            "cells": [{"model": m, "claim": c, "view": w, "gain_here": g.here.as_dict(),
                       "gain_there": g.there.as_dict()} for (m, c, w), g in cells.items()],
            "verdicts": [v.as_dict() for v in found]}
    return md, data
