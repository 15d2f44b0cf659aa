"""Continual tuning: train tasks T1..Tn in sequence and evaluate every task after each stage.

``spectral-peft continual --methods lora,hiplora --tasks count,max,reverse@3,sort`` runs, for every method spec (the
first is the reference) and seed, the sequence of stages: each stage merges the previous stage's adapter into the
weights (``merge_and_unload``) and trains a fresh adapter of the same method on the next task, so a spectral method
always protects the top directions of the *current* model (its SVD is recomputed at each stage). (Our reading: the
paper's recap does not say whether the adapter is reset between tasks.) After every stage all tasks are scored on the
same test examples (the smallest test-set size over the tasks, so that example ``e`` of every task is one unit).

Reported per method, from the per-example outcomes ``[seeds, stage, task, example]`` (``evaluation.continual``): the
accuracy matrix ``R``, the final average accuracy (ACC), the backward transfer (BWT) and forgetting. ACC and BWT get
95% CIs from the hierarchical bootstrap over seeds, then examples (``evaluation.stats``; plain bootstrap over
examples with one seed), and each method's difference from the reference is paired on the same seeds and examples.

Resumable: each (method, seed) sequence is one unit (``units/continual/...json``). Writes ``metrics.json`` (with the
per-example outcomes), ``report.md`` and ``figures/accuracy_matrix_<i>.png`` (one per method).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import check_task_spec, load_task
from ..data.chat import check_chat_mode
from ..errors import InputError
from ..evaluation import skill_accuracy
from ..evaluation.continual import backward_transfer, example_transfer, forgetting, plot_accuracy_matrix, run_continual
from ..evaluation.stats import CI, bootstrap_ci, paired_difference_ci, proportion_ci
from ..loading import ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..methods import ADDITIVE_METHODS, MethodSpec, budget_table, match_budgets, parse_methods
from ..report import fmt_ci, fmt_steps, md_table, save_figure
from ..runs import RunDir, safe_name
from ..training.adapter import FinetuneSettings, final_budget_use, train_adapter
from ..training.matched_gain import task_stop
from ..validation import check_at_least, check_constructed, check_distinct, check_finite_numbers, check_methods


@dataclass
class Config:
    """Continual tuning over tasks in sequence, for several methods at matched budgets.

    Attributes:
        methods: comma-separated method specs (lora, dora, oplora, milora, svft, hiplora); the first is the reference
            of the differences.
        tasks: at least 2 distinct task specs, trained in this order (organism tasks such as sort or reverse@3,
            gsm8k:PATH, a prompt/response JSONL, ...).
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        seeds: seeds of the adapters' initialisation and batch order, one task sequence per method and seed.
        r: default LoRA rank (HiP-LoRA's residual rank) for a spec that does not set r.
        k: default HiP-LoRA principal size (OPLoRA's protected size) for a spec that does not set k.
        targets: default target matrices, mlp or all-linear.
        match_budget: give a LoRA-family method without an explicit r the rank matching HiP-LoRA(r, k).
        train: training and evaluation sizes of every stage.
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
    seeds: tuple[int, ...] = (0, 1)
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    match_budget: bool = True
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
        check_at_least(1, threads=self.threads)
        check_distinct("seeds", self.seeds)
        check_methods(self.methods, self.defaults(), allowed=ADDITIVE_METHODS)
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise InputError(f"continual tuning needs at least 2 distinct tasks, got {list(self.tasks)}")
        for task in self.tasks:
            check_task_spec(task, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"methods": "lora,hiplora", "seeds": (0,), "train.n_train": 256, "train.n_eval": 32, "train.epochs": 2}


@dataclass
class Result:
    """What continual tuning measured. ``outcomes[label]`` is ``[seeds, stage, task, example]`` 0/1 correctness;
    ``base_correct[task]`` the base model's on the same examples."""

    specs: list[MethodSpec]
    tasks: list[str]
    seeds: list[int]
    settings: FinetuneSettings
    base_correct: dict[str, list[float]]
    outcomes: dict[str, list[list[list[list[float]]]]]
    budget_use_max: dict[str, list[list[float | None]]]
    stops: dict[str, list[list[dict[str, Any]]]]
    budget_counts: list[dict[str, Any]]

    @property
    def reference(self) -> str:
        return self.specs[0].label

    def R(self, label: str) -> np.ndarray:
        """Accuracy matrix ``[stage, task]``, the mean over seeds and examples."""
        return np.asarray(self.outcomes[label], dtype=np.float64).mean(axis=(0, 3))

    def transfer(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-example ACC and BWT, ``[seeds, examples]`` each (``evaluation.continual.example_transfer``)."""
        return example_transfer(self.outcomes[label])

    def accuracy(self, label: str) -> CI:
        return bootstrap_ci(self.transfer(label)[0])

    def backward_transfer(self, label: str) -> CI:
        return bootstrap_ci(self.transfer(label)[1])

    def vs_reference(self, label: str) -> dict[str, CI]:
        """``label - reference`` for ACC and BWT, paired on the same seeds and examples."""
        (acc, bwt), (acc0, bwt0) = self.transfer(label), self.transfer(self.reference)
        return {"ACC": paired_difference_ci(acc, acc0), "BWT": paired_difference_ci(bwt, bwt0)}

    def to_dict(self) -> dict[str, Any]:
        methods = {}
        for spec in self.specs:
            label, R = spec.label, self.R(spec.label)
            per_seed = np.asarray(self.outcomes[label], dtype=np.float64).mean(axis=3)
            methods[label] = {
                "spec": spec.to_dict(), "R": R.tolist(), "R_per_seed": per_seed.tolist(),
                "final_average_accuracy": self.accuracy(label).to_dict(),
                "backward_transfer": self.backward_transfer(label).to_dict(), "forgetting": forgetting(R),
                "backward_transfer_per_seed": [backward_transfer(r) for r in per_seed],
                "budget_use_max": self.budget_use_max[label], "training": self.stops[label],
                "vs_reference": ({k: v.to_dict() for k, v in self.vs_reference(label).items()}
                                 if label != self.reference else None)}
        return {"reference": self.reference, "tasks": self.tasks, "seeds": self.seeds,
                "sizes": {"n_train": self.settings.n_train, "n_eval": len(self.base_correct[self.tasks[0]]),
                          "epochs": self.settings.epochs},
                "budget_counts": self.budget_counts,
                "base_accuracy": {t: proportion_ci(c).to_dict() for t, c in self.base_correct.items()},
                "methods": methods, "items": {"base_correct": self.base_correct, "outcomes": self.outcomes}}



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
    n_eval = min(map(len, examples.values()))
    examples = {n: e[:n_eval] for n, e in examples.items()}

    def correct(model, name: str) -> list[float]:
        res = skill_accuracy(model, tok, tasks[name], examples[name],
                             max_new_tokens=min(s.max_new_tokens, tasks[name].max_new_tokens), progress=cfg.progress)
        return [float(c) for c in res.correct]

    def sequence(spec: MethodSpec, seed: int) -> dict[str, Any]:
        seed_everything(seed, cfg.threads)
        uses: list[float | None] = []
        stops: list[dict[str, Any]] = []

        def train_stage(model, name: str):
            plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            wrapped, history = train_adapter(plain, tok, spec, pairs[name], s, seed,
                                             desc=f"train {spec.label} on {name} (seed {seed})", progress=cfg.progress,
                                             **task_stop(tasks[name], tok, s,
                                                         min(s.max_new_tokens, tasks[name].max_new_tokens)))
            use = final_budget_use(wrapped)
            uses.append(max(use.values()) if use else None)
            stops.append({"steps": history.steps, "reached_stop_at": history.reached_stop_score})
            return wrapped

        res = run_continual(source.fresh(), list(cfg.tasks), train_stage, correct, progress=cfg.progress,
                            desc=f"continual {spec.label} (seed {seed})")
        return {"outcomes": res.outcomes, "budget_use_max": uses, "stop": stops}

    base = source.fresh()
    base_correct = run.unit("base", lambda: {n: correct(base, n) for n in cfg.tasks})
    outcomes: dict[str, list] = {}
    budget_use: dict[str, list] = {}
    stops: dict[str, list] = {}
    for spec in specs:
        units = [run.unit(f"continual/{safe_name(spec.label)}/seed{seed}", lambda: sequence(spec, seed))  # noqa: B023
                 for seed in cfg.seeds]
        outcomes[spec.label] = [u["outcomes"] for u in units]
        budget_use[spec.label] = [u["budget_use_max"] for u in units]
        stops[spec.label] = [u["stop"] for u in units]
    return Result(specs=specs, tasks=list(cfg.tasks), seeds=list(cfg.seeds), settings=s, base_correct=base_correct,
                  outcomes=outcomes, budget_use_max=budget_use, stops=stops,
                  budget_counts=budget_table(specs, source.fresh()))


def render(result: Result, run: RunDir) -> str:
    run.write_json("metrics.json", result.to_dict())
    figs = [save_figure(plot_accuracy_matrix(result.tasks, result.R(spec.label), title=f"continual: {spec.label}"),
                        run.file(f"figures/accuracy_matrix_{i}.png")) for i, spec in enumerate(result.specs)]
    s, ref = result.settings, result.reference
    n_eval = len(result.base_correct[result.tasks[0]])
    lines = [f"# Continual tuning: {' -> '.join(result.tasks)}", "",
             f"Seeds {result.seeds}; per stage {s.n_train} training pairs x {s.epochs} epoch(s); {n_eval} test "
             "examples per task. Each stage merges the previous adapter and trains a fresh one.", "",
             "Base accuracy: " + ", ".join(f"{t} {fmt_ci(proportion_ci(c))}%" for t, c in result.base_correct.items())
             + ".", "",
             md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in result.budget_counts],
                      ["method", "r", "k", "trainable", "vs_reference"]), "",
             "Final average accuracy (ACC) and backward transfer (BWT), %, with 95% CIs (hierarchical bootstrap over "
             f"seeds, then examples); differences from `{ref}` paired on the same seeds and examples:", ""]
    rows = []
    for spec in result.specs:
        label = spec.label
        diff = result.vs_reference(label) if label != ref else {}
        rows.append({"method": label, "ACC": fmt_ci(result.accuracy(label)),
                     "BWT": fmt_ci(result.backward_transfer(label), signed=True),
                     "forgetting": f"{100 * forgetting(result.R(label)):.1f}",
                     "steps per stage": fmt_steps([x for seed in result.stops[label] for x in seed]),
                     f"ACC - {ref}": fmt_ci(diff["ACC"], signed=True) if diff else "",
                     f"BWT - {ref}": fmt_ci(diff["BWT"], signed=True) if diff else ""})
    lines += [md_table(rows, ["method", "ACC", "BWT", "forgetting", f"ACC - {ref}", f"BWT - {ref}", "steps per stage"]),
              "",
              "Accuracy matrices R, % (row: after stage, column: task):", ""]
    for spec in result.specs:
        R = result.R(spec.label)
        lines += [f"`{spec.label}`:", "",
                  md_table([{"after": t, **{u: f"{100 * x:.1f}" for u, x in zip(result.tasks, row)}}
                            for t, row in zip(result.tasks, R)], ["after", *result.tasks]), ""]
    lines += [f"![{f}](figures/{f})" for f in figs]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return "\n".join(f"{spec.label}: ACC {fmt_ci(result.accuracy(spec.label))}%, "
                     f"BWT {fmt_ci(result.backward_transfer(spec.label), signed=True)} pp" for spec in result.specs)
