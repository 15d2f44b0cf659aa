"""Bootstrap and t-interval helpers: coverage on simple samples, determinism, pairing, errors."""

import numpy as np
import pytest
from scipy import stats

from spectral_peft.evaluation.stats import CI, bootstrap_ci, joint_bootstrap, paired_difference_ci, seed_ci


def test_bootstrap_ci_covers_the_true_mean_and_is_deterministic():
    x = np.random.default_rng(0).normal(loc=3.0, scale=1.0, size=200)
    ci = bootstrap_ci(x, seed=7)
    assert ci.low < 3.0 < ci.high
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


def test_paired_difference_uses_pairing():
    rng = np.random.default_rng(2)
    base = rng.normal(scale=10.0, size=60)  # large shared unit effect
    a, b = base + 0.5, base + rng.normal(scale=0.1, size=60)
    paired = paired_difference_ci(a, b, seed=0)
    assert paired.low < 0.5 < paired.high and paired.low > 0  # the paired CI resolves the +0.5 shift
    unpaired_width = bootstrap_ci(a, seed=0).high - bootstrap_ci(a, seed=0).low
    assert paired.high - paired.low < 0.1 * unpaired_width


def test_joint_bootstrap_resamples_rows_jointly():
    a = np.arange(30.0)
    out = joint_bootstrap({"a": a, "same": a.copy(), "shift": a + 1}, seed=3)
    assert out["a"].low == out["same"].low and out["a"].high == out["same"].high
    assert out["shift"].low == pytest.approx(out["a"].low + 1) and out["shift"].high == pytest.approx(out["a"].high + 1)


def test_constant_samples_collapse_and_dict_is_json_ready():
    ci = bootstrap_ci([1.0, 1.0, 1.0])
    assert (ci.low, ci.estimate, ci.high) == (1.0, 1.0, 1.0)
    assert ci.to_dict() == {"estimate": 1.0, "low": 1.0, "high": 1.0, "confidence": 0.95}


def test_seed_ci_matches_student_t():
    x = [0.61, 0.64, 0.58]
    ci = seed_ci(x, confidence=0.9)
    half = stats.t.ppf(0.95, 2) * np.std(x, ddof=1) / np.sqrt(3)
    assert ci.estimate == pytest.approx(np.mean(x))
    assert (ci.low, ci.high) == pytest.approx((np.mean(x) - half, np.mean(x) + half))
    assert seed_ci([2.0, 2.0]) == CI(2.0, 2.0, 2.0, 0.95)


@pytest.mark.parametrize("call, match", [
    (lambda: bootstrap_ci([]), "non-empty"),
    (lambda: bootstrap_ci([1.0, float("nan")]), "NaN"),
    (lambda: bootstrap_ci([1.0, 2.0], confidence=1.5), "confidence"),
    (lambda: paired_difference_ci([1.0, 2.0], [1.0]), "equal lengths"),
    (lambda: joint_bootstrap({"a": [1.0, 2.0], "b": [1.0]}), "equal lengths"),
    (lambda: joint_bootstrap({}), "at least one"),
    (lambda: seed_ci([1.0]), "two values"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
