"""The paper's classification claims over a grid of seeded runs: tables, verdicts, a plot.

Input: the :class:`~spp_jax.train.grid.RunResult` of every run of a grid (models x
variants x seeds, :mod:`spp_jax.train.grid`).  Output, each cell mean ± std over seeds:

* **Table 2** (the paper's layout): rows the models, columns no SPP / SPP single-size /
  SPP multi-size, 10-view top-1 / top-5 error;
* **Tables 3-5** (views): per model, rows the testing views (1 crop, 1 full, 10-view,
  multi-view 96+2), columns the variants;
* **verdicts** (:mod:`spp_jax.seedstats`), on top-1 error, per model:
  SPP single-size beats no SPP and multi-size beats single-size, each at 1 crop and
  10-view (paired over seeds: the runs of one seed start from the same initial conv
  weights — all weights for single- vs multi-size — and see the same images in the same
  order with the same augmentation, so the per-seed difference cancels the
  initialisation luck that dominates a single run here); 1 full beats 1 crop and
  multi-view beats 10-view (paired: the same networks tested two ways; multi-view
  against 10-view on the same images when multi-view was tested on fewer), for each SPP
  variant;
* one figure: top-1 error per view and variant with ± std error bars, a panel per model;
* the test-scale probe (:func:`scale_cells`) and the error by object size
  (:mod:`spp_jax.train.object_size`), each with multi- against single-size verdicts.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from spp_jax import seedstats
from spp_jax.data.pipeline import AugmentConfig
from spp_jax.evaluate.protocols import PROTOCOL_TITLES
from spp_jax.report import markdown_table, write_report
from spp_jax.train import controlled, object_size
from spp_jax.train.grid import (CHANCE_EXIT, VARIANT_CLAIMS, VARIANTS, Run, RunResult, Variant,
                                left_chance)

# Multi-view is tested on the first `multiview_limit` images only (it is the expensive view),
# so it is compared with 10-view on those same images (from the per-image hits).
MATCHED = "10view@mv"
VIEWS = ("1crop", "1full", "10view", MATCHED, "multiview")
VIEW_TITLES = {**PROTOCOL_TITLES, MATCHED: "10-view, on the multi-view images"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (model, variant, view) cell over seeds: top-1 and top-5 error, percent."""

    top1: seedstats.SeedStats
    top5: seedstats.SeedStats
    seeds: tuple[int | None, ...]

    def text(self, seeds: int | None = None) -> str:
        """``"top-1 / top-5"``; ``(n=k)`` added when k is fewer than ``seeds`` (a grid in
        progress, whose cells are not all over the same number of seeds)."""
        n = self.top1.n
        return f"{self.top1.cell()} / {self.top5.cell()}" + (f" (n={n})" if seeds and n < seeds else "")


def errors_of(r: RunResult) -> dict[str, tuple[float, float]]:
    """The run's errors per view, plus :data:`MATCHED` (10-view on the images multi-view was
    tested on) when multi-view saw fewer images and the per-image hits were recorded."""
    errs = dict(r.errors)
    mv, ten = r.hits.get("multiview"), r.hits.get("10view")
    if mv and ten and set(mv) < set(ten):
        errs[MATCHED] = tuple(100.0 * (1.0 - sum(ten[i][k] for i in mv) / len(mv)) for k in (0, 1))
    return errs


def _per_seed(results: Sequence[RunResult], model: str, variant: str, view: str
              ) -> dict[int | None, tuple[float, float]]:
    return {r.run.seed: errors_of(r)[view] for r in results
            if r.run.model == model and r.run.variant.key == variant and view in errors_of(r)}


def aggregate(results: Sequence[RunResult]) -> dict[tuple[str, str, str], Cell]:
    """``{(model, variant key, view): Cell}`` for every combination that was measured."""
    cells = {}
    keys = {(r.run.model, r.run.variant.key, v) for r in results for v in errors_of(r)}
    for model, variant, view in sorted(keys, key=str):
        per = _per_seed(results, model, variant, view)
        seeds = tuple(sorted(per, key=lambda s: -1 if s is None else s))
        cells[(model, variant, view)] = Cell(seedstats.seed_stats([per[s][0] for s in seeds]),
                                             seedstats.seed_stats([per[s][1] for s in seeds]), seeds)
    return cells


def images_of(r: RunResult, view: str) -> int:
    """How many test images a run's error on ``view`` counts (0: not recorded)."""
    return r.images_on("multiview" if view == MATCHED else view)


def _images(results, model, *cells: tuple[str, str]) -> int:
    """The fewest test images behind any run's error in the (variant, view) ``cells``: the
    resolution of the comparison (:func:`spp_jax.seedstats.compare`); 0 if unknown."""
    counts = [images_of(r, view) for r in results for variant, view in cells
              if r.run.model == model and r.run.variant.key == variant and view in errors_of(r)]
    return min(counts, default=0)


def _paired(results, model, cell_a: tuple[str, str], cell_b: tuple[str, str]):
    """Per-seed top-1 errors of two (variant, view) cells, on the seeds both measured."""
    a, b = _per_seed(results, model, *cell_a), _per_seed(results, model, *cell_b)
    return seedstats.shared_seed_values({s: e[0] for s, e in a.items()}, {s: e[0] for s, e in b.items()})


def verdicts(results: Sequence[RunResult], variants: Sequence[Variant] = VARIANTS
             ) -> list[seedstats.Verdict]:
    """The paper's claims that this grid can test (see the module docstring)."""
    titles = {v.key: v.title for v in variants}
    out = []
    models = sorted({r.run.model for r in results})
    for model in models:
        for claim, worse, better in VARIANT_CLAIMS:
            for view in ("1crop", "10view"):
                w, b = _paired(results, model, (worse, view), (better, view))
                if w:
                    out.append(seedstats.compare(
                        f"{model}, {VIEW_TITLES[view]}: {claim}", (titles[worse], w),
                        (titles[better], b), paired=True,
                        images=_images(results, model, (worse, view), (better, view))))
        for variant in ("single", "multi"):
            ten = MATCHED if _per_seed(results, model, variant, MATCHED) else "10view"
            for claim, worse, better in (("1 full beats 1 crop", "1crop", "1full"),
                                         ("multi-view beats 10-view", ten, "multiview")):
                w, b = _paired(results, model, (variant, worse), (variant, better))
                if w:
                    out.append(seedstats.compare(
                        f"{model}, {titles[variant]}: {claim}", (VIEW_TITLES[worse], w),
                        (VIEW_TITLES[better], b), paired=True,
                        images=_images(results, model, (variant, worse), (variant, better))))
    return out


def tables_markdown(cells: dict[tuple[str, str, str], Cell], variants: Sequence[Variant] = VARIANTS
                    ) -> str:
    """Table 2 (10-view, rows models) and one views table per model, as markdown."""
    models = sorted({m for m, _, _ in cells})
    cols = [v.title for v in variants]
    most = max((c.top1.n for c in cells.values()), default=0)
    t2 = {(m, v.title): cells[(m, v.key, "10view")].text(most) for m in models for v in variants
          if (m, v.key, "10view") in cells}
    out = ["## Table 2: 10-view top-1 / top-5 error (%), mean ± std over seeds", "",
           markdown_table(models, cols, t2, corner="model")]
    for m in models:
        rows = [VIEW_TITLES[w] for w in VIEWS if any((m, v.key, w) in cells for v in variants)]
        tv = {(VIEW_TITLES[w], v.title): cells[(m, v.key, w)].text(most) for w in VIEWS for v in variants
              if (m, v.key, w) in cells}
        out += ["", f"## {m}: top-1 / top-5 error (%) per testing view, mean ± std over seeds", "",
                "Multi-view is tested on the first images of the split only (`multiview_limit`); "
                "the row above it is 10-view on those same images.", "",
                markdown_table(rows, cols, tv, corner="test view")]
    return "\n".join(out)


def plot(cells: dict[tuple[str, str, str], Cell], path: str,
         variants: Sequence[Variant] = VARIANTS) -> str:
    """Top-1 error per view (groups) and variant (bars), ± std error bars; a panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = sorted({m for m, _, _ in cells})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    width = 0.8 / len(variants)
    for ax, m in zip(axes[0], models):
        x = np.arange(len(VIEWS))
        for i, v in enumerate(variants):
            got = [cells.get((m, v.key, w)) for w in VIEWS]
            mean = [c.top1.mean if c else np.nan for c in got]
            std = [c.top1.std if c else 0.0 for c in got]
            ax.bar(x + (i - (len(variants) - 1) / 2) * width, mean, width, yerr=std, capsize=3,
                   label=v.title)
        ax.set_xticks(x, [VIEW_TITLES[w].replace(", ", ",\n") for w in VIEWS], fontsize=7)
        ax.set_title(m)
        ax.set_ylabel("top-1 error (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the test-scale probe ------------------------------------------------------------------
# Each SPP run's 1-full view at several test shorter sides (grid.probe_scales): does
# multi-size training make the network robust to objects bigger or smaller than in training?


ScaleCells = dict[tuple[str, str, int], seedstats.SeedStats]  # {(model, variant key, side): top-1}


def scale_cells(results: Sequence[RunResult]) -> ScaleCells:
    """``{(model, variant key, side): top-1 error over seeds}`` of the probed runs."""
    per: dict[tuple[str, str, int], dict] = {}
    for r in results:
        for side, (top1, _) in r.scale_errors.items():
            per.setdefault((r.run.model, r.run.variant.key, side), {})[r.run.seed] = top1
    return {k: seedstats.by_seed(v) for k, v in sorted(per.items(), key=str)}


def scale_verdicts(cells: ScaleCells, images: int = 0) -> list[seedstats.Verdict]:
    """Per model and test side (``cells`` from :func:`scale_cells`): "multi-size training
    beats single-size" on the 1-full view (paired over seeds, as :func:`verdicts`).
    ``images``: how many validation images the probe tested (those of the 1-full view)."""
    out = []
    for model, side in sorted({(m, s) for m, _, s in cells}):
        single, multi = cells.get((model, "single", side)), cells.get((model, "multi", side))
        if single and multi:
            out.append(seedstats.compare_cells(
                f"{model}, 1 full at shorter side {side}: multi-size training beats single-size",
                ("SPP single-size", single), ("SPP multi-size", multi), images=images))
    return [v for v in out if v]


def scale_markdown(cells: ScaleCells, train_side: int, variants: Sequence[Variant] = VARIANTS) -> str:
    """Per model: rows the test sides, columns the SPP variants, top-1 mean ± std."""
    if not cells:
        return ""
    most = max(c.n for c in cells.values())
    out = [f"## Test-scale probe: 1-full top-1 error (%) by test shorter side, mean ± std over seeds",
           "", f"Trained at shorter side {train_side} (224 crops; multi-size also at 180/224 of that "
           "scale): a side s shows the objects at s/" f"{train_side} of their training size."]
    for m in sorted({m for m, _, _ in cells}):
        cols = [v.title for v in variants if any(k[:2] == (m, v.key) for k in cells)]
        key = {v.title: v.key for v in variants}
        sides = sorted({s for mm, _, s in cells if mm == m})
        rows = [f"{s}" + (" (training)" if s == train_side else "") for s in sides]
        tv = {(row, c): cells[(m, key[c], s)].cell() + (f" (n={cells[(m, key[c], s)].n})"
                                                        if cells[(m, key[c], s)].n < most else "")
              for row, s in zip(rows, sides) for c in cols if (m, key[c], s) in cells}
        out += ["", f"### {m}", "", markdown_table(rows, cols, tv, corner="test side")]
    return "\n".join(out)


def scale_plot(cells: ScaleCells, path: str, train_side: int,
               variants: Sequence[Variant] = VARIANTS) -> str | None:
    """1-full top-1 error against test side, a line (± std) per SPP variant, a panel per model."""
    if not cells:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _, _ in cells})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for v in variants:
            sides = sorted(s for mm, k, s in cells if (mm, k) == (m, v.key))
            if sides:
                got = [cells[(m, v.key, s)] for s in sides]
                ax.errorbar(sides, [c.mean for c in got], yerr=[c.std for c in got], marker="o",
                            capsize=3, label=v.title)
        ax.axvline(train_side, color="grey", ls=":", lw=1)
        ax.set_title(f"{m}: 1 full by test scale")
        ax.set_xlabel("test shorter side (px)")
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_text(curve: Sequence[float]) -> str:
    """``"; validation top-1 by epoch 88 86 ... 39 (below 80 % from epoch 5)"`` or ``""``."""
    if not curve:
        return ""
    k = left_chance(curve)
    return (f"; validation top-1 by epoch {' '.join(f'{v:.0f}' for v in curve)} ("
            + (f"below {CHANCE_EXIT:.0f} % from epoch {k})" if k else f"never below {CHANCE_EXIT:.0f} %)"))


def _verdict_lines(found: Sequence[seedstats.Verdict]) -> list[str]:
    """A "Verdicts" paragraph, or nothing when a section has no comparison (one variant)."""
    if not found:
        return []
    return ["Verdicts (top-1 error; two-sided t-test at 5 %):", "",
            *[f"- {v.sentence()}" for v in found], ""]


def write_claims(root: str, results: Sequence[RunResult], title: str,
                 variants: Sequence[Variant] = VARIANTS, make_plot: bool = True,
                 missing: Sequence[Run] = (), size_bins: object_size.SizeBins | None = None,
                 baseline: controlled.Baseline | None = None) -> str:
    """``claims.md`` / ``claims.json`` (and ``claims.png``) in ``root``; returns the markdown.

    ``missing``: planned runs that have not finished (a report of a grid in progress); they
    are listed, and every cell says over which seeds it is.  ``size_bins``: the validation
    images' object-size bins (:func:`object_size.size_bins_for`), for the error by size.
    ``baseline``: the finished runs of a grid that differs in a few keys (a controlled
    probe, :mod:`spp_jax.train.controlled`): each claim's gain in the two grids, compared.
    """
    cells = aggregate(results)
    found = verdicts(results, variants)
    train_side = AugmentConfig().resize_side  # where the protocols test 1 full
    by_side = scale_cells(results)
    scale_md, scale_found = scale_markdown(by_side, train_side, variants), scale_verdicts(
        by_side, min((images_of(r, "1full") for r in results if r.scale_errors), default=0))
    by_size = object_size.size_cells(results, size_bins) if size_bins else {}
    size_md = object_size.size_markdown(by_size, size_bins, train_side, variants) if by_size else ""
    size_found = object_size.size_verdicts(by_size, size_bins) if by_size else []
    base_md, base_data = controlled.baseline_section(results, baseline) if baseline else ("", {})
    runs = [f"- `{os.path.relpath(r.run.workdir, root)}`: "
            + ("reused (finished earlier)" if r.reused else "run now")
            + (f", {r.seconds / 60:.1f} min" if r.seconds else "") + curve_text(r.val_curve)
            for r in results]
    runs += [f"- `{os.path.relpath(r.workdir, root)}`: **not finished** (left out)" for r in missing]
    if missing:
        title += f" (in progress: {len(results)} of {len(results) + len(missing)} runs finished)"
    md = "\n".join([f"# {title}", "", tables_markdown(cells, variants), "",
                    "## Verdicts (top-1 error; two-sided t-test at 5 %)", "",
                    *[f"- {v.sentence()}" for v in found], "",
                    *([scale_md, "", *_verdict_lines(scale_found)] if scale_md else []),
                    *([size_md, "", *_verdict_lines(size_found)] if size_md else []),
                    *([base_md, ""] if base_md else []),
                    "## Runs", "", *runs])
    data = {"title": title,
            "cells": [{"model": m, "variant": v, "view": w, "seeds": list(c.seeds),
                       "top1": c.top1.as_dict(), "top5": c.top5.as_dict()}
                      for (m, v, w), c in cells.items()],
            "verdicts": [v.as_dict() for v in found],
            "runs": [{"workdir": os.path.relpath(r.run.workdir, root), "model": r.run.model,
                      "variant": r.run.variant.key, "seed": r.run.seed, "errors": r.errors,
                      "seconds": r.seconds, "reused": r.reused, "val_curve": list(r.val_curve),
                      "left_chance_epoch": left_chance(r.val_curve),
                      "scale_errors": {str(k): v for k, v in r.scale_errors.items()}} for r in results],
            "scale_probe": [{"model": m, "variant": v, "side": s, "top1": c.as_dict()}
                            for (m, v, s), c in by_side.items()],
            "scale_verdicts": [v.as_dict() for v in scale_found],
            "object_size": {"edges": list(size_bins.edges) if size_bins else [],
                             "cells": [{"model": m, "variant": v, "view": w, "bin": object_size.BINS[k],
                                        "top1": c.as_dict()} for (m, v, w, k), c in by_size.items()],
                             "verdicts": [v.as_dict() for v in size_found]},
            "baseline": base_data,
            "missing": [os.path.relpath(r.workdir, root) for r in missing]}
    write_report(root, "claims", md, data)
    if make_plot:
        plot(cells, os.path.join(root, "claims.png"), variants)
        scale_plot(by_side, os.path.join(root, "claims_scale.png"), train_side, variants)
    return md
