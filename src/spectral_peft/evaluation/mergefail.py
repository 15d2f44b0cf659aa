"""MergeFail (HiP-LoRA, appendix C.3): how often merging single-task adapters breaks one of the tasks.

Single-task adapters are trained with seeds {42, 100, 2024}. For each merge size ``t`` and each seed, ``n_merge = 20``
instances are drawn: a task subset of size ``t``, uniformly without replacement, with that seed's adapter for each
task. The adapters' updates are merged (``sum`` = task arithmetic, or ``ties``; ``merging.merge_deltas``) and written
into the base model. An instance fails if the merged model's score on ANY task ``j`` of the subset is below
``tau * s_j``, where ``s_j`` is the score of task ``j``'s own adapter (same seed) alone, ``tau = 0.9``.
The fail rate at ``t`` pools the ``n_merge * n_seeds`` instances; its 95% CI is a percentile bootstrap over
instances. Methods are compared on identical instances (sampling depends only on the tasks, ``t``, ``n`` and the
seed), so :func:`summarize` resamples instances jointly across methods and operators and also reports the CI of
each difference of fail rates.

Fixed where the papers are silent: instance ``i`` of seed ``s`` at size ``t`` comes from
``numpy.random.default_rng([s, t])`` over the sorted task names; instances are independent draws, so a subset can
recur (always at ``t = T``), and each distinct (seed, subset, operator) is merged and evaluated once; the sum merge
uses weight 1 per adapter; the bootstrap resamples the pooled instances, not stratified by seed.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ..merging import MERGE_OPERATORS, applied_deltas, merge_deltas
from .stats import CI, joint_bootstrap

MERGEFAIL_SEEDS = (42, 100, 2024)

Deltas = Mapping[str, torch.Tensor]


def sample_instances(tasks: Sequence[str], t: int, n: int, seed: int) -> list[tuple[str, ...]]:
    """``n`` task subsets of size ``t``, each uniform without replacement over ``sorted(tasks)``, returned sorted.

    Deterministic in ``(set(tasks), t, n, seed)``: the generator is ``numpy.random.default_rng([seed, t])``.
    """
    names = sorted(tasks)
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(tasks)}")
    if not 1 <= t <= len(names):
        raise ValueError(f"merge size t={t} is out of range for {len(names)} tasks")
    if n < 1:
        raise ValueError(f"the number of instances must be >= 1, got {n}")
    rng = np.random.default_rng([seed, t])
    return [tuple(names[i] for i in sorted(rng.choice(len(names), size=t, replace=False))) for _ in range(n)]


@dataclass(frozen=True)
class MergeInstance:
    """One merged instance: the subset, the merged model's scores, the single-adapter scores, and the verdict."""

    seed: int
    t: int
    index: int
    tasks: tuple[str, ...]
    operator: str
    scores: dict[str, float]
    single: dict[str, float]
    failed: bool

    @property
    def key(self) -> tuple:
        return self.seed, self.t, self.index, self.tasks, self.operator


@dataclass
class MergeFailResult:
    """All instances of one method's MergeFail run."""

    method: str
    tau: float
    n_merge: int
    density: float
    seeds: tuple[int, ...]
    sizes: tuple[int, ...]
    operators: tuple[str, ...]
    instances: list[MergeInstance] = field(default_factory=list)

    def flags(self, operator: str, t: int) -> np.ndarray:
        """Fail indicators (0/1) at ``(operator, t)``, ordered by (seed, index)."""
        rows = sorted((i for i in self.instances if i.operator == operator and i.t == t), key=lambda i: i.key)
        if not rows:
            raise ValueError(f"{self.method}: no instances for operator {operator!r} at t={t}")
        return np.array([float(i.failed) for i in rows])

    def instance_keys(self, operator: str, t: int) -> list[tuple]:
        return sorted(i.key for i in self.instances if i.operator == operator and i.t == t)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "MergeFailResult":
        instances = [MergeInstance(**{**i, "tasks": tuple(i["tasks"])}) for i in d["instances"]]
        return cls(d["method"], d["tau"], d["n_merge"], d["density"], tuple(d["seeds"]), tuple(d["sizes"]),
                   tuple(d["operators"]), instances)


def _task_set(deltas_by_seed_task: Mapping[int, Mapping[str, Deltas]], seeds: Sequence[int]) -> list[str]:
    missing = [s for s in seeds if s not in deltas_by_seed_task]
    if missing:
        raise ValueError(f"no adapters for seed(s) {missing}")
    tasks = sorted(deltas_by_seed_task[seeds[0]])
    for s in seeds:
        if sorted(deltas_by_seed_task[s]) != tasks:
            raise ValueError(f"seed {s} has adapters for {sorted(deltas_by_seed_task[s])}, seed {seeds[0]} for {tasks}")
    return tasks


def mergefail(
    deltas_by_seed_task: Mapping[int, Mapping[str, Deltas]],
    single_scores: Mapping[int, Mapping[str, float]] | None,
    evaluate: Callable[[nn.Module, str], float],
    base_model: nn.Module,
    *,
    method: str = "adapter",
    seeds: Sequence[int] = MERGEFAIL_SEEDS,
    sizes: Sequence[int] | None = None,
    operators: Sequence[str] = MERGE_OPERATORS,
    n_merge: int = 20,
    tau: float = 0.9,
    density: float = 0.2,
    progress: bool = True,
) -> MergeFailResult:
    """Run MergeFail for one method (see the module docstring).

    ``deltas_by_seed_task[seed][task]``: that adapter's ``{module: dW}`` (``merging.adapter_deltas``).
    ``single_scores[seed][task]``: the adapter's own score on its task; ``None`` evaluates each adapter alone.
    ``evaluate(model, task) -> score`` (higher is better) must not keep or modify the model: merged updates are
    written into ``base_model`` in place and removed bit-exactly afterwards. ``sizes`` defaults to ``2..T``.
    ``density`` is TIES' trim density.
    """
    bad = [op for op in operators if op not in MERGE_OPERATORS]
    if bad:
        raise ValueError(f"unknown merge operator(s) {bad}; use {MERGE_OPERATORS}")
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    seeds = tuple(seeds)
    tasks = _task_set(deltas_by_seed_task, seeds)
    sizes = tuple(range(2, len(tasks) + 1) if sizes is None else sizes)
    if single_scores is None:
        single_scores = {s: {task: _evaluate_with(base_model, deltas_by_seed_task[s][task], evaluate, [task])[task]
                             for task in tasks} for s in seeds}
    for s in seeds:
        absent = [task for task in tasks if task not in single_scores.get(s, {})]
        if absent:
            raise ValueError(f"single-adapter scores missing for seed {s}, task(s) {absent}")
    plan = [(s, t, i, subset, op) for s in seeds for t in sizes
            for i, subset in enumerate(sample_instances(tasks, t, n_merge, s)) for op in operators]
    cache: dict[tuple, dict[str, float]] = {}
    result = MergeFailResult(method, tau, n_merge, density, seeds, sizes, tuple(operators))
    for s, t, i, subset, op in tqdm(plan, desc=f"mergefail {method}", disable=not progress):
        if (s, subset, op) not in cache:
            merged = merge_deltas([deltas_by_seed_task[s][task] for task in subset], how=op, density=density)
            cache[s, subset, op] = _evaluate_with(base_model, merged, evaluate, subset)
        scores = cache[s, subset, op]
        single = {task: float(single_scores[s][task]) for task in subset}
        failed = any(scores[task] < tau * single[task] for task in subset)
        result.instances.append(MergeInstance(s, t, i, subset, op, scores, single, failed))
    return result


def _evaluate_with(model: nn.Module, deltas: Deltas, evaluate: Callable[[nn.Module, str], float],
                   tasks: Sequence[str]) -> dict[str, float]:
    with applied_deltas(model, deltas):
        return {task: float(evaluate(model, task)) for task in tasks}


@dataclass(frozen=True)
class FailRate:
    """Fail rate of one (method, operator) at merge size ``t`` over ``n`` instances, with its bootstrap CI."""

    method: str
    operator: str
    t: int
    n: int
    rate: CI


@dataclass(frozen=True)
class FailRateDifference:
    """``rate(method_a) - rate(method_b)`` on the same instances, with its paired-bootstrap CI."""

    method_a: str
    method_b: str
    operator: str
    t: int
    difference: CI


@dataclass
class MergeFailSummary:
    rates: list[FailRate]
    differences: list[FailRateDifference]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(results: Sequence[MergeFailResult], confidence: float = 0.95, n_resamples: int = 9999,
              seed: int = 0) -> MergeFailSummary:
    """Fail rates with percentile-bootstrap CIs, and paired CIs of every difference between methods.

    At each ``t`` one joint bootstrap resamples the instances for all methods and operators together, so rates and
    differences come from the same resamples. All results must hold the same instances.
    """
    if not results:
        raise ValueError("summarize needs at least one MergeFail result")
    names = [r.method for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    first = results[0]
    for r in results[1:]:
        if (r.seeds, r.sizes, r.operators, r.n_merge) != (first.seeds, first.sizes, first.operators, first.n_merge):
            raise ValueError(f"{r.method} and {first.method} were run with different seeds, sizes, operators or n_merge")
    rates, differences = [], []
    for t in first.sizes:
        columns = {}
        for op in first.operators:
            keys = first.instance_keys(op, t)
            if any(r.instance_keys(op, t) != keys for r in results):
                raise ValueError(f"the results hold different instances at t={t} ({op}); they cannot be paired")
            for r in results:
                columns[r.method, op] = r.flags(op, t)
            for a, b in itertools.combinations(results, 2):
                columns[a.method, b.method, op] = a.flags(op, t) - b.flags(op, t)
        cis = joint_bootstrap({repr(k): v for k, v in columns.items()}, confidence, n_resamples, seed + t)
        for key, values in columns.items():
            ci = cis[repr(key)]
            if len(key) == 2:
                rates.append(FailRate(key[0], key[1], t, len(values), ci))
            else:
                differences.append(FailRateDifference(key[0], key[1], key[2], t, ci))
    return MergeFailSummary(rates, differences)


def plot_mergefail(summary: MergeFailSummary, title: str = "MergeFail") -> Figure:
    """Fail rate against merge size ``t``, one line per (method, operator), with CI error bars."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    groups: dict[tuple[str, str], list[FailRate]] = {}
    for rate in summary.rates:
        groups.setdefault((rate.method, rate.operator), []).append(rate)
    styles = {op: style for op, style in zip(MERGE_OPERATORS, ("-", "--"))}
    for (method, op), rows in groups.items():
        rows = sorted(rows, key=lambda r: r.t)
        y = np.array([r.rate.estimate for r in rows])
        err = np.array([[r.rate.estimate - r.rate.low for r in rows], [r.rate.high - r.rate.estimate for r in rows]])
        ax.errorbar([r.t for r in rows], y, yerr=err, capsize=3, marker="o", linestyle=styles.get(op, ":"),
                    label=f"{method} ({op})")
    ax.set_xlabel("merge size t")
    ax.set_ylabel("fail rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
