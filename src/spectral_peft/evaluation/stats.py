"""The one statistics module: every confidence interval in the project comes from here.

Data come as 1-D ``[items]`` or 2-D ``[seeds, items]`` arrays (``seeds`` = independent training runs, ``items`` =
evaluation units). Let ``c`` be the confidence level, ``alpha = 1 - c`` and ``z = Phi^{-1}(1 - alpha / 2)``.

Wilson score interval (``wilson_ci``), for ``k`` successes in ``n`` trials with ``p = k / n``::

    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    [low, high] = [centre - half, centre + half]          (clipped to [0, 1] against rounding)

It inverts the score test, so it stays inside ``[0, 1]`` and has width > 0 even at ``k = 0`` or ``k = n``
(0/8 gives about [0, 0.32]). The estimate reported is ``p``.

Percentile bootstrap (``bootstrap_ci`` on 1-D data): draw ``B = n_resamples`` samples of ``n`` items with
replacement, take each sample's mean ``m_b``; the interval is the ``alpha/2`` and ``1 - alpha/2`` quantiles (linear
interpolation) of ``{m_b}``. The estimate is the sample mean.

Hierarchical (two-stage) bootstrap (2-D data with ``S >= 2`` seeds): for each replicate ``b`` draw ``S`` seeds with
replacement, then, independently within each drawn seed, ``N`` items with replacement; ``m_b`` is the mean of the
``S x N`` drawn values. The interval is again the percentile interval of ``{m_b}``; the estimate is the grand mean.
Resampling seeds carries the seed-to-seed variance that pooling all ``S * N`` values as items ignores (the pooled item
bootstrap then under-covers). 2-D data with one seed are treated as 1-D.

Pairing: a paired difference ``mean(a) - mean(b)`` is the bootstrap of the per-unit differences ``a - b`` (the same
seed and item drawn for both). ``joint_bootstrap`` draws one set of indices per replicate and applies it to every
column, so columns measured on the same units stay paired: the CI of a column ``a - b`` equals
``paired_difference_ci(a, b)`` for the same seed.

Degenerate data: a constant column has no resampling variability, so its interval collapses to its mean. For 0/1
outcomes, ``proportion_ci`` replaces such a zero-width interval by the Wilson interval of the pooled counts.

Index draws are chunked (at most about ``_CHUNK_ELEMENTS`` item indices at once) to bound memory. The chunk size
depends only on the data shape and the draws come from ``numpy.random.default_rng(seed)``, so the same shape, seed
and ``n_resamples`` always give the same indices, whatever the values or the number of columns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Literal, Mapping

import numpy as np
from numpy.typing import ArrayLike
from ..errors import InputError

Method = Literal["wilson", "bootstrap", "hierarchical-bootstrap"]
_CHUNK_ELEMENTS = 20_000_000


@dataclass(frozen=True)
class CI:
    """A point estimate with a two-sided interval ``[low, high]`` at level ``confidence``, made by ``method``."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: Method

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")


def _check_resamples(n_resamples: int) -> None:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise InputError(f"n_resamples must be a positive integer, got {n_resamples!r}")


def _array(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as float64 ``[items]`` or ``[seeds, items]``; a single seed row is returned 1-D."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a rectangular numeric 1-D [items] or 2-D [seeds, items] array") from None
    if x.ndim not in (1, 2) or x.size == 0:
        raise InputError(f"{name} must be a non-empty 1-D [items] or 2-D [seeds, items] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name} contains NaN or infinite entries; drop or impute them first")
    return x[0] if x.ndim == 2 and len(x) == 1 else x


def _resampled_means(table: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap means ``[columns, n_resamples]`` of ``table [columns, seeds, items]``, one index set for all columns.

    With one seed only items are drawn (the plain bootstrap); otherwise seeds, then items within each drawn seed.
    """
    n_seeds, n_items = table.shape[1:]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // (n_seeds * n_items))
    means = np.empty((len(table), n_resamples))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        if n_seeds > 1:
            seeds = rng.integers(0, n_seeds, size=(b, n_seeds))
        else:
            seeds = np.zeros((b, 1), dtype=np.intp)
        items = rng.integers(0, n_items, size=(b, n_seeds, n_items))
        for c, column in enumerate(table):
            means[c, start:start + b] = column[seeds[:, :, None], items].mean(axis=(1, 2))
    return means


def joint_bootstrap(columns: Mapping[str, ArrayLike], confidence: float = 0.95, n_resamples: int = 9999,
                    seed: int = 0) -> dict[str, CI]:
    """Bootstrap CI of each column's mean, with one set of resampled (seed, item) indices shared by all columns.

    Columns share one shape, 1-D ``[items]`` or 2-D ``[seeds, items]``; 2-D with >= 2 seeds uses the hierarchical
    bootstrap. Constant columns collapse to their mean.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    if not columns:
        raise InputError("joint_bootstrap needs at least one column")
    data = {name: _array(v, name) for name, v in columns.items()}
    shapes = {x.shape for x in data.values()}
    if len(shapes) != 1:
        raise InputError(f"joint_bootstrap columns must share one shape to stay paired, got {sorted(shapes)}")
    (shape,) = shapes
    method: Method = "hierarchical-bootstrap" if len(shape) == 2 else "bootstrap"
    table = np.stack([x.reshape(-1, shape[-1]) for x in data.values()])
    means = table.mean(axis=(1, 2))
    varying = [c for c in range(len(table)) if np.any(table[c] != table[c].flat[0])]
    boot = _resampled_means(table[varying], n_resamples, seed) if varying else np.empty((0, n_resamples))
    bounds = np.full((len(table), 2), means[:, None])
    bounds[varying] = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2], axis=1).T
    return {name: CI(float(m), float(lo), float(hi), confidence, method)
            for name, m, (lo, hi) in zip(data, means, bounds)}


def bootstrap_ci(values: ArrayLike, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> CI:
    """Bootstrap CI of the grand mean of 1-D ``[items]`` (percentile) or 2-D ``[seeds, items]`` (hierarchical)."""
    return joint_bootstrap({"values": values}, confidence, n_resamples, seed)["values"]


def paired_difference_ci(a: ArrayLike, b: ArrayLike, confidence: float = 0.95, n_resamples: int = 9999,
                         seed: int = 0) -> CI:
    """CI of ``mean(a) - mean(b)`` resampling the pairs ``(a, b)`` (seeds, then items, when 2-D)."""
    a, b = _array(a, "a"), _array(b, "b")
    if a.shape != b.shape:
        raise InputError(f"a and b must have the same shape to be paired, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, confidence, n_resamples, seed)


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> CI:
    """Wilson score interval of the proportion ``successes / n`` (formula in the module docstring)."""
    _check_confidence(confidence)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"wilson_ci needs an integer n >= 1 trials, got {n!r}")
    if not isinstance(successes, (int, np.integer)) or not 0 <= successes <= n:
        raise InputError(f"successes must be an integer in [0, n={n}], got {successes!r}")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p, shrink = successes / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return CI(p, max(0.0, float(centre - half)), min(1.0, float(centre + half)), confidence, "wilson")


def proportion_ci(flags: ArrayLike, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> CI:
    """CI of a success rate from 0/1 outcomes: Wilson for ``[items]``, hierarchical bootstrap for ``[seeds, items]``.

    A zero-width bootstrap interval (e.g. every outcome 0) falls back to the Wilson interval of the pooled counts.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    x = _array(flags, "flags")
    if not np.all((x == 0) | (x == 1)):
        raise InputError(f"flags must be 0/1 outcomes, got values such as {np.unique(x[(x != 0) & (x != 1)])[:3]}")
    successes, n = int(x.sum()), int(x.size)
    if x.ndim == 1:
        return wilson_ci(successes, n, confidence)
    ci = bootstrap_ci(x, confidence, n_resamples, seed)
    return wilson_ci(successes, n, confidence) if ci.low == ci.high else ci
