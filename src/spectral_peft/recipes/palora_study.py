"""The PALoRA study behind ``docs/results-palora.md``: every injection method and PALoRA's ablations, each from the same
SVF expert, over several seeds, with hierarchical-bootstrap intervals and paired differences to LoRA.

Per seed: train the SVF expert (seeded), categorise facts on it, evaluate base and expert, then inject with every
method spec and evaluate it on the same items (``spectral_peft.training.svf_expert``,
``spectral_peft.evaluation.injection``). Every expensive step is a resumable unit of the run (``units/``: one per
seed for the expert and the reference evaluation, one per (seed, method)), so ``--resume`` continues an interrupted
study and an extended one (more methods or seeds) costs only the missing units.

Statistics: per-item outcomes are kept as ``[seeds, items]``; every metric's interval is ``proportion_ci`` (0/1
outcomes) or ``bootstrap_ci`` (paraphrase recall, retention ratios, NLL increase), the hierarchical bootstrap over
seeds then items, and every method's ``paired_difference_ci`` to the baseline (``lora``) resamples the same
(seed, item) pairs.

Writes ``seeds/<seed>/svf/`` (probe and adapter), ``metrics.json`` (the summary, and the per-item outcomes of every
seed and model under ``items``), ``report.md`` and ``figures/tradeoff.png``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..data import check_task_spec, load_task
from ..data.chat import check_chat_mode
from ..errors import InputError
from ..evaluation.injection import (EvalSettings, InjectionOutcome, ORGANISM_SKILLS, Suite, evaluate_injection,
                                    make_suite, retention, summarise, summary_table, tradeoff_points)
from ..evaluation.knowledge_split import KnowledgeSplit, SplitSettings, check_facts_spec, find_split, load_facts
from ..training.injection import InjectSettings, train_injection
from ..loading import ORGANISM, ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..methods import MethodSpec, count_trainable, parse_methods
from ..adapters.svf_fold import fold_expert
from ..probe import load_probe
from ..report import plot_tradeoff
from ..runs import RunDir
from ..training.svf_expert import SVFSettings, train_svf_expert
from ..validation import check_at_least, check_distinct, check_finite_numbers, check_methods

EXPERT = "svf-expert"
ALL_METHODS = ("palora,lora,dora,pissa,milora,oplora,svft,corda,hiplora,"
               "palora:protect=sigma,palora:protect=random,palora:place=inside")


@dataclass
class Config:
    """Every injection method and ablation over seeds.

    Attributes:
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        skill: the SVF expert's skill (a data spec).
        retain_skills: the skills whose retention is measured (data specs).
        methods: comma-separated method specs (PALoRA's ablations: palora:protect=sigma, palora:protect=random,
            palora:place=inside).
        baseline: the method spec every other model is compared with (paired differences).
        seeds: seeds; each trains its own expert, split and adapters.
        facts: organism or a QA JSONL file (question, answers/aliases, paraphrases rows).
        r: default LoRA rank for a spec that does not set r.
        targets: default target matrices (mlp or all-linear) for a spec that does not set them.
        svf: the experts' sizes and schedule.
        n_facts: Unknown facts injected per seed.
        split: how candidate facts are categorised and split.
        train: the injection schedule.
        eval: evaluation sizes.
        n_resamples: bootstrap resamples of every interval.
        chat_template: auto (use the tokenizer's chat template for skill prompts when it has one) or none.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    model: str = ORGANISM
    device: str = "auto"
    dtype: str = "auto"
    skill: str = "math"
    retain_skills: tuple[str, ...] = ORGANISM_SKILLS
    methods: str = ALL_METHODS
    baseline: str = "lora"
    seeds: tuple[int, ...] = (0, 1, 2)
    facts: str = "organism"
    r: int = 1
    targets: str = "all-linear"
    svf: SVFSettings = field(default_factory=SVFSettings)
    n_facts: int = 16
    split: SplitSettings = field(default_factory=SplitSettings)
    train: InjectSettings = field(default_factory=InjectSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    n_resamples: int = 9999
    chat_template: str = "auto"
    allow_code_execution: bool = False
    threads: int = 2
    progress: bool = True

    def defaults(self) -> MethodSpec:
        return MethodSpec(r=self.r, targets=self.targets)

    def validate(self) -> None:
        check_finite_numbers(self)
        check_at_least(1, n_facts=self.n_facts, threads=self.threads, n_resamples=self.n_resamples)
        check_distinct("seeds", self.seeds)
        for part in (self.svf, self.split, self.train, self.eval):
            part.validate()
        labels = [s.label for s in check_methods(self.methods, self.defaults())]
        if self.baseline not in labels:
            raise InputError(f"baseline {self.baseline!r} is not one of the methods ({', '.join(labels)})")
        check_distinct("retain_skills", self.retain_skills)
        for spec in (self.skill, *self.retain_skills):
            check_task_spec(spec, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        check_facts_spec(self.facts)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"methods": "lora,palora,palora:protect=random", "seeds": (0, 1), "svf.n_train": 128, "svf.n_val": 16,
         "svf.eval_every": 8, "n_facts": 8, "train.epochs": 10, "split.n_known": 24, "split.n_known_eval": 16,
         "split.n_windows": 3, "split.n_samples": 1, "eval.n_skill": 16, "eval.n_ppl": 8, "n_resamples": 2000}


def _slug(label: str) -> str:
    """A method label as a file name (``palora:protect=sigma`` -> ``palora-protect-sigma``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label)


@dataclass
class Result:
    """Per seed: the expert's record and every model's per-item outcomes; the summary over seeds."""

    specs: list[MethodSpec]
    seeds: list[int]
    baseline: str
    svf: dict[int, dict[str, Any]]
    splits: dict[int, KnowledgeSplit]
    outcomes: dict[int, dict[str, InjectionOutcome]]
    trainable: dict[str, int]
    summary: dict[str, dict[str, Any]]
    seconds: float
    config: Config

    def to_dict(self) -> dict[str, Any]:
        return {"methods": [s.label for s in self.specs], "specs": [s.to_dict() for s in self.specs],
                "seeds": self.seeds, "baseline": self.baseline, "trainable_parameters": self.trainable,
                "summary": self.summary, "svf": self.svf,
                "per_seed": {s: {n: {**o.aggregates(), **retention(o, by[EXPERT])} for n, o in by.items()}
                             for s, by in self.outcomes.items()},
                "facts": {s: {"n_inject": len(sp.inject), "n_retain": len(sp.retain), "categories": sp.counts}
                          for s, sp in self.splits.items()},
                "seconds": self.seconds,
                "items": {s: {n: o.to_dict() for n, o in by.items()} for s, by in self.outcomes.items()}}


def _expert_unit(cfg: Config, source: ModelSource, task, seed: int, directory) -> dict[str, Any]:
    """Train seed ``seed``'s SVF expert, save it under ``directory``; its metrics."""
    seed_everything(seed, cfg.threads)
    trained = train_svf_expert(source.fresh(), source.tokenizer, task, cfg.svf, "sft", seed,
                               meta={"skill": cfg.skill, "model": source.name}, progress=cfg.progress)
    trained.save(directory)
    return trained.metrics(source.n_parameters)


def _reference_unit(cfg: Config, source: ModelSource, expert, pool, seed: int) -> dict[str, Any]:
    """Seed ``seed``'s split (categorised on the expert) and the base's and expert's outcomes."""
    tok = source.tokenizer
    split = find_split(expert, tok, pool, cfg.n_facts, cfg.split, seed, cfg.progress)
    suite = make_suite(split, cfg.retain_skills, tok, cfg.eval, cfg.chat_template, cfg.allow_code_execution)
    return {"split": split.to_dict(), "base": evaluate_injection(source.fresh(), tok, suite, cfg.progress).to_dict(),
            EXPERT: evaluate_injection(expert, tok, suite, cfg.progress).to_dict()}


def _method_unit(cfg: Config, source: ModelSource, spec: MethodSpec, probe, suite: Suite, seed: int) -> dict[str, Any]:
    """Inject seed ``seed``'s facts with ``spec`` from the expert; its outcomes and training record."""
    seed_everything(seed, cfg.threads)
    tok = source.tokenizer
    model, history = train_injection(source.fresh(), tok, spec, suite, cfg.train, seed, probe, cfg.progress)
    return {"outcome": evaluate_injection(model, tok, suite, cfg.progress).to_dict(),
            "trainable_parameters": count_trainable(model), "steps": history.steps, "train_seconds": history.seconds,
            "first_loss": history.losses[0], "last_loss": history.losses[-1],
            "recall_checks": history.validation, "reached_recall_target": history.reached_stop_score}


def run(cfg: Config, run: RunDir) -> Result:
    t0 = time.perf_counter()
    specs = parse_methods(cfg.methods, cfg.defaults())
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    tok = source.tokenizer
    task = load_task(cfg.skill, tokenizer=tok, chat_template=cfg.chat_template,
                     allow_code_execution=cfg.allow_code_execution)
    pool = load_facts(cfg.facts)
    svf, splits, outcomes = {}, {}, {}
    trainable = {"base": 0}
    for seed in cfg.seeds:
        where = run.path / "seeds" / str(seed) / "svf"
        svf[seed] = run.unit(f"seed{seed}-svf", partial(_expert_unit, cfg, source, task, seed, where))
        probe = load_probe(where / "probe")
        trainable[EXPERT] = probe.num_parameters()
        expert = fold_expert(source.fresh(), probe)
        reference = run.unit(f"seed{seed}-reference", partial(_reference_unit, cfg, source, expert, pool, seed))
        split = splits[seed] = KnowledgeSplit.from_dict(reference["split"])
        suite = make_suite(split, cfg.retain_skills, tok, cfg.eval, cfg.chat_template, cfg.allow_code_execution)
        outcomes[seed] = {n: InjectionOutcome.from_dict(reference[n]) for n in ("base", EXPERT)}
        for spec in specs:
            unit = run.unit(f"seed{seed}-{_slug(spec.label)}", partial(_method_unit, cfg, source, spec, probe, suite,
                                                                        seed))
            outcomes[seed][spec.label] = InjectionOutcome.from_dict(unit["outcome"])
            trainable[spec.label] = unit["trainable_parameters"]
    summary = summarise([outcomes[s] for s in cfg.seeds], EXPERT, baseline=cfg.baseline, n_resamples=cfg.n_resamples)
    return Result(specs=specs, seeds=list(cfg.seeds), baseline=cfg.baseline, svf=svf, splits=splits,
                  outcomes=outcomes, trainable=trainable, summary=summary, seconds=time.perf_counter() - t0,
                  config=cfg)


def render(result: Result, run: RunDir) -> str:
    m = result.to_dict()
    run.write_json("metrics.json", m)
    n = len(result.seeds)
    fig = plot_tradeoff(tradeoff_points(result.summary), run.file("figures/tradeoff.png"),
                        title=f"recall vs skill retention, 95% CI over {n} seed(s) and items").name
    cfg = result.config
    resampling = "the hierarchical bootstrap over seeds, then items" if n > 1 else "over items"
    table = summary_table(result.summary, trainable=result.trainable)
    facts = ", ".join(f"seed {s}: {len(sp.inject)} injected / {len(sp.retain)} HighlyKnown held out"
                      for s, sp in result.splits.items())
    lines = [f"# PALoRA study on `{cfg.model}`: {len(result.specs)} methods x {n} seeds", "",
             f"Per seed: an SVF expert on `{cfg.skill}` ({cfg.svf.n_train} examples, {cfg.svf.epochs} epoch(s), best "
             f"validation step kept); facts `{cfg.facts}` categorised on it ({facts}); every method injected from the "
             f"same expert ({cfg.train.epochs} epochs at lr {cfg.train.lr}, batch {cfg.train.batch_size}, default "
             f"rank {cfg.r}, targets `{cfg.targets}`); {cfg.eval.n_skill} test problems per skill "
             f"({', '.join(cfg.retain_skills)}) and {cfg.eval.n_ppl} held-out documents.", "",
             f"Estimates with 95% intervals (% unless stated): `proportion_ci` for recall and accuracies, "
             f"`bootstrap_ci` for paraphrase recall, the retention ratios (the SVF expert's score as a fixed "
             f"denominator) and the NLL increase (nats per token); {resampling}, "
             f"{cfg.n_resamples} resamples.", "", table,
             f"Paired differences to `{result.baseline}` (percentage points; the same seeds and items resampled for "
             "both):", "", summary_table(result.summary, which="vs_baseline"),
             f"Wall time of this invocation: {result.seconds:.0f} s (resumed units are not recomputed).", "",
             f"![recall vs retention](figures/{fig})"]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return table + f"\n{len(result.specs)} methods x {n} seeds; report {run.out}/report.md"
