"""Fine-tune one adapter on one task and score it against the base model.

``spectral-peft finetune --method hiplora --task sort`` trains the adapter a method spec names (``hiplora``,
``hiplora:mode=penalty``, ``lora:r=2``, ... see ``spectral_peft.methods``) on a task (an organism task,
``name@difficulty``, ``gsm8k:PATH``, a prompt/response JSONL, ... see ``spectral_peft.data.spec``) and scores
greedy answers on the task's test examples. With ``match_budget``, a LoRA-family method without an explicit ``r``
gets the rank whose trainable-parameter count matches HiP-LoRA(r, k)'s.

Writes ``adapter/`` (reload it with ``spectral_peft.load_adapter``), ``metrics.json`` (with per-example outcomes),
``report.md``, ``figures/loss.png`` and, for HiP-LoRA, ``figures/budget_use.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import check_task_spec, load_task
from ..data.chat import check_chat_mode
from ..evaluation import skill_accuracy
from ..evaluation.stats import CI, paired_difference_ci, proportion_ci
from ..loading import ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..methods import MethodSpec, budget_table, count_trainable, hiplora_reference, match_budgets, parse_method
from ..report import fmt_ci, md_table, plot_budget_use, plot_loss, save_figure
from ..runs import RunDir
from ..training.adapter import FinetuneSettings, final_budget_use, train_adapter
from ..training.matched_gain import task_stop
from ..validation import check_at_least, check_constructed, check_finite_numbers, check_method


@dataclass
class Config:
    """Fine-tune one method on one task.

    Attributes:
        method: method spec, e.g. hiplora, hiplora:mode=penalty, lora:r=2, oplora.
        task: organism task (sort, max@3, math, ...), gsm8k:PATH, mbpp:PATH, arc-easy:PATH, arc-challenge:PATH, or a
            prompt/response JSONL (PATH.jsonl?checker=exact|numeric|regex).
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        r: default LoRA rank (HiP-LoRA's residual rank) for a spec that does not set r.
        k: default HiP-LoRA principal size (OPLoRA's protected size) for a spec that does not set k.
        targets: default target matrices, mlp or all-linear.
        match_budget: give a LoRA-family method without an explicit r the rank matching HiP-LoRA(r, k).
        train: training and evaluation sizes.
        chat_template: auto (use the tokenizer's chat template when it has one) or none.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        seed: seed of the adapter's initialisation and the batch order.
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    method: str = "hiplora"
    task: str = "sort"
    model: str = "organism"
    device: str = "auto"
    dtype: str = "auto"
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    match_budget: bool = True
    train: FinetuneSettings = field(default_factory=FinetuneSettings)
    chat_template: str = "auto"
    allow_code_execution: bool = False
    seed: int = 0
    threads: int = 1
    progress: bool = True

    def defaults(self) -> MethodSpec:
        return MethodSpec(r=self.r, k=self.k, targets=self.targets)

    def validate(self) -> None:
        check_finite_numbers(self)
        check_constructed(self.train)
        check_at_least(1, threads=self.threads)
        check_method(self.method, self.defaults())
        check_task_spec(self.task, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"train.n_train": 256, "train.n_eval": 32, "train.epochs": 2}


@dataclass
class Result:
    """What one fine-tune measured; ``base_correct``/``correct`` are the per-example outcomes."""

    spec: MethodSpec
    task: str
    base_correct: list[float]
    correct: list[float]
    trainable_parameters: int
    budget_counts: list[dict[str, Any]]
    losses: list[float]
    logs: list[dict[str, float]]
    train_seconds: float
    budget_use: dict[str, float] | None
    settings: FinetuneSettings

    @property
    def accuracy(self) -> CI:
        return proportion_ci(self.correct)

    @property
    def base_accuracy(self) -> CI:
        return proportion_ci(self.base_correct)

    @property
    def gain(self) -> CI:
        return paired_difference_ci(self.correct, self.base_correct)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.spec.label, "spec": self.spec.to_dict(), "task": self.task,
                "accuracy": self.accuracy.to_dict(), "base_accuracy": self.base_accuracy.to_dict(),
                "gain": self.gain.to_dict(), "trainable_parameters": self.trainable_parameters,
                "budget_counts": self.budget_counts, "train_seconds": self.train_seconds,
                "steps": len(self.losses), "first_loss": self.losses[0], "last_loss": self.losses[-1],
                "budget_use": self.budget_use,
                "budget_use_max": max(self.budget_use.values()) if self.budget_use else None,
                "items": {"base_correct": self.base_correct, "correct": self.correct}}


def run(cfg: Config, run: RunDir) -> Result:
    seed_everything(cfg.seed, cfg.threads)
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    tok = source.tokenizer
    task = load_task(cfg.task, tokenizer=tok, chat_template=cfg.chat_template,
                     allow_code_execution=cfg.allow_code_execution)
    spec = parse_method(cfg.method, cfg.defaults())
    reference = hiplora_reference([spec], cfg.defaults())
    base = source.fresh()  # the one model: counted, scored, then trained (scoring leaves it unchanged)
    if cfg.match_budget:
        spec = match_budgets([spec], base, cfg.defaults())[0]
    budget_counts = budget_table([reference, spec] if spec.method != "hiplora" else [spec], base)
    s = cfg.train
    pairs = [(e.prompt, e.target) for e in task.examples("train", n=s.n_train)]
    examples = task.examples("test", n=s.n_eval)
    budget = min(s.max_new_tokens, task.max_new_tokens)

    def score(model) -> list[float]:
        res = skill_accuracy(model, tok, task, examples, max_new_tokens=budget, progress=cfg.progress)
        return [float(c) for c in res.correct]

    base_correct = score(base)
    model, history = train_adapter(base, tok, spec, pairs, s, cfg.seed, desc=f"finetune {spec.label}",
                                   progress=cfg.progress, checkpoint_dir=run.file("checkpoint"),
                                   **task_stop(task, tok, s, budget))
    model.save_pretrained(run.file("adapter"))
    return Result(spec=spec, task=task.name, base_correct=base_correct, correct=score(model),
                  trainable_parameters=count_trainable(model),
                  budget_counts=budget_counts,
                  losses=history.losses, logs=history.logs, train_seconds=history.seconds,
                  budget_use=final_budget_use(model), settings=s)


def render(result: Result, run: RunDir) -> str:
    m = result.to_dict()
    m["budget_use_trace"] = [{k: r[k] for k in ("step", "budget_use_max", "budget_use_mean")}
                             for r in result.logs if "budget_use_max" in r]
    run.write_json("metrics.json", m)
    figs = [save_figure(plot_loss({result.spec.label: result.losses}, f"{result.spec.label} on {result.task}"),
                        run.file("figures/loss.png"))]
    if result.budget_use:
        figs.append(save_figure(plot_budget_use({result.spec.label: result.logs}), run.file("figures/budget_use.png")))
    s = result.settings
    lines = [f"# Fine-tune `{result.spec.label}` on `{result.task}`", "",
             f"{s.n_train} training pairs requested, {s.epochs} epoch(s) at lr {result.spec.lr or s.lr} "
             f"({m['steps']} steps, {result.train_seconds:.0f} s); {len(result.correct)} test examples.", "",
             f"- accuracy (95% Wilson CI): base {fmt_ci(result.base_accuracy)} -> {fmt_ci(result.accuracy)}",
             f"- gain (paired bootstrap, percentage points): {fmt_ci(result.gain, signed=True)}",
             f"- trainable parameters: {result.trainable_parameters:,}"]
    if result.budget_use:
        lines.append(f"- final budget use R(phi)/eps: max over layers {m['budget_use_max']:.3f}")
    lines += ["", "Matched budgets:", "",
              md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in result.budget_counts],
                       ["method", "r", "k", "trainable", "vs_reference"]), ""]
    lines += [f"![{f}](figures/{f})" for f in figs]
    run.write_text("report.md", "\n".join(lines) + "\n")
    use = f", budget use {m['budget_use_max']:.3f}" if result.budget_use else ""
    return (f"{result.spec.label} on {result.task}: accuracy {100 * np.mean(result.base_correct):.1f}% -> "
            f"{100 * np.mean(result.correct):.1f}%, {result.trainable_parameters:,} trainable{use}")
