"""MergeFail: deterministic sampling, the fail rule on a hand-built world, distinct evaluations (cached, counted and
resampled once), pairing, exact restore."""

import json
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
from torch import nn

from spectral_peft.merging import applied_deltas
from spectral_peft.evaluation.mergefail import (
    MERGEFAIL_SEEDS, MergeFailResult, mergefail, plot_mergefail, sample_instances, summarize,
)

TASKS = ("a", "b", "c", "d")


def test_sampling_is_deterministic_uniform_and_without_replacement():
    draws = sample_instances(TASKS, 2, 20, 42)
    assert draws == sample_instances(TASKS, 2, 20, 42) == sample_instances(TASKS[::-1], 2, 20, 42)
    assert draws != sample_instances(TASKS, 2, 20, 100)
    for t in range(1, 5):
        for subset in sample_instances(TASKS, t, 20, 7):
            assert len(subset) == t == len(set(subset)) and set(subset) <= set(TASKS) and list(subset) == sorted(subset)
    assert sample_instances(TASKS, 4, 5, 0) == [TASKS] * 5
    counts = Counter(sample_instances(TASKS, 2, 6000, 3))
    assert set(counts) == set(combinations(TASKS, 2))  # every pair, each with probability 1/6
    assert all(abs(c / 6000 - 1 / 6) < 0.02 for c in counts.values())


@pytest.mark.parametrize("args, match", [
    ((TASKS, 5, 3, 0), "out of range"), ((TASKS, 0, 3, 0), "out of range"),
    ((TASKS, 2, 0, 0), ">= 1"), ((("a", "a", "b"), 2, 1, 0), "unique"),
])
def test_sampling_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        sample_instances(*args)


class World(nn.Module):
    """Task ``j``'s score is ``W[j, j]``. Each adapter adds 1 on its own diagonal entry; adapter ``d`` also subtracts
    ``harm`` from every other task's entry, so a merged subset with ``d`` scores ``1 - harm`` on the others."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)
        nn.init.zeros_(self.lin.weight)


def adapters(harm: float):
    out = {}
    for j, task in enumerate(TASKS):
        dW = torch.zeros(4, 4)
        dW[j, j] = 1.0
        if task == "d":
            dW[:3, :3] -= harm * torch.eye(3)
        out[task] = {"lin": dW}
    return out


def counting_evaluate(calls):
    def evaluate(model, task):
        calls.append(task)
        return float(model.lin.weight.detach()[TASKS.index(task), TASKS.index(task)])
    return evaluate


def run(harm, tau=0.9, method="m", seeds=(42, 100), n_merge=20):
    model, calls = World(), []
    result = mergefail({s: adapters(harm) for s in seeds}, None, counting_evaluate(calls), model, method=method,
                       seeds=seeds, n_merge=n_merge, tau=tau, density=1.0, progress=False)
    assert torch.equal(model.lin.weight, torch.zeros(4, 4))  # base restored
    return result, calls


def with_d(seeds, t, n=20):
    return np.mean([("d" in s) for seed in seeds for s in sample_instances(TASKS, t, n, seed)])


def test_known_fail_fraction_and_operators():
    # harm 1: with "d" the others score 0 < 0.9 under both operators (TIES: the signs cancel, nothing survives).
    result, _ = run(harm=1.0)
    assert result.sizes == (2, 3, 4) and result.operators == ("sum", "ties")
    for t in (2, 3, 4):
        for op in ("sum", "ties"):
            assert result.flags(op, t).mean() == pytest.approx(with_d((42, 100), t))
    assert result.flags("sum", 4).mean() == 1.0
    # harm 0.05: others score 0.95 under sum (fails only for tau above 0.95); TIES keeps the majority sign -> 1.0.
    lenient, _ = run(harm=0.05, tau=0.9)
    strict, _ = run(harm=0.05, tau=0.99)
    for t in (2, 3, 4):
        assert lenient.flags("sum", t).sum() == 0 and strict.flags("ties", t).sum() == 0
        assert strict.flags("sum", t).mean() == pytest.approx(with_d((42, 100), t))
    inst = next(i for i in strict.instances if i.operator == "sum" and "d" in i.tasks)
    assert inst.failed and inst.single == {k: 1.0 for k in inst.tasks}
    assert all(inst.scores[k] == pytest.approx(0.95) for k in inst.tasks if k != "d")


def test_merged_evaluations_are_cached():
    result, calls = run(harm=1.0, seeds=(42,), n_merge=20)
    distinct = {(i.seed, i.tasks, i.operator) for i in result.instances}
    assert len(calls) == 4 + sum(len(tasks) for _, tasks, _ in distinct)  # singles + one pass per distinct merge
    assert sum(1 for _, tasks, _ in distinct if len(tasks) == 4) == 2  # t = T: one subset, merged once per operator


def test_given_single_scores_and_input_checks():
    model = World()
    evaluate = counting_evaluate([])
    with pytest.raises(ValueError, match="no adapters for seed"):
        mergefail({42: adapters(1.0)}, None, evaluate, model, progress=False)
    with pytest.raises(ValueError, match="missing"):
        mergefail({42: adapters(1.0)}, {42: {"a": 1.0}}, evaluate, model, seeds=(42,), progress=False)
    with pytest.raises(ValueError, match="unknown merge operator"):
        mergefail({42: adapters(1.0)}, None, evaluate, model, seeds=(42,), operators=("mean",), progress=False)
    with pytest.raises(ValueError, match="seed 100 has adapters"):
        mergefail({42: adapters(1.0), 100: {"a": {}}}, None, evaluate, model, seeds=(42, 100), progress=False)
    # Single scores of 2 make every instance fail (merged scores are at most 1 < 0.9 * 2).
    twos = {42: {k: 2.0 for k in TASKS}}
    result = mergefail({42: adapters(0.0)}, twos, evaluate, model, seeds=(42,), sizes=(2,), operators=("sum",),
                       progress=False)
    assert result.flags("sum", 2).tolist() == [1.0] * 20
    assert MERGEFAIL_SEEDS == (42, 100, 2024)


def distinct(seeds, t, n=20):
    """Distinct subsets per seed at size ``t``, from the sampler alone (independent of the result's bookkeeping)."""
    return {s: set(sample_instances(TASKS, t, n, s)) for s in seeds}


def test_summary_counts_distinct_evaluations_pairs_methods_and_round_trips_json():
    bad, _ = run(harm=1.0, method="bad", seeds=MERGEFAIL_SEEDS)
    good, _ = run(harm=0.0, method="good", seeds=MERGEFAIL_SEEDS)
    bad = MergeFailResult.from_dict(json.loads(json.dumps(bad.to_dict())))
    summary = summarize([good, bad], seed=1)
    assert summary == summarize([good, bad], seed=1)
    rate = {(r.method, r.operator, r.t): r for r in summary.rates}
    for t in (2, 3, 4):
        subsets = distinct(MERGEFAIL_SEEDS, t)
        with_d_distinct = [("d" in x) for s in MERGEFAIL_SEEDS for x in subsets[s]]
        r = rate["bad", "sum", t]
        assert r.n == 60 and r.n_distinct == sum(map(len, subsets.values())) == r.n_used
        assert r.rate.estimate == pytest.approx(np.mean(with_d_distinct))  # distinct evaluations, not draws
        assert rate["good", "ties", t].rate.estimate == 0.0
    assert rate["bad", "sum", 4].n_distinct == 3  # 20 draws per seed of the one full set: one evaluation per seed
    pooled = rate["bad", "sum", None]
    assert pooled.n == 180 and pooled.n_distinct == sum(rate["bad", "sum", t].n_distinct for t in (2, 3, 4))
    assert pooled.rate.method == "hierarchical-bootstrap" and pooled.rate.low < pooled.rate.estimate < pooled.rate.high
    diff = {(d.method, d.reference, d.operator, d.t): d.difference for d in summary.differences}
    assert set(diff) == {("bad", "good", op, t) for op in ("sum", "ties") for t in (2, 3, 4, None)}
    # "good" never fails, so the paired difference has the same bootstrap distribution as "bad"'s rate.
    d, r = diff["bad", "good", "sum", None], pooled.rate
    assert (d.estimate, d.low, d.high) == pytest.approx((r.estimate, r.low, r.high))
    retention = {(x.method, x.operator): x.retention for x in summary.retention}
    assert retention["good", "sum"].estimate == retention["good", "sum"].high == 1.0
    assert retention["bad", "sum"].estimate < 1.0
    json.dumps(summary.to_dict())
    fig = plot_mergefail(summary)
    assert len(fig.axes[0].get_legend().get_texts()) == 4
    other, _ = run(harm=1.0, method="other", seeds=(42, 100))
    with pytest.raises(ValueError, match="different seeds"):
        summarize([bad, other])
    with pytest.raises(ValueError, match="unique"):
        summarize([bad, bad])


def test_ragged_seeds_keep_their_first_distinct_draws():
    seeds, n = (42, 100, 2024), 3
    result, _ = run(harm=1.0, seeds=seeds, n_merge=n)
    for t in (2, 3):
        table, drawn, n_distinct = result.table("sum", (t,))
        firsts = {s: list(dict.fromkeys(sample_instances(TASKS, t, n, s))) for s in seeds}
        m = min(map(len, firsts.values()))
        assert drawn == n * len(seeds) and n_distinct == sum(map(len, firsts.values()))
        assert [[i.tasks for i in row] for row in table] == [firsts[s][:m] for s in seeds]
    rate = next(r for r in summarize([result]).rates if r.operator == "sum" and r.t is None)
    assert rate.n_used == len(seeds) * sum(min(len(set(sample_instances(TASKS, t, n, s))) for s in seeds)
                                           for t in (2, 3, 4))
    assert rate.n_used < rate.n_distinct


def test_applied_deltas_restores_on_error():
    model = World()
    with pytest.raises(RuntimeError):
        with applied_deltas(model, {"lin": torch.ones(4, 4)}):
            assert float(model.lin.weight.detach().sum()) == 16
            raise RuntimeError
    assert torch.equal(model.lin.weight, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="not weight-carrying"):
        with applied_deltas(model, {"nope": torch.ones(1)}):
            pass
