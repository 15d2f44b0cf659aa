"""Stage 2 of PALoRA, and every baseline: inject Unknown facts into an SVF expert with one method; recall and retention.

``spectral-peft inject --method palora --probe runs/svf`` folds the probe's SVF expert into the model, categorises
candidate facts on it (``facts``: the organism world's, or a QA JSONL), trains the method (a spec: ``palora``,
``lora:r=4``, the ablations ``palora:protect=sigma``, ``palora:protect=random``, ``palora:place=inside``, ... see
``spectral_peft.methods``) on the Unknown ones, and evaluates expert and injected model on the same items: recall and
paraphrase recall of the injected facts, recall of held-out HighlyKnown facts, the retained skills' test problems, and
held-out perplexity (``spectral_peft.evaluation.injection``). Every method starts from the same expert.

Writes ``adapter/`` (re-evaluate it with ``spectral-peft eval --run-dir``), ``facts.json`` (the split, with the
facts' questions and answers), ``metrics.json`` (per-item outcomes under ``items``; the probe's absolute path),
``report.md`` and ``figures/loss.png``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data import check_task_spec
from ..data.chat import check_chat_mode
from ..evaluation.injection import (EvalSettings, InjectionOutcome, ORGANISM_SKILLS, evaluate_injection, make_suite,
                                    retention, summarise, summary_table)
from ..evaluation.knowledge_split import KnowledgeSplit, SplitSettings, check_facts_spec, find_split, load_facts
from ..training.injection import InjectSettings, train_injection
from ..loading import ORGANISM, ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..methods import MethodSpec, count_trainable, parse_method
from ..adapters.svf_fold import fold_expert
from ..probe import load_probe
from ..report import plot_loss, save_figure
from ..runs import RunDir
from ..validation import check_at_least, check_distinct, check_finite_numbers, check_method, check_probe

EXPERT = "svf-expert"


@dataclass
class Config:
    """Inject Unknown facts into an SVF expert with one method.

    Attributes:
        method: one method spec, e.g. palora, lora, oplora, hiplora, lora:r=4, palora:protect=sigma,
            palora:protect=random, palora:place=inside.
        probe: the SVF expert: a probe directory or an svf run directory (from spectral-peft svf).
        facts: organism (the world's held-out and known facts) or a QA JSONL file (question, answers/aliases,
            paraphrases rows), categorised on the expert: Unknown ones are injected, HighlyKnown ones measure retention.
        skill: the skills whose retention is measured (data specs; with a model other than the organism, name its
            own, e.g. gsm8k:PATH).
        model: the model the probe was trained on: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        r: default LoRA rank for a spec that does not set r.
        targets: default target matrices (mlp or all-linear) for a spec that does not set them.
        n_facts: Unknown facts to inject.
        split: how candidate facts are categorised and split.
        train: the injection schedule.
        eval: evaluation sizes.
        chat_template: auto (use the tokenizer's chat template for skill prompts when it has one) or none.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        seed: seed of the fact sample, the adapter's initialisation and the batch order.
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    method: str = "palora"
    probe: str = "runs/svf"
    facts: str = "organism"
    skill: tuple[str, ...] = ORGANISM_SKILLS
    model: str = ORGANISM
    device: str = "auto"
    dtype: str = "auto"
    r: int = 1
    targets: str = "all-linear"
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
        self.split.validate()
        self.train.validate()
        self.eval.validate()
        check_method(self.method, self.defaults())
        check_distinct("skill", self.skill)
        for spec in self.skill:
            check_task_spec(spec, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        check_facts_spec(self.facts)
        check_probe(self.probe)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"n_facts": 16, "train.epochs": 10, "split.n_known": 40, "split.n_known_eval": 32, "split.n_windows": 4,
         "split.n_samples": 2, "eval.n_skill": 24, "eval.n_ppl": 10}


def _portable(model: str) -> str:
    """A local checkpoint directory as an absolute path (so a saved run can be re-evaluated from anywhere)."""
    path = Path(model).expanduser()
    return str(path.absolute()) if model != ORGANISM and path.exists() else model


@dataclass
class Result:
    """The split, the expert's and the injected model's per-item outcomes, and the training record."""

    spec: MethodSpec
    probe: str
    model: str
    facts: str
    skills: list[str]
    seed: int
    chat_template: str
    split: KnowledgeSplit
    expert: InjectionOutcome
    injected: InjectionOutcome
    trainable_parameters: int
    n_base_parameters: int
    probe_overhead: float
    n_train_pairs: int
    losses: list[float]
    train_seconds: float
    recall_checks: list[dict[str, Any]]
    reached_recall_target: bool | None
    train: InjectSettings
    eval: EvalSettings

    def summary(self) -> dict[str, dict[str, Any]]:
        """Intervals of every metric, and the injected model's paired differences to the expert."""
        return summarise([{EXPERT: self.expert, self.spec.label: self.injected}], EXPERT, baseline=EXPERT)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.spec.label, "spec": self.spec.to_dict(), "probe": self.probe, "model": self.model,
                "facts": self.facts, "skills": self.skills, "seed": self.seed, "chat_template": self.chat_template,
                "train": asdict(self.train), "eval": asdict(self.eval),
                "n_inject": len(self.split.inject), "n_mix": len(self.split.mix), "n_retain": len(self.split.retain),
                "categories": self.split.counts,
                "expert": {**self.expert.aggregates(), **retention(self.expert, self.expert)},
                "injected": {**self.injected.aggregates(), **retention(self.injected, self.expert)},
                "summary": self.summary(), "trainable_parameters": self.trainable_parameters,
                "n_base_parameters": self.n_base_parameters, "probe_overhead": self.probe_overhead,
                "n_train_pairs": self.n_train_pairs, "steps": len(self.losses), "train_seconds": self.train_seconds,
                "first_loss": self.losses[0], "last_loss": self.losses[-1], "recall_checks": self.recall_checks,
                "reached_recall_target": self.reached_recall_target,
                "items": {"expert": self.expert.to_dict(), "injected": self.injected.to_dict()}}


def run(cfg: Config, run: RunDir) -> Result:
    seed_everything(cfg.seed, cfg.threads)
    spec = parse_method(cfg.method, cfg.defaults())
    probe = load_probe(cfg.probe)
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    tok = source.tokenizer
    expert = fold_expert(source.fresh(), probe)
    pool = load_facts(cfg.facts)
    split = find_split(expert, tok, pool, cfg.n_facts, cfg.split, cfg.seed, cfg.progress)
    run.write_json("facts.json", split.to_dict())
    suite = make_suite(split, cfg.skill, tok, cfg.eval, cfg.chat_template, cfg.allow_code_execution)
    expert_outcome = evaluate_injection(expert, tok, suite, cfg.progress)
    model, history = train_injection(source.fresh(), tok, spec, suite, cfg.train, cfg.seed, probe, cfg.progress,
                                     checkpoint_dir=run.file("checkpoint"))
    model.save_pretrained(run.file("adapter"))
    n_base = source.n_parameters
    return Result(spec=spec, probe=str(Path(probe.source).absolute()), model=_portable(cfg.model), facts=pool.name,
                  skills=list(cfg.skill), seed=cfg.seed, chat_template=cfg.chat_template, split=split,
                  expert=expert_outcome, injected=evaluate_injection(model, tok, suite, cfg.progress),
                  trainable_parameters=count_trainable(model), n_base_parameters=n_base,
                  probe_overhead=probe.num_parameters() / n_base if spec.needs_probe else 0.0,
                  n_train_pairs=len(split.training_pairs(cfg.train.paraphrases)), losses=history.losses,
                  train_seconds=history.seconds, recall_checks=history.validation,
                  reached_recall_target=history.reached_stop_score, train=cfg.train, eval=cfg.eval)


def _stopping(result: Result) -> str:
    """How a recall target ended training ('' without one)."""
    if result.reached_recall_target is None:
        return ""
    target = result.train.recall_target
    if result.reached_recall_target:
        return f"; stopped at recall {result.recall_checks[-1]['score']:.0%} >= the target {target:.0%}"
    return f"; did not reach the recall target {target:.0%} within the {result.train.epochs}-epoch cap"


def render(result: Result, run: RunDir) -> str:
    m = result.to_dict()
    run.write_json("metrics.json", m)
    label = result.spec.label
    fig = save_figure(plot_loss({label: result.losses}, f"injecting {m['n_inject']} facts with {label}"),
                      run.file("figures/loss.png"))
    t, e = result.train, result.eval
    trainable = {EXPERT: None, label: result.trainable_parameters}
    lines = [f"# Knowledge injection: `{label}`", "",
             f"Probe `{result.probe}` on `{result.model}`; facts `{result.facts}`: {m['n_inject']} Unknown facts "
             f"injected ({m['n_mix']} HighlyKnown mixed in), {m['n_retain']} HighlyKnown facts held out; categories "
             f"of the probed candidates: {result.split.counts}.", "",
             f"Training: {t.epochs} epochs at lr {result.spec.lr or t.lr}, batch {t.batch_size} ({m['steps']} steps, "
             f"{result.train_seconds:.0f} s){_stopping(result)}. Evaluation: {e.n_skill} test problems per skill "
             f"({', '.join(result.skills)}), {e.n_ppl} held-out documents.", "",
             "Estimates with 95% intervals (Wilson for recall and accuracies, bootstrap over items for paraphrase "
             "recall and the retention ratios, whose denominator, the expert's score, is held fixed):", "",
             summary_table(m["summary"], trainable=trainable),
             f"Paired differences, {label} minus the SVF expert (percentage points; NLL in nats per token):", "",
             summary_table(m["summary"], which="vs_baseline"),
             f"Probe overhead: {100 * result.probe_overhead:.4f}% of the base parameters.", "",
             f"![loss](figures/{fig})"]
    run.write_text("report.md", "\n".join(lines) + "\n")
    inj = m["injected"]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    return (f"{label}: recall {pct(inj['recall'])} (expert {pct(m['expert']['recall'])}), paraphrase recall "
            f"{pct(inj['paraphrase_recall'])}, HighlyKnown retention {pct(inj['highly_known_retention'])}, skill "
            f"retention {pct(inj['mean_skill_retention'])}, {result.trainable_parameters:,} trainable; "
            f"{m['n_inject']} facts; adapter in {run.out}/adapter")
