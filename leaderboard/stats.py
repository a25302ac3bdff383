"""The leaderboard's statistics: pure functions over plain numbers, tested on hand-made values.

- one run per seed: the newest finished run when a seed was run twice;
- a cell's mean with a 95% Student-t interval over seeds (n kept visible);
- fairness across clients: the std of per-client accuracy and the mean of the worst 10%;
- methods compared with the best one *paired by seed* (a seed fixes the partition for every
  method): a 95% paired t-interval of the per-seed difference; a method whose interval
  contains 0 is "not distinguishable from the best". With 3-5 seeds a paired Wilcoxon test
  cannot reach p < 0.05 (its smallest p is 0.25 at n=3), so it is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence, TypeVar

import numpy as np
from scipy import stats as _scipy_stats

CONFIDENCE = 0.95
WORST_SHARE = 0.10
INTERVAL_METHOD = "95% Student-t interval over seeds"
PAIRED_METHOD = "95% paired t-interval of the per-seed difference to the best method"

T = TypeVar("T")


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval over n values (lo = hi = nan when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2 if self.n >= 2 else math.nan

    def contains(self, value: float) -> bool:
        return self.n >= 2 and self.lo <= value <= self.hi


def newest_per_seed(runs: Iterable[T], seed: callable, started: callable) -> tuple[list[T], list[T]]:
    """One run per seed, the newest (by `started`); returns (kept sorted by seed, dropped older repeats)."""
    best: dict[Hashable, T] = {}
    dropped: list[T] = []
    for run in sorted(runs, key=lambda r: (seed(r), started(r))):
        if seed(run) in best:
            dropped.append(best[seed(run)])
        best[seed(run)] = run
    return [best[k] for k in sorted(best)], dropped


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t confidence interval of `values` (NaN values are left out)."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      confidence: float = CONFIDENCE) -> Interval:
    """Interval of the mean of a[s] - b[s] over the seeds s both hold."""
    common = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in common], confidence)


def not_distinguishable(diff: Interval) -> bool | None:
    """True when the paired interval contains 0; None when there are too few shared seeds to tell."""
    if diff.n < 2:
        return None
    return diff.contains(0.0)


def client_fairness(accuracies: Sequence[float], worst_share: float = WORST_SHARE) -> tuple[float, float]:
    """(std of per-client accuracy, mean of the worst `worst_share` of clients, at least one client)."""
    x = np.sort(np.asarray([a for a in accuracies if not math.isnan(a)], dtype=float))
    if len(x) == 0:
        return math.nan, math.nan
    k = max(1, math.ceil(worst_share * len(x)))
    return float(x.std()), float(x[:k].mean())


def best_index(means: Sequence[float]) -> int | None:
    """Index of the highest mean (the first on ties); None when none is a number."""
    found = [(m, -i) for i, m in enumerate(means) if not math.isnan(m)]
    return -max(found)[1] if found else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats: lower cost (x) and higher accuracy (y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front
