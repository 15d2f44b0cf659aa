"""Stage 1 of PALoRA: train an SVF expert on a skill and freeze it as a probe.

``spectral-peft svf --skill math`` trains SVF's singular-value scales ``z`` on a skill (an organism skill or any
data spec: ``gsm8k:PATH``, ``arc-easy:PATH``, a prompt/response JSONL, ... see ``spectral_peft.data.spec``) with
objective ``sft`` (cross-entropy on worked solutions), ``reinforce`` (greedy rollouts rewarded by the skill's checker)
or ``reinforce-group`` (sampled rollouts with a group-mean baseline), keeps the step with the best validation accuracy
(step 0, the base, included), and freezes ``z`` as a probe (``spectral_peft.training.svf_expert``).

Writes ``probe/`` (``probe_config.json``, ``probe.safetensors``; pass the run directory to ``spectral-peft inject
--probe``), ``adapter/`` (the SVF adapter), ``metrics.json`` (with the per-example validation outcomes),
``report.md`` and ``figures/`` (the probe over the spectrum and the training curve).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import check_task_spec, load_task
from ..data.chat import check_chat_mode
from ..evaluation.stats import CI, paired_difference_ci, proportion_ci
from ..loading import ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..probe import Probe
from ..report import fmt_ci, plot_training, probe_figures
from ..runs import RunDir
from ..training.svf_expert import SVFSettings, check_objective, train_svf_expert
from ..validation import check_at_least, check_finite_numbers


@dataclass
class Config:
    """Train an SVF expert on a skill and freeze it as a probe.

    Attributes:
        skill: the expert's skill: an organism skill (math, code, science) or task, gsm8k:PATH, mbpp:PATH,
            arc-easy:PATH, arc-challenge:PATH, or a prompt/response JSONL.
        objective: sft (cross-entropy on worked solutions), reinforce (greedy rollouts rewarded by the checker) or
            reinforce-group (several sampled rollouts per prompt, advantage = reward - the prompt's mean reward).
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        train: the expert's sizes and schedule.
        chat_template: auto (use the tokenizer's chat template when it has one) or none.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        seed: seed of the data order and the training.
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    skill: str = "math"
    objective: str = "sft"
    model: str = "organism"
    device: str = "auto"
    dtype: str = "auto"
    train: SVFSettings = field(default_factory=SVFSettings)
    chat_template: str = "auto"
    allow_code_execution: bool = False
    seed: int = 0
    threads: int = 2
    progress: bool = True

    def validate(self) -> None:
        check_finite_numbers(self)
        check_at_least(1, threads=self.threads)
        self.train.validate()
        check_objective(self.objective)
        check_task_spec(self.skill, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"train.n_train": 256, "train.n_val": 32, "train.eval_every": 8}


@dataclass
class Result:
    """The expert's validation outcomes (per example, base and kept expert), training history and probe."""

    skill: str
    objective: str
    model: str
    metrics: dict[str, Any]
    base_val_correct: list[float]
    val_correct: list[float]
    losses: list[float]
    validation: list[dict[str, float]]
    probe: Probe
    singular_values: dict[str, torch.Tensor]

    @property
    def val_accuracy(self) -> CI:
        return proportion_ci(self.val_correct)

    @property
    def base_val_accuracy(self) -> CI:
        return proportion_ci(self.base_val_correct)

    @property
    def gain(self) -> CI:
        return paired_difference_ci(self.val_correct, self.base_val_correct)

    def to_dict(self) -> dict[str, Any]:
        return {"skill": self.skill, "objective": self.objective, "model": self.model, **self.metrics,
                "expert_val_ci": self.val_accuracy.to_dict(), "base_val_ci": self.base_val_accuracy.to_dict(),
                "gain": self.gain.to_dict(), "validation": self.validation, "losses": self.losses,
                "probe_mean_abs_dz": {n: float(self.probe.scores(n).mean()) for n in self.probe.scales},
                "items": {"base_val_correct": self.base_val_correct, "val_correct": self.val_correct}}


def run(cfg: Config, run: RunDir) -> Result:
    seed_everything(cfg.seed, cfg.threads)
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    task = load_task(cfg.skill, tokenizer=source.tokenizer, chat_template=cfg.chat_template,
                     allow_code_execution=cfg.allow_code_execution)
    expert = train_svf_expert(source.fresh(), source.tokenizer, task, cfg.train, cfg.objective, cfg.seed,
                              meta={"skill": cfg.skill, "model": source.name}, progress=cfg.progress,
                              checkpoint_dir=run.file("checkpoint"))
    expert.save(run.path)
    return Result(skill=task.name, objective=cfg.objective, model=source.name,
                  metrics=expert.metrics(source.n_parameters), base_val_correct=expert.base_val_correct,
                  val_correct=expert.val_correct, losses=expert.history.losses,
                  validation=expert.history.validation, probe=expert.probe,
                  singular_values=expert.singular_values)


def render(result: Result, run: RunDir) -> str:
    run.write_json("metrics.json", result.to_dict())
    figures = probe_figures(result.probe, run.path / "figures", svd=result.singular_values)
    figures.append(plot_training(result.losses, result.validation, run.file("figures/svf_training.png"),
                                 title=f"SVF expert on {result.skill} ({result.objective})"))
    m = result.metrics
    lines = [f"# SVF expert: `{result.skill}` ({result.objective})", "",
             f"- model: `{result.model}`",
             f"- validation accuracy (95% Wilson CI, {len(result.val_correct)} examples): base "
             f"{fmt_ci(result.base_val_accuracy)} -> expert {fmt_ci(result.val_accuracy)} (best step "
             f"{m['best_step']} of {m['steps']}; {m['train_seconds']:.0f} s)",
             f"- gain (paired bootstrap, percentage points): {fmt_ci(result.gain, signed=True)}",
             f"- training loss: {m['first_loss']:.3f} (first step) -> {m['last_loss']:.3f} (last step)",
             f"- parameter overhead: {m['n_z']:,} z entries / {m['n_base_parameters']:,} base parameters = "
             f"{100 * m['parameter_overhead']:.4f}%", "",
             "The probe (`probe/`) is what `spectral-peft inject --probe` reads.", "", "## Figures", ""]
    lines += [line for f in figures for line in (f"![{f.stem}](figures/{f.name})", "")]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return (f"SVF expert on {result.skill} ({result.objective}): validation accuracy "
            f"{100 * m['base_val_accuracy']:.1f}% -> {100 * m['expert_val_accuracy']:.1f}%, "
            f"{m['n_z']:,} z entries ({100 * m['parameter_overhead']:.4f}% of the base); probe in {run.out}/probe")
