"""MergeFail (HiP-LoRA, appendix C.3): how often merging single-task adapters breaks one of the tasks.

Single-task adapters are trained with seeds {42, 100, 2024}. For each merge size ``t`` and each seed, ``n_merge = 20``
instances are drawn: a task subset of size ``t``, uniformly without replacement, with that seed's adapter for each
task. The adapters' updates are merged (``sum`` = task arithmetic, or ``ties``; ``merging.merge_deltas``) and written
into the base model. An instance fails if the merged model's score on ANY task ``j`` of the subset is below
``tau * s_j``, where ``s_j`` is the score of task ``j``'s own adapter (same seed) alone, ``tau = 0.9``. (A task whose
adapter scores 0 cannot fail: ``x < tau * 0`` is false.)

Distinct evaluations. Instances are independent draws, so a subset recurs (at ``t = T`` all ``n_merge`` draws are the
one full set): the same (seed, subset, operator) is ONE merged model and one evaluation, however often it is drawn.
Every statistic therefore counts distinct evaluations: ``n`` is the number of draws, ``n_distinct`` the number of
distinct evaluations among them, and the intervals resample distinct evaluations, never duplicates.

Statistics (all from ``evaluation.stats``). For one method, operator and set of merge sizes (one ``t``, or all of
them pooled), the distinct evaluations form a ``[seeds, instances]`` table, each seed's instances in the order of
their first draw. Seeds can hold different numbers of distinct instances; to keep the table rectangular each seed
then keeps its first ``m`` at every ``t``, ``m`` the smallest count over seeds (the first ``m`` distinct subsets of
a uniform draw sequence are a uniform sample of ``m`` subsets, so nothing is biased); ``n_used`` says how many
entered. The fail rate's CI is ``proportion_ci`` (Wilson with one seed, otherwise the hierarchical bootstrap over
seeds, then instances). The sampling depends only on the tasks, ``t``, ``n_merge`` and the seed, so every method
holds the same instances and a method difference is ``paired_difference_ci`` on the identical tables. Retention
(``mean over the subset's tasks of merged score / single score``, tasks whose single score is 0 skipped) is a graded
view of the same instances, with ``bootstrap_ci``.

Fixed where the papers are silent: instance ``i`` of seed ``s`` at size ``t`` comes from
``numpy.random.default_rng([s, t])`` over the sorted task names; the sum merge uses weight 1 per adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ..merging import MERGE_OPERATORS, applied_deltas, merge_deltas
from ..report import error_bars
from .stats import CI, bootstrap_ci, paired_difference_ci, proportion_ci
from ..errors import InputError

MERGEFAIL_SEEDS = (42, 100, 2024)

Deltas = Mapping[str, torch.Tensor]


def sample_instances(tasks: Sequence[str], t: int, n: int, seed: int) -> list[tuple[str, ...]]:
    """``n`` task subsets of size ``t``, each uniform without replacement over ``sorted(tasks)``, returned sorted.

    Deterministic in ``(set(tasks), t, n, seed)``: the generator is ``numpy.random.default_rng([seed, t])``.
    """
    names = sorted(tasks)
    if len(set(names)) != len(names):
        raise InputError(f"task names must be unique, got {list(tasks)}")
    if not 1 <= t <= len(names):
        raise InputError(f"merge size t={t} is out of range for {len(names)} tasks")
    if n < 1:
        raise InputError(f"the number of instances must be >= 1, got {n}")
    rng = np.random.default_rng([seed, t])
    return [tuple(names[i] for i in sorted(rng.choice(len(names), size=t, replace=False))) for _ in range(n)]


@dataclass(frozen=True)
class MergeInstance:
    """One drawn instance: the subset, the merged model's per-task scores, the single-adapter scores, the verdict."""

    seed: int
    t: int
    index: int
    tasks: tuple[str, ...]
    operator: str
    scores: dict[str, float]
    single: dict[str, float]
    failed: bool

    @property
    def evaluation(self) -> tuple:
        """What identifies the merged model: instances with the same (seed, subset, operator) are one evaluation."""
        return self.seed, self.tasks, self.operator

    @property
    def retention(self) -> float:
        """``mean over the subset's tasks of merged / single score`` (tasks with a single score of 0 skipped; 1 if
        all are)."""
        kept = [self.scores[t] / self.single[t] for t in self.tasks if self.single[t] > 0]
        return float(np.mean(kept)) if kept else 1.0


@dataclass
class MergeFailResult:
    """All drawn instances of one method's MergeFail run (duplicates included, in draw order)."""

    method: str
    tau: float
    n_merge: int
    density: float
    seeds: tuple[int, ...]
    sizes: tuple[int, ...]
    operators: tuple[str, ...]
    instances: list[MergeInstance] = field(default_factory=list)

    def flags(self, operator: str, t: int) -> np.ndarray:
        """Fail indicators (0/1) of every drawn instance at ``(operator, t)``, in draw order (seed, index)."""
        rows = [i for i in self.instances if i.operator == operator and i.t == t]
        if not rows:
            raise InputError(f"{self.method}: no instances for operator {operator!r} at t={t}")
        return np.array([float(i.failed) for i in rows])

    def table(self, operator: str, sizes: Sequence[int]) -> tuple[list[list[MergeInstance]], int, int]:
        """``(table, n, n_distinct)``: the ``[seeds, instances]`` table of distinct evaluations at ``sizes`` (module
        docstring: first draws, ``m`` per seed and size), the number of draws and of distinct evaluations."""
        table: list[list[MergeInstance]] = [[] for _ in self.seeds]
        n = n_distinct = 0
        for t in sizes:
            firsts: list[list[MergeInstance]] = []
            for s in self.seeds:
                rows = [i for i in self.instances if i.operator == operator and i.t == t and i.seed == s]
                if not rows:
                    raise InputError(f"{self.method}: no instances for operator {operator!r} at t={t}, seed {s}")
                n += len(rows)
                first: dict[tuple, MergeInstance] = {}
                for i in rows:
                    first.setdefault(i.evaluation, i)
                firsts.append(list(first.values()))
                n_distinct += len(firsts[-1])
            m = min(map(len, firsts))
            for row, kept in zip(table, firsts):
                row.extend(kept[:m])
        return table, n, n_distinct

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
        raise InputError(f"no adapters for seed(s) {missing}")
    tasks = sorted(deltas_by_seed_task[seeds[0]])
    for s in seeds:
        if sorted(deltas_by_seed_task[s]) != tasks:
            raise InputError(f"seed {s} has adapters for {sorted(deltas_by_seed_task[s])}, seed {seeds[0]} for {tasks}")
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
    """Run MergeFail for one method (see the module docstring); each distinct evaluation is merged and scored once.

    ``deltas_by_seed_task[seed][task]``: that adapter's ``{module: dW}`` (``merging.adapter_deltas``).
    ``single_scores[seed][task]``: the adapter's own score on its task; ``None`` evaluates each adapter alone.
    ``evaluate(model, task) -> score`` (higher is better) must not keep or modify the model: merged updates are
    written into ``base_model`` in place and removed bit-exactly afterwards. ``sizes`` defaults to ``2..T``.
    ``density`` is TIES' trim density.
    """
    bad = [op for op in operators if op not in MERGE_OPERATORS]
    if bad:
        raise InputError(f"unknown merge operator(s) {bad}; use {MERGE_OPERATORS}")
    if not 0 < tau <= 1:
        raise InputError(f"tau must be in (0, 1], got {tau}")
    seeds = tuple(seeds)
    tasks = _task_set(deltas_by_seed_task, seeds)
    sizes = tuple(range(2, len(tasks) + 1) if sizes is None else sizes)
    if single_scores is None:
        single_scores = {s: {task: _evaluate_with(base_model, deltas_by_seed_task[s][task], evaluate, [task])[task]
                             for task in tasks} for s in seeds}
    for s in seeds:
        absent = [task for task in tasks if task not in single_scores.get(s, {})]
        if absent:
            raise InputError(f"single-adapter scores missing for seed {s}, task(s) {absent}")
    plan = [(s, t, i, subset, op) for s in seeds for t in sizes
            for i, subset in enumerate(sample_instances(tasks, t, n_merge, s)) for op in operators]
    distinct = list(dict.fromkeys((s, subset, op) for s, _, _, subset, op in plan))
    scores: dict[tuple, dict[str, float]] = {}
    for s, subset, op in tqdm(distinct, desc=f"merged evaluations {method}", disable=not progress):
        merged = merge_deltas([deltas_by_seed_task[s][task] for task in subset], how=op, density=density)
        scores[s, subset, op] = _evaluate_with(base_model, merged, evaluate, subset)
    result = MergeFailResult(method, tau, n_merge, density, seeds, sizes, tuple(operators))
    for s, t, i, subset, op in plan:
        single = {task: float(single_scores[s][task]) for task in subset}
        merged_scores = scores[s, subset, op]
        failed = any(merged_scores[task] < tau * single[task] for task in subset)
        result.instances.append(MergeInstance(s, t, i, subset, op, merged_scores, single, failed))
    return result


def _evaluate_with(model: nn.Module, deltas: Deltas, evaluate: Callable[[nn.Module, str], float],
                   tasks: Sequence[str]) -> dict[str, float]:
    with applied_deltas(model, deltas):
        return {task: float(evaluate(model, task)) for task in tasks}


@dataclass(frozen=True)
class FailRate:
    """Fail rate of one (method, operator) at merge size ``t`` (``None``: all sizes pooled): ``n`` draws holding
    ``n_distinct`` distinct evaluations, of which ``n_used`` entered the ``[seeds, instances]`` table and the CI."""

    method: str
    operator: str
    t: int | None
    n: int
    n_distinct: int
    n_used: int
    rate: CI


@dataclass(frozen=True)
class Difference:
    """``value(method) - value(reference)`` on the identical distinct instances (``t = None``: all sizes pooled),
    with its paired CI."""

    method: str
    reference: str
    operator: str
    t: int | None
    difference: CI


@dataclass(frozen=True)
class Retention:
    """Mean retention (:attr:`MergeInstance.retention`) of one (method, operator) over the distinct instances of all
    sizes, with its bootstrap CI."""

    method: str
    operator: str
    n_used: int
    retention: CI


@dataclass
class MergeFailSummary:
    """Fail rates per size and pooled, their differences from the reference (the first method), and retention."""

    rates: list[FailRate]
    differences: list[Difference]
    retention: list[Retention]
    retention_differences: list[Difference]

    def to_dict(self) -> dict:
        return asdict(self)


def _tables(results: Sequence[MergeFailResult], operator: str, sizes: Sequence[int]):
    """Each result's distinct table at ``sizes``, checked to hold the same instances (so that they can be paired)."""
    tables = [r.table(operator, sizes) for r in results]
    keys = [[[(i.evaluation, i.t) for i in row] for row in table] for table, _, _ in tables]
    if any(k != keys[0] for k in keys[1:]):
        raise InputError(f"the results hold different instances at t={list(sizes)} ({operator}); they cannot be paired")
    return tables


def summarize(results: Sequence[MergeFailResult], confidence: float = 0.95, n_resamples: int = 9999,
              seed: int = 0) -> MergeFailSummary:
    """Fail rates (at each ``t`` and pooled over all ``t``) over distinct evaluations, each method's paired
    difference from the first (the reference), and pooled retention; see the module docstring for the statistics.
    All results must come from the same seeds, sizes, operators and ``n_merge``, i.e. hold the same instances."""
    if not results:
        raise InputError("summarize needs at least one MergeFail result")
    names = [r.method for r in results]
    if len(set(names)) != len(names):
        raise InputError(f"method names must be unique, got {names}")
    ref = results[0]
    for r in results[1:]:
        if (r.seeds, r.sizes, r.operators, r.n_merge) != (ref.seeds, ref.sizes, ref.operators, ref.n_merge):
            raise InputError(f"{r.method} and {ref.method} were run with different seeds, sizes, operators or n_merge")
    out = MergeFailSummary([], [], [], [])
    for op in ref.operators:
        for t in [*ref.sizes, None]:
            tables = _tables(results, op, ref.sizes if t is None else (t,))
            flags = [np.array([[float(i.failed) for i in row] for row in table]) for table, _, _ in tables]
            for r, (_, n, n_distinct), f in zip(results, tables, flags):
                out.rates.append(FailRate(r.method, op, t, n, n_distinct, f.size,
                                          proportion_ci(f, confidence, n_resamples, seed)))
            for r, f in zip(results[1:], flags[1:]):
                out.differences.append(Difference(r.method, ref.method, op, t,
                                                  paired_difference_ci(f, flags[0], confidence, n_resamples, seed)))
            if t is None:
                kept = [np.array([[i.retention for i in row] for row in table]) for table, _, _ in tables]
                out.retention += [Retention(r.method, op, k.size, bootstrap_ci(k, confidence, n_resamples, seed))
                                  for r, k in zip(results, kept)]
                out.retention_differences += [
                    Difference(r.method, ref.method, op, None,
                               paired_difference_ci(k, kept[0], confidence, n_resamples, seed))
                    for r, k in zip(results[1:], kept[1:])]
    return out


def plot_mergefail(summary: MergeFailSummary, title: str = "MergeFail") -> Figure:
    """Fail rate against merge size ``t``, one line per (method, operator), with CI error bars."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    groups: dict[tuple[str, str], list[FailRate]] = {}
    for rate in summary.rates:
        if rate.t is not None:
            groups.setdefault((rate.method, rate.operator), []).append(rate)
    styles = {op: style for op, style in zip(MERGE_OPERATORS, ("-", "--"))}
    for (method, op), rows in groups.items():
        rows = sorted(rows, key=lambda r: r.t)
        y = np.array([r.rate.estimate for r in rows])
        err = error_bars(y, [r.rate.low for r in rows], [r.rate.high for r in rows])
        ax.errorbar([r.t for r in rows], y, yerr=err, capsize=3, marker="o", linestyle=styles.get(op, ":"),
                    label=f"{method} ({op})")
    ax.set_xlabel("merge size t")
    ax.set_ylabel("fail rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
