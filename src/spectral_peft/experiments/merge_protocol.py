"""MergeFail (HiP-LoRA appendix C.3, methods.md) on organism instruction tasks, for several methods at matched budgets.

For every method (spec), seed in {42, 100, 2024} and task, one single-task adapter is trained from the same base;
its update ``dW`` and its own score (accuracy on the task's test examples) are kept. Then
``evaluation.mergefail.mergefail`` draws ``n_merge`` = 20 task subsets per seed and merge size ``t = 2..T``, merges
with ``sum`` and ``ties`` on ``dW``, and counts an instance as failed when any task of the subset scores below
``tau`` = 0.9 times its single-adapter score. ``summarize`` gives the fail rates with percentile-bootstrap 95% CIs
and the paired CIs of the method differences (the instances are identical across methods). Here we also pool
the instances over all ``t`` for a headline rate per (method, operator), with a joint (paired) bootstrap.

A task on which an adapter scores 0 cannot fail (``0 < 0.9 * 0`` is false); the number of such adapters is
reported, since they make MergeFail look better than it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.mergefail import MERGEFAIL_SEEDS, mergefail, plot_mergefail, summarize
from ..evaluation.stats import joint_bootstrap
from ..merging import MERGE_OPERATORS, adapter_deltas
from .common import ProtocolRun, ModelSource, atomic_run_dir, seed_everything, write_json
from .finetune import (PROTOCOL_METHODS, AdapterSpec, TrainSettings, budget_table, eval_examples, final_budget_use,
                       fmt_ci, match_budgets, md_table, parse_specs, plot_budget_use, resolve_task, save_figure,
                       score_flags, task_pairs, train_adapter)

DEFAULT_MERGE_METHODS = "lora,hiplora,hiplora:mode=penalty"
DEFAULT_MERGE_TASKS = ("count", "max", "reverse@3", "sort")


@dataclass
class MergeFailConfig:
    """``spectral-peft mergefail``: ``methods`` (specs), ``tasks`` (T >= 2), ``seeds``, ``n_merge`` instances per seed
    and size, ``tau``, ``operators``, TIES ``density``. ``quick``: 3 tasks, LoRA and HiP-LoRA, seed 42 only, 5 instances, small data."""

    methods: str = DEFAULT_MERGE_METHODS
    tasks: tuple[str, ...] = DEFAULT_MERGE_TASKS
    model: str | None = None
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    seeds: tuple[int, ...] = MERGEFAIL_SEEDS
    n_merge: int = 20
    tau: float = 0.9
    operators: tuple[str, ...] = MERGE_OPERATORS
    density: float = 0.2
    train: TrainSettings = field(default_factory=TrainSettings)
    match_budget: bool = True
    threads: int | None = 1
    quick: bool = False
    progress: bool = True

    def resolved(self) -> "MergeFailConfig":
        if not self.quick:
            return self
        tasks = self.tasks if self.tasks != DEFAULT_MERGE_TASKS else ("count", "max", "reverse@3")
        methods = self.methods if self.methods != DEFAULT_MERGE_METHODS else "lora,hiplora"
        return replace(self, tasks=tasks, methods=methods, seeds=self.seeds[:1], n_merge=min(self.n_merge, 5),
                       train=self.train.quick())


def run_mergefail(cfg: MergeFailConfig, out: str | Path) -> ProtocolRun:
    cfg = cfg.resolved()
    if len(cfg.tasks) < 2 or len(set(cfg.tasks)) != len(cfg.tasks):
        raise ValueError(f"MergeFail needs at least 2 distinct tasks, got {list(cfg.tasks)}")
    bad = [op for op in cfg.operators if op not in MERGE_OPERATORS]
    if bad:
        raise ValueError(f"unknown merge operator(s) {bad}; use {', '.join(MERGE_OPERATORS)}")
    seed_everything(cfg.seeds[0], cfg.threads)
    source = ModelSource(cfg.model)
    tok = source.tokenizer
    specs = parse_specs(cfg.methods, AdapterSpec(r=cfg.r, k=cfg.k, targets=cfg.targets), allowed=PROTOCOL_METHODS)
    if cfg.match_budget:
        specs = match_budgets(specs, source.fresh())
    tasks = {name: resolve_task(name) for name in cfg.tasks}
    data = {n: (task_pairs(t, cfg.train.n_train), eval_examples(t, cfg.train.n_eval)) for n, t in tasks.items()}
    base = source.fresh()

    def evaluate(model, name: str) -> float:
        return float(score_flags(model, tok, tasks[name], data[name][1], cfg.train.max_new_tokens).mean())

    base_scores = {n: evaluate(base, n) for n in tasks}
    results, singles, budget_logs, uses = [], {}, {}, {}
    for spec in specs:
        deltas: dict[int, dict[str, Any]] = {}
        scores: dict[int, dict[str, float]] = {}
        for seed in cfg.seeds:
            deltas[seed], scores[seed] = {}, {}
            for name in tasks:
                seed_everything(seed, cfg.threads)
                model, history = train_adapter(source.fresh(), tok, spec, data[name][0], cfg.train, seed,
                                               desc=f"mergefail {spec.label} {name} s{seed}", progress=cfg.progress)
                deltas[seed][name] = adapter_deltas(model)
                scores[seed][name] = evaluate(model, name)
                use = final_budget_use(model)
                if use:
                    uses[f"{spec.label}|{name}|{seed}"] = max(use.values())
                if seed == cfg.seeds[0] and name == cfg.tasks[0]:
                    budget_logs[spec.label] = history.logs
                del model
        singles[spec.label] = scores
        results.append(mergefail(deltas, scores, evaluate, base, method=spec.label, seeds=cfg.seeds,
                                 operators=cfg.operators, n_merge=cfg.n_merge, tau=cfg.tau, density=cfg.density,
                                 progress=cfg.progress))
    summary = summarize(results, n_resamples=4999)
    pooled = pooled_rates(results, cfg.operators)
    retention = merged_retention(results, cfg.operators)
    metrics = {
        "protocol": "mergefail", "tasks": list(cfg.tasks), "seeds": list(cfg.seeds), "n_merge": cfg.n_merge,
        "tau": cfg.tau, "operators": list(cfg.operators), "density": cfg.density, "quick": cfg.quick,
        "sizes": {"n_train": cfg.train.n_train, "n_eval": cfg.train.n_eval, "epochs": cfg.train.epochs},
        "budget_counts": budget_table(specs, source.fresh()),
        "base_scores": base_scores, "single_scores": {m: {str(s): v for s, v in sc.items()} for m, sc in singles.items()},
        "zero_single_adapters": {m: sum(v == 0 for sc in s.values() for v in sc.values()) for m, s in singles.items()},
        "mean_single_score": {m: float(np.mean([v for sc in s.values() for v in sc.values()])) for m, s in singles.items()},
        "budget_use_max": uses,
        "pooled": pooled, "retention": retention, "summary": summary.to_dict(), "results": [r.to_dict() for r in results],
    }
    with atomic_run_dir(out) as tmp:
        write_json(tmp / "config.json", asdict(cfg))
        write_json(tmp / "metrics.json", metrics)
        figs = [save_figure(plot_mergefail(summary, f"MergeFail (tau={cfg.tau})"), tmp / "figures" / "mergefail.png")]
        if budget_logs and any("budget_use_max" in r for v in budget_logs.values() for r in v):
            figs.append(save_figure(plot_budget_use(budget_logs), tmp / "figures" / "budget_use.png"))
        (tmp / "report.md").write_text(mergefail_report(metrics, figs))
    return ProtocolRun(metrics)


def pooled_rates(results, operators) -> dict[str, Any]:
    """Fail rate over all merge sizes per (method, operator), and paired differences from the first method."""
    cols = {}
    for op in operators:
        for r in results:
            cols[f"{r.method}|{op}"] = np.concatenate([r.flags(op, t) for t in r.sizes])
        for r in results[1:]:
            cols[f"{r.method}-{results[0].method}|{op}"] = cols[f"{r.method}|{op}"] - cols[f"{results[0].method}|{op}"]
    cis = joint_bootstrap(cols, n_resamples=4999)
    return {k: {**v.to_dict(), "n": int(len(cols[k]))} for k, v in cis.items()}


def merged_retention(results, operators) -> dict[str, Any]:
    """Mean over instances of ``mean_{task in subset} merged score / single score`` per (method, operator), pooled
    over all t, with a joint bootstrap CI (paired across methods). A graded view of MergeFail: 1 = nothing lost.
    Tasks whose single score is 0 are skipped."""
    cols = {}
    for op in operators:
        for r in results:
            rows = sorted((i for i in r.instances if i.operator == op), key=lambda i: i.key)
            cols[f"{r.method}|{op}"] = np.array([np.mean([i.scores[t] / i.single[t] for t in i.tasks if i.single[t] > 0]
                                                         or [1.0]) for i in rows])
        for r in results[1:]:
            cols[f"{r.method}-{results[0].method}|{op}"] = cols[f"{r.method}|{op}"] - cols[f"{results[0].method}|{op}"]
    return {k: {**v.to_dict(), "n": int(len(cols[k]))} for k, v in joint_bootstrap(cols, n_resamples=4999).items()}


def mergefail_report(m: dict[str, Any], figs: list[str]) -> str:
    s = m["sizes"]
    lines = [f"# MergeFail (tau = {m['tau']}, {len(m['tasks'])} tasks: {', '.join(m['tasks'])})", "",
             f"Seeds {m['seeds']}, {m['n_merge']} instances per seed and merge size t = 2..{len(m['tasks'])}, "
             f"operators {', '.join(m['operators'])} (TIES density {m['density']}); adapters trained on "
             f"{s['n_train']} pairs x {s['epochs']} epoch(s), scored on {s['n_eval']} test examples per task"
             + (" (quick mode)." if m["quick"] else "."), "",
             "Trainable parameters:", "",
             md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in m["budget_counts"]],
                      ["method", "r", "k", "trainable", "vs_reference"]), "",
             "Single-adapter scores (mean over tasks and seeds) and adapters scoring 0 (they cannot fail): "
             + "; ".join(f"`{k}` {100 * v:.1f}% ({m['zero_single_adapters'][k]} at 0)"
                         for k, v in m["mean_single_score"].items())
             + ". Base: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["base_scores"].items()) + ".", "",
             "Fail rate pooled over all t (95% bootstrap CI; differences paired on identical instances):", ""]
    rows = [{"method / difference": k.split("|")[0], "operator": k.split("|")[1], "n": v["n"], "fail rate (%)": fmt_ci(v)}
            for k, v in m["pooled"].items()]
    lines.append(md_table(rows, ["method / difference", "operator", "n", "fail rate (%)"]))
    if "retention" in m:
        lines += ["", "Merged score / single-adapter score, mean over the subset's tasks and the instances (all t; 95% "
                  "bootstrap CI, differences paired):", ""]
        rows = [{"method / difference": k.split("|")[0], "operator": k.split("|")[1], "n": v["n"],
                 "retention (%)": fmt_ci(v)} for k, v in m["retention"].items()]
        lines.append(md_table(rows, ["method / difference", "operator", "n", "retention (%)"]))
    lines += ["", "Per merge size:", ""]
    rows = [{"method": r["method"], "operator": r["operator"], "t": r["t"], "n": r["n"], "fail rate (%)": fmt_ci(r["rate"])}
            for r in m["summary"]["rates"]]
    lines.append(md_table(rows, ["method", "operator", "t", "n", "fail rate (%)"]))
    rows = [{"a - b": f"{d['method_a']} - {d['method_b']}", "operator": d["operator"], "t": d["t"],
             "difference (pp)": fmt_ci(d["difference"], signed=True)} for d in m["summary"]["differences"]]
    if rows:
        lines += ["", md_table(rows, ["a - b", "operator", "t", "difference (pp)"])]
    lines += [""] + [f"![{f}](figures/{f})" for f in figs]
    return "\n".join(lines) + "\n"
