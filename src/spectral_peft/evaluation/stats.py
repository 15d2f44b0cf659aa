"""Confidence intervals: percentile bootstrap of means (single, paired, joint) and t-intervals over seeds.

All bootstraps use ``scipy.stats.bootstrap(method="percentile")`` with a generator seeded by ``seed``, so the same
inputs and seed always give the same interval. For paired samples ``(a_i, b_i)`` the bootstrap of
``mean(a - b)`` resamples pairs, i.e. it is the bootstrap of the per-pair differences ``a_i - b_i``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class CI:
    """A point estimate (the sample mean) with a two-sided interval ``[low, high]`` at level ``confidence``."""

    estimate: float
    low: float
    high: float
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _sample(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    return x


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def joint_bootstrap(columns: Mapping[str, Sequence[float]], confidence: float = 0.95, n_resamples: int = 9999,
                    seed: int = 0) -> dict[str, CI]:
    """Percentile-bootstrap CI of each column's mean, resampling the rows of all columns jointly.

    Every bootstrap replicate draws one set of row indices and uses it for every column, so columns measured on the
    same units (e.g. the same MergeFail instances under several methods) stay paired.
    """
    _check_confidence(confidence)
    if not columns:
        raise ValueError("joint_bootstrap needs at least one column")
    data = [_sample(v, name) for name, v in columns.items()]
    if len({len(x) for x in data}) != 1:
        raise ValueError(f"paired columns must have equal lengths, got {[len(x) for x in data]}")
    table = np.stack(data, axis=1)
    means = table.mean(axis=0)
    if len(table) == 1 or np.all(table == table[0]):
        # No resampling variability (scipy refuses degenerate samples): the interval collapses to the mean.
        return {name: CI(float(m), float(m), float(m), confidence) for name, m in zip(columns, means)}
    res = stats.bootstrap((table,), lambda a, axis: a.mean(axis=axis), axis=0, n_resamples=n_resamples,
                          confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    return {name: CI(float(m), float(lo), float(hi), confidence) for name, m, lo, hi in zip(columns, means, low, high)}


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> CI:
    """Percentile-bootstrap CI of ``mean(values)``."""
    return joint_bootstrap({"values": values}, confidence, n_resamples, seed)["values"]


def paired_difference_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, n_resamples: int = 9999,
                         seed: int = 0) -> CI:
    """Paired-bootstrap CI of ``mean(a) - mean(b)`` (pairs ``(a_i, b_i)`` resampled together)."""
    a, b = _sample(a, "a"), _sample(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal lengths, got {len(a)} and {len(b)}")
    return bootstrap_ci(a - b, confidence, n_resamples, seed)


def seed_ci(values: Sequence[float], confidence: float = 0.95) -> CI:
    """``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` over per-seed results (Student t; needs at least two seeds)."""
    _check_confidence(confidence)
    x = _sample(values)
    if len(x) < 2:
        raise ValueError("a t-interval over seeds needs at least two values")
    mean, sem = float(x.mean()), float(stats.sem(x))
    if sem == 0:
        return CI(mean, mean, mean, confidence)
    low, high = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return CI(mean, float(low), float(high), confidence)
