"""MergeFail (HiP-LoRA appendix C.3): how often merging single-task adapters breaks one of the tasks.

``spectral-peft mergefail --methods lora,hiplora --tasks count,max,reverse@3,sort`` trains, for every method spec
(the first is the reference), seed and task, one single-task adapter from the same base and scores it on the task's
test examples. Then ``evaluation.mergefail`` draws ``n_merge`` task subsets per seed and merge size ``t = 2..T``,
merges the subset's adapters on their updates ``dW`` with each operator (``sum``, ``ties``), and counts an instance
as failed when a task of the subset scores below ``tau`` times its own adapter's score. The same (seed, subset,
operator) drawn twice is one merged model and one evaluation: fail rates are over distinct evaluations (``n`` draws,
``n_distinct`` distinct), with ``proportion_ci`` (Wilson for one seed, else the hierarchical bootstrap over seeds,
then instances) and paired differences from the reference on the identical instances. A task whose adapter scores 0
cannot fail; their number is reported.

Resumable: each adapter is one unit (``units/adapters/...json``, its scores) and is saved under ``adapters/`` (method,
seed, task); ``--resume`` reloads saved adapters instead of retraining them.

Writes ``adapters/``, ``metrics.json`` (every drawn instance with its per-task merged scores and fail flag, and the
single adapters' per-example outcomes), ``report.md``, ``figures/mergefail.png`` and, for HiP-LoRA,
``figures/budget_use.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import check_task_spec, load_task
from ..data.chat import check_chat_mode
from ..errors import InputError
from ..evaluation import skill_accuracy
from ..evaluation.mergefail import (MERGEFAIL_SEEDS, MergeFailResult, MergeFailSummary, mergefail, plot_mergefail,
                                    summarize)
from ..evaluation.stats import CI, proportion_ci
from ..loading import ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..merging import MERGE_OPERATORS, adapter_deltas
from ..methods import ADDITIVE_METHODS, MethodSpec, budget_table, match_budgets, parse_methods
from ..report import fmt_ci, fmt_steps, md_table, plot_budget_use, save_figure
from ..runs import RunDir, safe_name
from ..training.adapter import FinetuneSettings, final_budget_use, train_adapter
from ..training.matched_gain import task_stop
from ..validation import (check_at_least, check_constructed, check_distinct, check_finite_numbers, check_interval,
                          check_methods)


@dataclass
class Config:
    """MergeFail of single-task adapters, for several methods at matched budgets.

    Attributes:
        methods: comma-separated method specs (mergeable methods: lora, dora, oplora, milora, svft, hiplora); the first
            is the reference of the differences.
        tasks: at least 2 distinct task specs (organism tasks such as sort or reverse@3, gsm8k:PATH, a prompt/response
            JSONL, ...), one single-task adapter each.
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        seeds: seeds of the adapters (one adapter per method, seed and task) and of the instance draws.
        r: default LoRA rank (HiP-LoRA's residual rank) for a spec that does not set r.
        k: default HiP-LoRA principal size (OPLoRA's protected size) for a spec that does not set k.
        targets: default target matrices, mlp or all-linear.
        match_budget: give a LoRA-family method without an explicit r the rank matching HiP-LoRA(r, k).
        n_merge: instances drawn per seed and merge size t.
        tau: an instance fails when a task's merged score is below tau times its own adapter's score.
        operators: merge operators, sum (task arithmetic) and/or ties.
        density: TIES' trim density (fraction of each update's entries kept).
        train: training and evaluation sizes of every single-task adapter.
        chat_template: auto (use the tokenizer's chat template when it has one) or none.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    methods: str = "lora,hiplora,hiplora:mode=penalty"
    tasks: tuple[str, ...] = ("count", "max", "reverse@3", "sort")
    model: str = "organism"
    device: str = "auto"
    dtype: str = "auto"
    seeds: tuple[int, ...] = MERGEFAIL_SEEDS
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    match_budget: bool = True
    n_merge: int = 20
    tau: float = 0.9
    operators: tuple[str, ...] = MERGE_OPERATORS
    density: float = 0.2
    train: FinetuneSettings = field(default_factory=FinetuneSettings)
    chat_template: str = "auto"
    allow_code_execution: bool = False
    threads: int = 1
    progress: bool = True

    def defaults(self) -> MethodSpec:
        return MethodSpec(r=self.r, k=self.k, targets=self.targets)

    def validate(self) -> None:
        check_finite_numbers(self)
        check_constructed(self.train)
        check_at_least(1, n_merge=self.n_merge, threads=self.threads)
        check_interval("tau", self.tau, 0, 1)
        check_interval("density", self.density, 0, 1)
        check_distinct("seeds", self.seeds)
        bad = [op for op in self.operators if op not in MERGE_OPERATORS]
        if bad or not self.operators or len(set(self.operators)) != len(self.operators):
            raise InputError(f"unknown or repeated merge operator(s) in {list(self.operators)}; use "
                             f"{', '.join(MERGE_OPERATORS)}")
        check_methods(self.methods, self.defaults(), allowed=ADDITIVE_METHODS)
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise InputError(f"MergeFail needs at least 2 distinct tasks, got {list(self.tasks)}")
        for task in self.tasks:
            check_task_spec(task, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"methods": "lora,hiplora", "tasks": ("count", "max", "reverse@3"), "seeds": (42,), "n_merge": 5,
         "train.n_train": 256, "train.n_eval": 32, "train.epochs": 2}


@dataclass
class Result:
    """What MergeFail measured. ``single_correct[label][seed][task]`` and ``base_correct[task]`` are per-example
    outcomes; ``results`` hold every drawn instance (per-task merged scores, fail flag); ``summary`` the statistics."""

    specs: list[MethodSpec]
    tasks: list[str]
    seeds: list[int]
    n_merge: int
    tau: float
    operators: list[str]
    density: float
    settings: FinetuneSettings
    base_correct: dict[str, list[float]]
    single_correct: dict[str, dict[int, dict[str, list[float]]]]
    budget_use_max: dict[str, dict[int, dict[str, float | None]]]
    budget_logs: dict[str, list[dict[str, float]]]
    stops: dict[str, dict[int, dict[str, dict[str, Any]]]]
    budget_counts: list[dict[str, Any]]
    results: list[MergeFailResult]
    summary: MergeFailSummary

    @property
    def reference(self) -> str:
        return self.specs[0].label

    def single_accuracy(self, label: str, task: str) -> CI:
        """The task's own adapters' accuracy, ``[seeds, examples]`` (hierarchical over seeds when there are several)."""
        return proportion_ci([self.single_correct[label][s][task] for s in self.seeds])

    def zero_adapters(self, label: str) -> int:
        """Adapters scoring 0 on their own task (their task cannot fail a merge)."""
        return sum(not any(flags) for by_task in self.single_correct[label].values() for flags in by_task.values())

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "methods": [s.label for s in self.specs],
                "specs": [s.to_dict() for s in self.specs], "tasks": self.tasks, "seeds": self.seeds,
                "n_merge": self.n_merge, "tau": self.tau, "operators": self.operators, "density": self.density,
                "sizes": {"n_train": self.settings.n_train, "n_eval": self.settings.n_eval,
                          "epochs": self.settings.epochs},
                "budget_counts": self.budget_counts,
                "base_accuracy": {t: proportion_ci(c).to_dict() for t, c in self.base_correct.items()},
                "single_accuracy": {s.label: {t: self.single_accuracy(s.label, t).to_dict() for t in self.tasks}
                                    for s in self.specs},
                "zero_single_adapters": {s.label: self.zero_adapters(s.label) for s in self.specs},
                "budget_use_max": self.budget_use_max, "training": self.stops, "summary": self.summary.to_dict(),
                "items": {"base_correct": self.base_correct, "single_correct": self.single_correct,
                          "instances": {r.method: r.to_dict()["instances"] for r in self.results}}}


def run(cfg: Config, run: RunDir) -> Result:
    seed_everything(cfg.seeds[0], cfg.threads)
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    tok = source.tokenizer
    tasks = {spec: load_task(spec, tokenizer=tok, chat_template=cfg.chat_template,
                             allow_code_execution=cfg.allow_code_execution) for spec in cfg.tasks}
    specs = parse_methods(cfg.methods, cfg.defaults(), allowed=ADDITIVE_METHODS)
    if cfg.match_budget:
        specs = match_budgets(specs, source.fresh(), cfg.defaults())
    s = cfg.train
    pairs = {n: [(e.prompt, e.target) for e in t.examples("train", n=s.n_train)] for n, t in tasks.items()}
    examples = {n: t.examples("test", n=s.n_eval) for n, t in tasks.items()}

    def correct(model, name: str, progress: bool = cfg.progress) -> list[float]:
        res = skill_accuracy(model, tok, tasks[name], examples[name],
                             max_new_tokens=min(s.max_new_tokens, tasks[name].max_new_tokens), progress=progress)
        return [float(c) for c in res.correct]

    def train_one(spec: MethodSpec, seed: int, name: str, where: str) -> dict[str, Any]:
        seed_everything(seed, cfg.threads)
        model, history = train_adapter(source.fresh(), tok, spec, pairs[name], s, seed,
                                       desc=f"train {spec.label} on {name} (seed {seed})", progress=cfg.progress,
                                       **task_stop(tasks[name], tok, s, min(s.max_new_tokens,
                                                                            tasks[name].max_new_tokens)))
        model.save_pretrained(run.file(where))
        use = final_budget_use(model)
        return {"correct": correct(model, name), "budget_use_max": max(use.values()) if use else None,
                "logs": history.logs, "stop": {"steps": history.steps, "reached_stop_at": history.reached_stop_score}}

    def merged_score(model, name: str) -> float:
        return float(np.mean(correct(model, name, progress=False)))

    base = source.fresh()
    base_correct = run.unit("base", lambda: {n: correct(base, n) for n in cfg.tasks})
    single: dict[str, dict[int, dict[str, list[float]]]] = {}
    uses: dict[str, dict[int, dict[str, float | None]]] = {}
    stops: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
    logs: dict[str, list[dict[str, float]]] = {}
    results = []
    for spec in specs:
        deltas: dict[int, dict[str, Any]] = {}
        single[spec.label], uses[spec.label], stops[spec.label] = {}, {}, {}
        for seed in cfg.seeds:
            deltas[seed], single[spec.label][seed], uses[spec.label][seed], stops[spec.label][seed] = {}, {}, {}, {}
            for name in cfg.tasks:
                where = f"adapters/{safe_name(spec.label)}/seed{seed}/{safe_name(name)}"
                unit = run.unit(where, lambda: train_one(spec, seed, name, where))  # noqa: B023 - called at once
                deltas[seed][name] = adapter_deltas(run.path / where, source.fresh())
                single[spec.label][seed][name] = unit["correct"]
                uses[spec.label][seed][name] = unit["budget_use_max"]
                stops[spec.label][seed][name] = unit["stop"]
                logs.setdefault(spec.label, unit["logs"])
        scores = {seed: {n: float(np.mean(c)) for n, c in by_task.items()}
                  for seed, by_task in single[spec.label].items()}
        results.append(mergefail(deltas, scores, merged_score, base, method=spec.label, seeds=cfg.seeds,
                                 operators=cfg.operators, n_merge=cfg.n_merge, tau=cfg.tau, density=cfg.density,
                                 progress=cfg.progress))
    return Result(specs=specs, tasks=list(cfg.tasks), seeds=list(cfg.seeds), n_merge=cfg.n_merge, tau=cfg.tau,
                  operators=list(cfg.operators), density=cfg.density, settings=s, base_correct=base_correct,
                  single_correct=single, budget_use_max=uses, budget_logs=logs, stops=stops,
                  budget_counts=budget_table(specs, source.fresh()), results=results, summary=summarize(results))


def render(result: Result, run: RunDir) -> str:
    run.write_json("metrics.json", result.to_dict())
    figs = [save_figure(plot_mergefail(result.summary, f"MergeFail (tau = {result.tau})"),
                        run.file("figures/mergefail.png"))]
    if any("budget_use_max" in r for logs in result.budget_logs.values() for r in logs):
        figs.append(save_figure(plot_budget_use(result.budget_logs), run.file("figures/budget_use.png")))
    s, ref, sm = result.settings, result.reference, result.summary
    pooled = [r for r in sm.rates if r.t is None]
    lines = [f"# MergeFail (tau = {result.tau}; tasks {', '.join(result.tasks)})", "",
             f"Seeds {result.seeds}; {result.n_merge} instances drawn per seed and merge size "
             f"t = 2..{len(result.tasks)}; operators {', '.join(result.operators)} (TIES density {result.density}). "
             f"Adapters trained on {s.n_train} pairs x {s.epochs} epoch(s), scored on {s.n_eval} test examples per "
             "task. The same (seed, subset, operator) drawn twice is one merged model: n counts draws, distinct "
             "counts evaluations, used those in the [seeds, instances] table (each seed's first distinct draws, as "
             "many per seed), and the intervals resample them (Wilson with one seed, else hierarchical bootstrap "
             "over seeds, then instances).", "",
             md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in result.budget_counts],
                      ["method", "r", "k", "trainable", "vs_reference"]), "",
             "Single-adapter accuracy (%, 95% CI over seeds and examples); adapters at 0 cannot fail:", ""]
    rows = [{"method": sp.label, **{t: fmt_ci(result.single_accuracy(sp.label, t)) for t in result.tasks},
             "at 0": result.zero_adapters(sp.label),
             "steps": fmt_steps([x for by_task in result.stops[sp.label].values() for x in by_task.values()])}
            for sp in result.specs]
    rows.append({"method": "base", **{t: fmt_ci(proportion_ci(c)) for t, c in result.base_correct.items()}})
    lines += [md_table(rows, ["method", *result.tasks, "at 0", "steps"]), "",
              "Fail rate over all t (%):", ""]
    diffs = {(d.method, d.operator): d.difference for d in sm.differences if d.t is None}
    rows = [{"method": r.method, "operator": r.operator, "n": r.n, "distinct": r.n_distinct, "used": r.n_used,
             "fail rate": fmt_ci(r.rate),
             f"- {ref} (pp)": fmt_ci(diffs[r.method, r.operator], signed=True) if r.method != ref else ""}
            for r in pooled]
    lines += [md_table(rows, ["method", "operator", "n", "distinct", "used", "fail rate", f"- {ref} (pp)"]), "",
              "Retention, merged / single-adapter score averaged over the subset's tasks, all t (%):", ""]
    rdiffs = {(d.method, d.operator): d.difference for d in sm.retention_differences}
    rows = [{"method": r.method, "operator": r.operator, "used": r.n_used, "retention": fmt_ci(r.retention),
             f"- {ref} (pp)": fmt_ci(rdiffs[r.method, r.operator], signed=True) if r.method != ref else ""}
            for r in sm.retention]
    lines += [md_table(rows, ["method", "operator", "used", "retention", f"- {ref} (pp)"]), "", "Per merge size:", ""]
    diffs = {(d.method, d.operator, d.t): d.difference for d in sm.differences if d.t is not None}
    rows = [{"method": r.method, "operator": r.operator, "t": r.t, "n": r.n, "distinct": r.n_distinct,
             "used": r.n_used, "fail rate": fmt_ci(r.rate),
             f"- {ref} (pp)": fmt_ci(diffs[r.method, r.operator, r.t], signed=True) if r.method != ref else ""}
            for r in sm.rates if r.t is not None]
    lines += [md_table(rows, ["method", "operator", "t", "n", "distinct", "used", "fail rate", f"- {ref} (pp)"]), ""]
    lines += [f"![{f}](figures/{f})" for f in figs]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return "\n".join(f"{r.method}|{r.operator}: fail rate {fmt_ci(r.rate)}% over {r.n_distinct} distinct evaluations "
                     f"({r.n} draws)" for r in pooled)
