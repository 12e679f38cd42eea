"""Pure statistics of the benchmark and its report (numpy only; no other module of `eval/`).

    bootstrap_ci(x)          mean(x) and the central `level` quantiles of mean(x[idx_b]),
                             idx_b ~ uniform indices with replacement, b = 1..n_boot
    bootstrap_diff_ci(a, b)  mean(a) - mean(b), resampled jointly (paired) or per side
    emotion_matrix(ts)       [N, length] emotion trajectories, each held at its last value

The bootstrap draws from numpy's `default_rng(seed)`, so a report is reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap percentile interval at `level`."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "level": self.level}


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of bootstrap statistics: quantiles (1 - level) / 2 and
    (1 + level) / 2."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of `values` and its percentile bootstrap interval.

    With x of n values: m_b = mean(x[i_b1], ..., x[i_bn]) for b = 1..n_boot, the indices drawn
    uniformly from 0..n-1 with replacement (`default_rng(seed)`); lo / hi are the (1 - level) / 2
    and (1 + level) / 2 quantiles of the m_b. `mean` is mean(x) itself.
    """
    x = np.asarray(values, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    lo, hi = _percentiles(x[idx].mean(axis=1), level)
    mean = float(x.mean())
    return Interval(mean, lo, hi, int(x.size), level)


def bootstrap_diff_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    paired: bool = True,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """mean(a) - mean(b) with a percentile bootstrap interval.

    d_b = mean(a[i_b]) - mean(b[j_b]): `paired` (same profiles in the same order, as in the
    benchmark; equal sizes) uses the same resampled indices on both sides (j_b = i_b); otherwise
    each side is resampled on its own. lo / hi as in `bootstrap_ci`; n = min(len(a), len(b)).
    """
    x, y = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if x.size == 0 or y.size == 0:
        raise ValueError("bootstrap_diff_ci: no values")
    rng = np.random.default_rng(seed)
    if paired:
        if x.size != y.size:
            raise ValueError(f"paired bootstrap needs equal sizes, got {x.size} and {y.size}")
        idx = rng.integers(0, x.size, size=(n_boot, x.size))
        stats = x[idx].mean(axis=1) - y[idx].mean(axis=1)
    else:
        ix = rng.integers(0, x.size, size=(n_boot, x.size))
        iy = rng.integers(0, y.size, size=(n_boot, y.size))
        stats = x[ix].mean(axis=1) - y[iy].mean(axis=1)
    lo, hi = _percentiles(stats, level)
    diff = float(x.mean() - y.mean())
    return Interval(diff, lo, hi, int(min(x.size, y.size)), level)


def emotion_matrix(transcripts: Sequence[dict[str, Any]], length: int | None = None) -> np.ndarray:
    """[N, length] float emotions per dialogue (column 0 = the start).

    Row i is transcript i's `emotions` e_0..e_k cut to `length` and padded by holding its last
    value: out[i, t] = e_min(t, k). A finished dialogue keeps its final score, so the mean over
    rows at turn t averages every dialogue. `length` defaults to the longest trajectory.
    """
    rows = [list(t["emotions"]) for t in transcripts]
    if not rows:
        return np.zeros((0, length or 0))
    width = length or max(len(r) for r in rows)
    out = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        r = r[:width]
        out[i, : len(r)] = r
        out[i, len(r) :] = r[-1]
    return out
