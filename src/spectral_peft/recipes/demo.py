"""The main job: an SVF expert on a skill, then LoRA / OPLoRA / PALoRA / HiP-LoRA injection of Unknown facts; recall
and retention, table, report and figures.

``spectral-peft demo`` trains an SVF expert on ``skill`` (``spectral_peft.training.svf_expert``), categorises facts
on it, evaluates base and expert, then injects the Unknown facts with every method spec in ``methods``, each from the
same expert, and evaluates each on the same items (``spectral_peft.evaluation.injection``): intervals for every metric
(Wilson for recall and accuracies, bootstrap over items for ratios) and paired differences to ``lora``. Deterministic
for a seed and a thread count; the defaults take about 6 minutes on 2 CPU cores on the organism.

Writes ``svf/`` (``probe/``, ``adapter/``), ``adapters/<method>/`` (reloadable methods), ``facts.json``,
``metrics.json`` (per-item outcomes of every model under ``items``), ``report.md`` and ``figures/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import check_task_spec, load_task
from ..data.chat import check_chat_mode
from ..evaluation.injection import (EvalSettings, InjectionOutcome, ORGANISM_SKILLS, evaluate_injection, make_suite,
                                    retention, summarise, summary_table, tradeoff_points)
from ..evaluation.knowledge_split import KnowledgeSplit, SplitSettings, check_facts_spec, find_split, load_facts
from ..training.injection import InjectSettings, train_injection
from ..loading import ORGANISM, ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..methods import MethodSpec, count_trainable, parse_methods
from ..adapters.svf_fold import fold_expert
from ..probe import Probe
from ..report import plot_loss, plot_skill_bars, plot_tradeoff, plot_training, probe_figures, probe_spread, save_figure
from ..runs import RunDir, safe_name
from ..training.svf_expert import SVFSettings, train_svf_expert
from ..validation import check_at_least, check_distinct, check_finite_numbers, check_methods

EXPERT = "svf-expert"
NOT_RELOADABLE = ("pissa", "corda")


@dataclass
class Config:
    """The main job: SVF expert, then injection with several methods.

    Attributes:
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        skill: the SVF expert's skill (a data spec: an organism skill, gsm8k:PATH, ...).
        retain_skills: the skills whose retention is measured (data specs).
        methods: comma-separated method specs, each injected from the same expert.
        facts: organism or a QA JSONL file (question, answers/aliases, paraphrases rows).
        r: default LoRA rank for a spec that does not set r.
        targets: default target matrices (mlp or all-linear) for a spec that does not set them.
        svf: the expert's sizes and schedule.
        n_facts: Unknown facts to inject.
        split: how candidate facts are categorised and split.
        train: the injection schedule.
        eval: evaluation sizes.
        chat_template: auto (use the tokenizer's chat template for skill prompts when it has one) or none.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        seed: seed of everything (the run is deterministic for a seed and a thread count).
        threads: torch CPU threads.
        progress: show progress bars.
    """

    model: str = ORGANISM
    device: str = "auto"
    dtype: str = "auto"
    skill: str = "math"
    retain_skills: tuple[str, ...] = ORGANISM_SKILLS
    methods: str = "lora,oplora,palora,hiplora"
    facts: str = "organism"
    r: int = 1
    targets: str = "all-linear"
    svf: SVFSettings = field(default_factory=SVFSettings)
    n_facts: int = 16
    split: SplitSettings = field(default_factory=SplitSettings)
    train: InjectSettings = field(default_factory=InjectSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    chat_template: str = "auto"
    allow_code_execution: bool = False
    seed: int = 0
    threads: int = 2
    progress: bool = True

    def defaults(self) -> MethodSpec:
        return MethodSpec(r=self.r, targets=self.targets)

    def validate(self) -> None:
        check_finite_numbers(self)
        check_at_least(1, n_facts=self.n_facts, threads=self.threads)
        for part in (self.svf, self.split, self.train, self.eval):
            part.validate()
        check_methods(self.methods, self.defaults())
        check_distinct("retain_skills", self.retain_skills)
        for spec in (self.skill, *self.retain_skills):
            check_task_spec(spec, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        check_facts_spec(self.facts)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"svf.n_train": 256, "svf.n_val": 32, "svf.eval_every": 8, "n_facts": 16, "train.epochs": 10,
         "split.n_known": 40, "split.n_known_eval": 32, "split.n_windows": 4, "split.n_samples": 2,
         "eval.n_skill": 24, "eval.n_ppl": 10}



@dataclass
class Result:
    """The expert's record, the split, every model's per-item outcomes and every method's training record."""

    model: str
    skill: str
    seed: int
    specs: list[MethodSpec]
    svf: dict[str, Any]
    svf_losses: list[float]
    svf_validation: list[dict[str, float]]
    probe: Probe
    singular_values: dict[str, torch.Tensor]
    split: KnowledgeSplit
    outcomes: dict[str, InjectionOutcome]
    training: dict[str, dict[str, Any]]
    seconds: float
    config: Config

    @property
    def baseline(self) -> str | None:
        return "lora" if "lora" in self.outcomes else None

    def summary(self) -> dict[str, dict[str, Any]]:
        return summarise([self.outcomes], EXPERT, baseline=self.baseline)

    def to_dict(self) -> dict[str, Any]:
        expert = self.outcomes[EXPERT]
        return {"model": self.model, "skill": self.skill, "seed": self.seed, "methods": [s.label for s in self.specs],
                "specs": [s.to_dict() for s in self.specs], "svf": self.svf,
                "probe_spread": probe_spread(self.probe, rho=self.specs[0].palora_fraction),
                "facts": {"source": self.config.facts, "n_inject": len(self.split.inject),
                          "n_mix": len(self.split.mix), "n_retain": len(self.split.retain),
                          "categories": self.split.counts},
                "models": {n: {**o.aggregates(), **retention(o, expert), **self.training.get(n, {})}
                           for n, o in self.outcomes.items()},
                "baseline": self.baseline, "summary": self.summary(), "seconds": self.seconds,
                "items": {n: o.to_dict() for n, o in self.outcomes.items()}}


def run(cfg: Config, run: RunDir) -> Result:
    t0 = time.perf_counter()
    seed_everything(cfg.seed, cfg.threads)
    specs = parse_methods(cfg.methods, cfg.defaults())
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    tok = source.tokenizer
    task = load_task(cfg.skill, tokenizer=tok, chat_template=cfg.chat_template,
                     allow_code_execution=cfg.allow_code_execution)
    trained = train_svf_expert(source.fresh(), tok, task, cfg.svf, "sft", cfg.seed,
                               meta={"skill": cfg.skill, "model": source.name}, progress=cfg.progress)
    trained.save(run.path / "svf")
    probe = trained.probe
    expert = fold_expert(source.fresh(), probe)
    split = find_split(expert, tok, load_facts(cfg.facts), cfg.n_facts, cfg.split, cfg.seed, cfg.progress)
    run.write_json("facts.json", split.to_dict())
    suite = make_suite(split, cfg.retain_skills, tok, cfg.eval, cfg.chat_template, cfg.allow_code_execution)
    outcomes = {"base": evaluate_injection(source.fresh(), tok, suite, cfg.progress),
                EXPERT: evaluate_injection(expert, tok, suite, cfg.progress)}
    training: dict[str, dict[str, Any]] = {"base": {"trainable_parameters": 0},
                                           EXPERT: {"trainable_parameters": probe.num_parameters()}}
    for spec in specs:
        seed_everything(cfg.seed, cfg.threads)
        model, history = train_injection(source.fresh(), tok, spec, suite, cfg.train, cfg.seed, probe, cfg.progress)
        if spec.method not in NOT_RELOADABLE:
            model.save_pretrained(run.file(f"adapters/{safe_name(spec.label)}"))
        outcomes[spec.label] = evaluate_injection(model, tok, suite, cfg.progress)
        training[spec.label] = {"trainable_parameters": count_trainable(model), "steps": history.steps,
                                "train_seconds": history.seconds, "losses": history.losses,
                                "recall_checks": history.validation,
                                "reached_recall_target": history.reached_stop_score}
    return Result(model=source.name, skill=task.name, seed=cfg.seed, specs=specs,
                  svf=trained.metrics(source.n_parameters), svf_losses=trained.history.losses,
                  svf_validation=trained.history.validation, probe=probe, singular_values=trained.singular_values,
                  split=split, outcomes=outcomes, training=training, seconds=time.perf_counter() - t0, config=cfg)


def _stopping(train: InjectSettings, models: dict[str, Any], methods: list[str]) -> str:
    """How training ended: at the recall target (matched recall) or, for the methods named, at the epoch cap."""
    if not train.recall_target:
        return f"{train.epochs} epochs."
    missed = [f"{n} ({100 * models[n]['recall_checks'][-1]['score']:.0f}%)" for n in methods
              if models[n].get("reached_recall_target") is False]
    return (f"each stopped at the first check (every {train.check_every} steps) with recall of the injected facts >= "
            f"{100 * train.recall_target:.0f}%, at most {train.epochs} epochs."
            + (f" Did not reach it within the cap, so not at matched recall: {', '.join(missed)}." if missed else ""))


def render(result: Result, run: RunDir) -> str:
    m = result.to_dict()
    run.write_json("metrics.json", m)
    figs = run.path / "figures"
    names = [p.name for p in probe_figures(result.probe, figs, svd=result.singular_values)]
    names.append(plot_training(result.svf_losses, result.svf_validation, figs / "svf_training.png",
                               title=f"SVF expert on {result.skill}").name)
    n_inject = m["facts"]["n_inject"]
    names.append(plot_tradeoff(tradeoff_points(m["summary"]), figs / "tradeoff.png",
                               title=f"{n_inject} Unknown facts into the {result.skill} expert (seed {result.seed}), "
                                     "95% CIs").name)
    names.append(plot_skill_bars([{"method": n, "skills": v["skills"]} for n, v in m["models"].items()],
                                 figs / "skills.png").name)
    names.append(save_figure(plot_loss({s.label: result.training[s.label]["losses"] for s in result.specs},
                                       "injection training loss"), figs / "injection_loss.png"))
    cfg, svf, spread = result.config, m["svf"], m["probe_spread"]
    trainable = {n: v.get("trainable_parameters") for n, v in m["models"].items()}
    table = summary_table(m["summary"], trainable=trainable)
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    ret = {n: v["mean_skill_retention"] for n, v in m["models"].items() if n not in ("base", EXPERT)}
    lines = [f"# spectral-peft demo: PALoRA on `{result.model}` (seed {result.seed})", "", "## What ran", "",
             f"1. SVF expert on `{result.skill}` (sft, {svf['steps']} steps): validation accuracy "
             f"{pct(svf['base_val_accuracy'])}% (base) -> {pct(svf['expert_val_accuracy'])}% (expert, best step "
             f"{svf['best_step']}). Probe overhead: {svf['n_z']:,} z entries / {svf['n_base_parameters']:,} base "
             f"parameters = {100 * svf['parameter_overhead']:.4f}%.",
             f"2. Categorised facts (`{cfg.facts}`) on the expert: {m['facts']['categories']}.",
             f"3. Injected {n_inject} Unknown facts ({m['facts']['n_mix']} HighlyKnown mixed in) with "
             f"{', '.join(m['methods'])}: default rank {cfg.r}, targets `{cfg.targets}`, lr {cfg.train.lr}, batch "
             f"{cfg.train.batch_size}, {_stopping(cfg.train, m['models'], m['methods'])} Every method starts from the "
             "same expert.",
             f"4. Evaluated on {cfg.eval.n_skill} test problems per skill ({', '.join(cfg.retain_skills)}), "
             f"{m['facts']['n_retain']} HighlyKnown facts held out, and {cfg.eval.n_ppl} held-out documents.", "",
             "## Results", "",
             "Estimates with 95% intervals, in % (Wilson for recall and accuracies; bootstrap over items for "
             "paraphrase recall and the retention ratios, whose denominator, the expert's score, is held fixed). Skill "
             "retention = mean over skills of score / the SVF expert's score; HighlyKnown retention = recall of "
             "held-out HighlyKnown facts / the expert's; NLL increase in nats per token over the expert.", "", table]
    if result.baseline:
        lines += [f"Paired differences to `{result.baseline}` (percentage points, paired bootstrap over the same "
                  "items):", "", summary_table(m["summary"], which="vs_baseline")]
    lines += [f"Probe spread: {100 * spread['fraction_in_top_decile']:.0f}% of the probe's protected directions lie in "
              f"the top decile of the spectrum (mean relative index {spread['mean_relative_index']:.2f}; uniform = 10% "
              "and 0.50).", "",
              "Skill retention >= 95%: " + ", ".join(f"{n} {'yes' if (v or 0) >= 0.95 else 'no'} ({pct(v)}%)"
                                                      for n, v in ret.items()) + ".", "",
              f"Wall time: {result.seconds:.0f} s.", "", "## Figures", ""]
    lines += [line for n in names for line in (f"![{n[:-4]}](figures/{n})", "")]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return table + f"\nwall time {result.seconds:.0f} s; report {run.out}/report.md"
