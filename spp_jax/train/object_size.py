"""Error by object size: the grid's per-image hits split by how large the object is.

Why: the paper credits multi-size training with scale robustness.  If that holds here, a
multi-size network should gain most on the images whose object is far from the typical
training size (the smallest and the largest), and the 10-view gain should not be uniform.
The embedded validation images are regenerated to measure each one's main-object scale
(:func:`spp_jax.data.shapes.main_object_scales`), the split is cut into terciles of that
scale, and every run's top-1 error is recomputed per tercile from the per-image hits its
testing recorded (``eval.json``) — no network is run again.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from spp_jax import seedstats
from spp_jax.evaluate.protocols import PROTOCOL_TITLES as VIEW_TITLES
from spp_jax.report import markdown_table
from spp_jax.train.config import TrainConfig, embedded
from spp_jax.train.grid import VARIANTS, RunResult, Variant

BINS = ("small", "medium", "large")
VIEWS = ("1crop", "1full", "10view")


@dataclasses.dataclass(frozen=True)
class SizeBins:
    """Each validation image's size bin (0 small .. 2 large) and the bins' scale edges."""

    bin_of: tuple[int, ...]          # per image index
    edges: tuple[float, ...]         # len(BINS) + 1 scale edges: min, terciles, max

    @classmethod
    def terciles(cls, scales: np.ndarray) -> "SizeBins":
        """(n,) main-object scales -> tercile bins (each about a third of the images)."""
        scales = np.asarray(scales, float)
        edges = np.percentile(scales, np.linspace(0, 100, len(BINS) + 1))
        return cls(tuple(int(b) for b in np.digitize(scales, edges[1:-1])), tuple(map(float, edges)))

    def label(self, k: int, side: int) -> str:
        """``"small (box 75-153 px at 256)"``: bin k's range of main-object box sides."""
        lo, hi = self.edges[k] * side, self.edges[k + 1] * side
        return f"{BINS[k]} (box {lo:.0f}-{hi:.0f} px at {side})"


def size_bins_for(cfg: TrainConfig) -> SizeBins | None:
    """The bins of a run's validation images (``val_examples`` of them; embedded data only,
    else None)."""
    if not embedded(cfg.dataset):
        return None
    from spp_jax.data import datasets, shapes
    return SizeBins.terciles(shapes.main_object_scales(datasets.EMBEDDED[cfg.dataset], "validation",
                                                       cfg.val_examples, cfg.dataset_seed))


def _bin_error(hits: dict[int, tuple[bool, bool]], bins: SizeBins, k: int) -> float | None:
    got = [h[0] for i, h in hits.items() if i < len(bins.bin_of) and bins.bin_of[i] == k]
    return 100.0 * (1.0 - float(np.mean(got))) if got else None


SizeCells = dict[tuple[str, str, str, int], seedstats.SeedStats]  # (model, variant, view, bin)


def size_cells(results: Sequence[RunResult], bins: SizeBins) -> SizeCells:
    """Top-1 error (%) over seeds per (model, variant key, view, size bin)."""
    per: dict[tuple[str, str, str, int], dict] = {}
    for r in results:
        for view in VIEWS:
            for k in range(len(BINS)):
                err = _bin_error(r.hits.get(view, {}), bins, k)
                if err is not None:
                    per.setdefault((r.run.model, r.run.variant.key, view, k), {})[r.run.seed] = err
    return {key: seedstats.by_seed(v) for key, v in sorted(per.items(), key=str)}


def size_verdicts(cells: SizeCells, bins: SizeBins) -> list[seedstats.Verdict]:
    """Per model, view (1 crop, 10-view) and size bin: multi-size training beats
    single-size (paired over seeds, as :func:`spp_jax.train.claims.verdicts`; each bin's
    error counts the bin's images, about a third of the split)."""
    out = []
    for model, view, k in sorted({(m, w, k) for m, _, w, k in cells if w != "1full"},
                                 key=lambda t: (t[0], VIEWS.index(t[1]), t[2])):
        single, multi = cells.get((model, "single", view, k)), cells.get((model, "multi", view, k))
        if single and multi:
            out.append(seedstats.compare_cells(
                f"{model}, {VIEW_TITLES[view]}, {BINS[k]} objects: multi-size training beats "
                "single-size", ("SPP single-size", single), ("SPP multi-size", multi),
                images=bins.bin_of.count(k)))
    return [v for v in out if v]


def size_markdown(cells: SizeCells, bins: SizeBins, side: int,
                  variants: Sequence[Variant] = VARIANTS) -> str:
    """Per model: rows (view, size bin), columns the variants, top-1 mean ± std."""
    if not cells:
        return ""
    most = max(c.n for c in cells.values())
    out = ["## Top-1 error (%) by the main object's size, mean ± std over seeds", "",
           f"Validation images in terciles of their main object's box side (at the test scale, "
           f"shorter side {side}); each run's error recomputed from its per-image hits."]
    for m in sorted({m for m, _, _, _ in cells}):
        cols = [v.title for v in variants if any(key[:2] == (m, v.key) for key in cells)]
        key = {v.title: v.key for v in variants}
        rows, tv = [], {}
        for w in VIEWS:
            for k in range(len(BINS)):
                row = f"{VIEW_TITLES[w]}, {bins.label(k, side)}"
                got = {c: cells[(m, key[c], w, k)] for c in cols if (m, key[c], w, k) in cells}
                if got:
                    rows.append(row)
                    tv.update({(row, c): s.cell() + (f" (n={s.n})" if s.n < most else "")
                               for c, s in got.items()})
        out += ["", f"### {m}", "", markdown_table(rows, cols, tv, corner="view, object size")]
    return "\n".join(out)
