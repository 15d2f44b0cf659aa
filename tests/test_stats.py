"""The statistics module: Wilson against published values, bootstrap coverage (plain and hierarchical), pairing,
proportions with a degenerate fallback, determinism and one-line errors."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from spectral_peft.evaluation import stats
from spectral_peft.evaluation.stats import (CI, bootstrap_ci, joint_bootstrap, paired_difference_ci, proportion_ci,
                                            wilson_ci)


def wilson_closed_form(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson (1927) written as the roots of ``(p - p_hat)^2 = z^2 p (1 - p) / n``, a quadratic in ``p``."""
    z2 = NormalDist().inv_cdf((1 + confidence) / 2) ** 2
    p_hat = k / n
    a, b, c = 1 + z2 / n, -(2 * p_hat + z2 / n), p_hat ** 2
    root = np.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k, n", [(0, 8), (5, 10), (1, 100)])
def test_wilson_matches_the_closed_form(k, n):
    ci = wilson_ci(k, n)
    assert (ci.low, ci.high) == pytest.approx(wilson_closed_form(k, n), abs=1e-12)
    assert ci.estimate == k / n and ci.method == "wilson" and ci.confidence == 0.95


@pytest.mark.parametrize("k, n, low, high", [
    (0, 8, 0.0, 0.3244),  # hand value: z^2/16 / (1 + z^2/8) * 2 with z = 1.96
    (5, 10, 0.2366, 0.7634),
    (1, 100, 0.0018, 0.0545),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat. Med. 17:857, Table I (score method)
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_published_values(k, n, low, high):
    ci = wilson_ci(k, n)
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-4)


def test_wilson_is_non_degenerate_at_the_edges_and_narrows_with_confidence():
    zero, full = wilson_ci(0, 8), wilson_ci(8, 8)
    assert zero.low == 0.0 and zero.high > 0.3
    assert full.high == 1.0 and full.low == pytest.approx(1 - zero.high)
    narrow, wide = wilson_ci(3, 10, 0.9), wilson_ci(3, 10, 0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_bootstrap_ci_covers_the_true_mean_and_is_deterministic():
    x = np.random.default_rng(0).normal(loc=3.0, scale=1.0, size=200)
    ci = bootstrap_ci(x, seed=7)
    assert ci.low < 3.0 < ci.high and ci.method == "bootstrap"
    assert ci.low < ci.estimate < ci.high and ci.estimate == pytest.approx(x.mean())
    # The percentile interval of a mean is close to the normal-theory one for n = 200.
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.15)
    assert bootstrap_ci(x, seed=7) == ci
    assert bootstrap_ci(x, seed=8) != ci


def test_bootstrap_coverage_rate_is_near_nominal():
    rng = np.random.default_rng(1)
    covered = 0
    for s in range(100):
        ci = bootstrap_ci(rng.normal(size=40), n_resamples=999, seed=s)
        covered += ci.low < 0 < ci.high
    assert 85 <= covered <= 100


def test_hierarchical_bootstrap_covers_with_seed_variance_and_pooling_does_not():
    # x[s, i] = mu + u_s + e_si with var(u) = var(e) = 1: the grand mean's variance is dominated by the 20 seed
    # effects, which pooling all 200 values as independent items ignores.
    rng, mu = np.random.default_rng(0), 0.3
    hierarchical = pooled = 0
    for d in range(200):
        x = mu + rng.normal(size=(20, 1)) + rng.normal(size=(20, 10))
        ci = bootstrap_ci(x, n_resamples=999, seed=d)
        assert ci.method == "hierarchical-bootstrap" and ci.estimate == pytest.approx(x.mean())
        hierarchical += ci.low < mu < ci.high
        flat = bootstrap_ci(x.ravel(), n_resamples=999, seed=d)
        pooled += flat.low < mu < flat.high
    assert 176 <= hierarchical <= 198
    assert pooled < 160 and pooled < hierarchical - 40


def test_one_seed_behaves_like_items():
    x = np.random.default_rng(3).normal(size=30)
    assert bootstrap_ci(x[None, :], seed=2) == bootstrap_ci(x, seed=2)
    flags = (x > 0).astype(int)
    assert proportion_ci(flags[None, :]) == wilson_ci(int(flags.sum()), 30)


def test_chunked_resampling_is_deterministic_and_agrees(monkeypatch):
    x = np.random.default_rng(4).normal(size=(4, 25)) + np.arange(4)[:, None]
    whole = bootstrap_ci(x, n_resamples=1999, seed=5)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 7 * x.size)  # 7 resamples per chunk
    chunked = bootstrap_ci(x, n_resamples=1999, seed=5)
    assert chunked == bootstrap_ci(x, n_resamples=1999, seed=5)
    width = whole.high - whole.low
    assert chunked.low == pytest.approx(whole.low, abs=0.1 * width)
    assert chunked.high == pytest.approx(whole.high, abs=0.1 * width)


@pytest.mark.parametrize("shape", [(80,), (5, 40)])
def test_paired_difference_detects_a_planted_effect(shape):
    rng = np.random.default_rng(2)
    shared = rng.normal(scale=1.0, size=shape)  # large unit effect common to both arms
    b = shared + rng.normal(scale=0.05, size=shape)
    a = b + 0.1 + rng.normal(scale=0.05, size=shape)
    paired = paired_difference_ci(a, b, seed=0)
    assert paired.estimate == pytest.approx(a.mean() - b.mean())
    assert 0 < paired.low < 0.1 < paired.high
    ci_a, ci_b = bootstrap_ci(a, seed=0), bootstrap_ci(b, seed=0)
    assert ci_a.low < ci_b.high and ci_b.low < ci_a.high  # the unpaired intervals overlap


def test_proportion_ci_two_levels_and_degenerate_fallback():
    flags = np.array([[1, 0, 0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 1, 0, 0]])
    assert proportion_ci(flags[0]) == wilson_ci(2, 8)
    ci = proportion_ci(flags.astype(bool), seed=1)
    assert ci.method == "hierarchical-bootstrap" and ci.estimate == pytest.approx(7 / 24)
    zeros = proportion_ci(np.zeros((3, 8)))
    assert zeros == wilson_ci(0, 24) and zeros.low == 0.0 and zeros.high > 0.1
    ones = proportion_ci(np.ones((3, 8), dtype=int))
    assert ones == wilson_ci(24, 24) and ones.low < 1.0


@pytest.mark.parametrize("shape", [(30,), (3, 30)])
def test_joint_bootstrap_keeps_columns_paired(shape):
    rng = np.random.default_rng(5)
    a = rng.normal(size=shape) + (np.arange(shape[0])[:, None] if len(shape) == 2 else 0)
    b = a + rng.normal(scale=0.5, size=shape)
    out = joint_bootstrap({"a": a, "same": a.copy(), "shift": a + 1, "b": b, "diff": a - b, "zero": 0 * a}, seed=3)
    assert out["a"] == out["same"]
    assert out["shift"].low == pytest.approx(out["a"].low + 1) and out["shift"].high == pytest.approx(out["a"].high + 1)
    assert out["diff"] == paired_difference_ci(a, b, seed=3)
    assert out["a"] == bootstrap_ci(a, seed=3)
    assert (out["zero"].low, out["zero"].high) == (0.0, 0.0)
    assert out["a"].method == ("hierarchical-bootstrap" if len(shape) == 2 else "bootstrap")


def test_constant_samples_collapse_and_dict_is_json_ready():
    ci = bootstrap_ci([1.0, 1.0, 1.0])
    assert (ci.low, ci.estimate, ci.high) == (1.0, 1.0, 1.0)
    assert ci.to_dict() == {"estimate": 1.0, "low": 1.0, "high": 1.0, "confidence": 0.95, "method": "bootstrap"}
    assert bootstrap_ci([[2.0, 2.0], [2.0, 2.0]]) == CI(2.0, 2.0, 2.0, 0.95, "hierarchical-bootstrap")


@pytest.mark.parametrize("call, match", [
    (lambda: bootstrap_ci([]), "non-empty"),
    (lambda: bootstrap_ci(np.zeros((2, 3, 4))), "2-D"),
    (lambda: bootstrap_ci([[1.0, 2.0], [1.0]]), "rectangular"),
    (lambda: bootstrap_ci([1.0, float("nan")]), "NaN"),
    (lambda: bootstrap_ci([[1.0, float("inf")], [1.0, 2.0]]), "NaN"),
    (lambda: bootstrap_ci([1.0, 2.0], confidence=1.5), "confidence"),
    (lambda: bootstrap_ci([1.0, 2.0], confidence=0.0), "confidence"),
    (lambda: bootstrap_ci([1.0, 2.0], confidence=1.0), "confidence"),
    (lambda: bootstrap_ci([1.0, 2.0], n_resamples=0), "n_resamples"),
    (lambda: paired_difference_ci([1.0, 2.0], [1.0]), "same shape"),
    (lambda: paired_difference_ci(np.zeros((2, 3)), np.zeros((3, 2))), "same shape"),
    (lambda: joint_bootstrap({"a": [1.0, 2.0], "b": [1.0]}), "one shape"),
    (lambda: joint_bootstrap({}), "at least one"),
    (lambda: wilson_ci(0, 0), "n >= 1"),
    (lambda: wilson_ci(9, 8), r"\[0, n=8\]"),
    (lambda: wilson_ci(1, 8, confidence=-0.1), "confidence"),
    (lambda: proportion_ci([0, 1, 2]), "0/1"),
    (lambda: proportion_ci([[0.5, 1.0], [0.0, 1.0]]), "0/1"),
    (lambda: proportion_ci([0, 1], confidence=2), "confidence"),
])
def test_bad_input_raises_one_line(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
