"""Mean ± std over seeds, and whether a claimed difference is larger than seed noise.

The paper's classification claims (SPP beats no SPP, multi-size beats single-size,
full-image views beat crops) are differences of error rates.  Trained from several
initialisations, each cell of a table is a sample; a claim *holds here* only if the
difference of the means is larger than what the seed-to-seed variation explains.

The test is a two-sided Student t-test at the 5 % level:

* **paired** when the two numbers of a seed share what the seed decides: the same
  trained network tested two ways (1 full against 1 crop), or two variants trained from
  the same seed, i.e. the same initial weights and the same images, order and
  augmentation (the grid's variants: :mod:`spp_jax.train.claims`).  The per-seed
  differences ``d_i`` give ``SE = std(d) / sqrt(n)`` with ``n - 1`` degrees of freedom;
  the seeds' common luck cancels;
* **unpaired** otherwise: Welch's ``SE = sqrt(s_a^2 / n_a + s_b^2 / n_b)`` with the
  Welch-Satterthwaite degrees of freedom (rounded down, at least 1).

Each error is measured on a finite test set, in steps of ``100 / images`` points, so
identical per-seed differences (a sample spread of 0, which a t-test would call infinitely
significant) say only that the spread is below one step.  Given ``images``, the spread
used is at least that of rounding each error to the step (variance ``step^2 / 12`` per
error; a paired difference has two): with 2 seeds and 100 images a difference has to
exceed 3.7 points however alike the seeds were.

With 3 seeds the bar is high on purpose (t = 4.30 at 2 degrees of freedom): a
difference the seeds cannot separate is reported as such, not as a confirmation.
Errors are in percentage points throughout.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# Two-sided 95 % quantiles of Student's t (t_{0.975, df}); df > 30 uses the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

HOLDS, NOISE, REVERSED, UNTESTED = "holds", "within seed noise", "reversed", "one seed: untested"


def t_critical(df: float) -> float:
    """t_{0.975, df} for df >= 1 (rounded down to an integer; 1.96 beyond 30)."""
    k = int(math.floor(df))
    if k < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[k - 1] if k <= len(_T975) else 1.96


@dataclasses.dataclass(frozen=True)
class SeedStats:
    """One table cell over seeds: sample mean and std (ddof 1; 0 for one seed)."""

    values: tuple[float, ...]
    seeds: tuple = ()  # the seed of each value, when known (for pairing two cells)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0

    def cell(self, digits: int = 1) -> str:
        """``"mean ± std"`` for a markdown table (just the mean for one seed)."""
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


def seed_stats(values: Sequence[float], seeds: Sequence = ()) -> SeedStats:
    """SeedStats of one or more finite values (and their seeds, if given: one per value)."""
    vals = tuple(float(v) for v in values)
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"need one or more finite values, got {values!r}")
    if seeds and len(seeds) != len(vals):
        raise ValueError(f"{len(seeds)} seeds for {len(vals)} values")
    return SeedStats(vals, tuple(seeds))


def _seed_order(seed) -> int:
    return -1 if seed is None else seed


def by_seed(per_seed: dict) -> SeedStats:
    """SeedStats of ``{seed: value}``, in seed order (None first)."""
    seeds = sorted(per_seed, key=_seed_order)
    return seed_stats([per_seed[s] for s in seeds], seeds)


def shared_seed_values(a: dict, b: dict) -> tuple[list, list]:
    """The values of two ``{seed: value}`` maps on the seeds both have, in seed order: the
    two samples of a test paired over seeds."""
    seeds = sorted(set(a) & set(b), key=_seed_order)
    return [a[s] for s in seeds], [b[s] for s in seeds]


def on_shared_seeds(a: SeedStats, b: SeedStats) -> tuple[list[float], list[float]]:
    """:func:`shared_seed_values` of two cells (each must know its values' seeds)."""
    if not a.seeds or not b.seeds:
        raise ValueError("pairing needs the seed of every value")
    return shared_seed_values(dict(zip(a.seeds, a.values)), dict(zip(b.seeds, b.values)))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A claim "``better`` has a lower error than ``worse``", tested over seeds.

    ``diff`` = mean error of ``worse`` minus mean error of ``better`` (points; positive
    favours the claim); ``se`` its standard error; ``bar`` = t * se, the smallest
    difference the seeds separate at the 5 % level; ``seed_std`` the pooled std of one
    cell (how much one run moves with its initialisation).
    """

    claim: str
    worse: str
    better: str
    diff: float
    se: float
    bar: float
    seed_std: float
    n: int
    paired: bool
    outcome: str
    unit: str = "points"   # of diff, se, bar and seed_std ("epochs" for a plateau's length)

    def sentence(self) -> str:
        kind = "paired" if self.paired else "unpaired"
        if self.outcome == UNTESTED:
            return f"{self.claim}: {self.better} vs {self.worse}: {self.diff:+.2f} {self.unit}, {UNTESTED}."
        how = f"{abs(self.diff):.2f} {self.unit} {'better' if self.diff >= 0 else 'worse'}"
        return (f"{self.claim}: {self.outcome}: {self.better} is {how} than {self.worse} (SE "
                f"{self.se:.2f}, 5 % bar {self.bar:.2f}, {kind}, {self.n} seeds; seed-to-seed std "
                f"{self.seed_std:.2f}).")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _outcome(diff: float, bar: float) -> str:
    if diff > bar:
        return HOLDS
    if diff < -bar:
        return REVERSED
    return NOISE


def compare(claim: str, worse: tuple[str, Sequence[float]], better: tuple[str, Sequence[float]],
            *, paired: bool, images: int = 0, terms: int = 1, step: float = 0.0,
            unit: str = "points") -> Verdict:
    """Test "``better`` has lower error than ``worse``"; each is (label, per-seed errors).

    Paired samples must list the same seeds in the same order.  ``images``: the number of
    test images each error was measured on (the fewer of the two sides'); it floors the
    spread at the measurement's resolution (see the module docstring).  0: no floor.
    ``terms``: how many measured errors each value sums or subtracts (1: an error; 2: a
    difference of two errors, e.g. a variant's gain), each adding its rounding variance.
    ``step``: the resolution of a value in ``unit`` when it is not an error on ``images``
    test images (e.g. 1 for a count of epochs); it replaces ``100 / images``.
    """
    (wl, wv), (bl, bv) = worse, better
    a, b = seed_stats(wv), seed_stats(bv)
    diff = a.mean - b.mean
    pooled = math.sqrt((a.std ** 2 + b.std ** 2) / 2)
    if paired and a.n != b.n:
        raise ValueError(f"paired comparison needs the same seeds: {a.n} vs {b.n} values")
    if min(a.n, b.n) < 2:
        return Verdict(claim, wl, bl, diff, math.nan, math.nan, pooled, min(a.n, b.n), paired,
                       UNTESTED, unit)
    # The rounding variance of one value: each of its `terms` errors is rounded to the step.
    step = step or (100.0 / images if images else 0.0)
    rounding = terms * step ** 2 / 12
    if paired:
        d = seed_stats(np.subtract(a.values, b.values))
        se, df = math.sqrt(max(d.std ** 2, 2 * rounding) / d.n), d.n - 1
    else:
        va, vb = max(a.std ** 2, rounding) / a.n, max(b.std ** 2, rounding) / b.n
        se = math.sqrt(va + vb)
        # Welch-Satterthwaite; with both variances 0 any df gives the same (zero) bar.
        df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1)) if se > 0 else a.n + b.n - 2
    bar = t_critical(max(df, 1.0)) * se
    return Verdict(claim, wl, bl, diff, se, bar, pooled, min(a.n, b.n), paired, _outcome(diff, bar),
                   unit)


def compare_cells(claim: str, worse: tuple[str, SeedStats], better: tuple[str, SeedStats], *,
                  images: int = 0, step: float = 0.0, unit: str = "points") -> Verdict | None:
    """:func:`compare`, paired, of two cells (label, SeedStats with seeds) on the seeds both
    have; None when they share no seed."""
    w, b = on_shared_seeds(worse[1], better[1])
    return compare(claim, (worse[0], w), (better[0], b), paired=True, images=images, step=step,
                   unit=unit) if w else None

