"""Can the lab tell methods apart? Measure the validity criteria (a)-(f) of ``docs/lab.md`` on one model.

``spectral-peft lab-check`` measures, on ``model`` (default the organism), with settings fixed before any comparison
and calibrated on LoRA and the controls only (never on a method under test):

- (a) with ``--probe`` (an ``spectral-peft svf`` run directory), the SVF expert's accuracy against the base's on
  ``n_expert`` held-out test problems of its skill, and the paired 95% CI of the gain (``spectral_peft.lab.expert``);
  when the interval does not lie above 0 the verdict says that no expert was learned;
- (b) every skill in ``skills`` on ``n_problems`` problems of its test mix: accuracy (95% Wilson CI), its chance
  level (the better of the constant-answer and uniform-pick strategies) and the teacher-forced NLL of the gold
  solutions (``spectral_peft.lab.skills``);
- (c) a LoRA calibration fine-tune at the ``regime`` settings (default: the demo's injection of 64 facts):
  ``||dW||_F / ||W||_F`` and ``||dW||_2 / sigma_1(W)`` per adapted matrix (``spectral_peft.lab.regime``);
- (f) the base's accuracy on each candidate MergeFail/continual task in ``tasks`` (how many it half-knows) and, with
  ``--mergefail`` (a ``spectral-peft mergefail`` run directory), the pooled fail rate of every method x operator there;

- (e) with ``--probe``, the controls (``spectral_peft.lab.controls``): from the expert, LoRA at the ``regime``
  settings, the same LoRA with ``n_rehearsal`` training examples of the expert's skill mixed in (the positive
  control), and the ``negative`` specs, each scored on ``n_controls`` test problems of the skill; gains over LoRA
  are paired differences on the same problems;

- with ``--probe``, whether the probe is real (``spectral_peft.lab.probe_analysis``): the Jaccard index of its
  protected sets with those of ``seed_probes`` (the same expert trained with other seeds) and of ``null_probe``
  (the same SVF training on a non-skill objective), and with the sets that sigma-aware scores ``|z - 1| sigma``
  and Fisher scores (on ``n_fisher`` training examples of the skill) pick at the same sizes, each against its
  exact chance level;

and records criterion (d) (a rule of the comparison protocols) as not measured, with the reason. Verdicts and
thresholds: ``spectral_peft.lab.criteria``.

Writes ``lab.json`` (each criterion's verdict and measured value, and the settings), ``metrics.json`` (the same with
every per-item outcome) and ``report.md``. To publish: ``spectral-peft lab-check --probe runs/svf --out runs/lab`` then
``cp runs/lab/lab.json docs/results/lab.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from ..data import check_task_spec, load_task
from ..data.chat import check_chat_mode
from ..errors import InputError, MissingInputError
from ..evaluation import skill_accuracy
from ..evaluation.injection import ORGANISM_SKILLS
from ..lab import ExpertMeasure, RegimeMeasure, RegimeSettings, SkillMeasure, measure_expert, measure_regime
from ..lab import DEFAULT_NEGATIVE, ControlsMeasure, measure_controls, measure_skill, spread
from ..lab.probe_analysis import (fisher_scores, score_overlap, set_overlap, sigma_aware_scores, singular_values,
                                  stability)
from ..lab.criteria import (Verdict, controls_verdict, expert_verdict, matched_verdict, regime_verdict,
                            skills_verdict, tasks_verdict)
from ..loading import ORGANISM, ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..report import fmt_ci, md_table
from ..runs import RunDir, safe_name
from ..validation import (check_at_least, check_distinct, check_finite_numbers, check_methods, check_probe,
                          read_json_file)

MERGE_TASKS = ("count", "sort", "reverse", "max", "code@3", "science@7")  # six formats the organism half-knows
CALIBRATION_RULE = ("Settings are fixed before any comparison and calibrated only on LoRA and the controls, never on "
                    "a method under test; this file records them.")
CONTROLS_REASON = "no --probe given: the controls start from the SVF expert"
MERGEFAIL_REASON = "no --mergefail run given: give a mergefail run directory trained at the regime's strength"


def mergefail_rates(directory: str) -> dict[str, dict[str, Any]]:
    """``{"method|operator": {rate, ci_low, ci_high, n_distinct}}``: the fail rates pooled over merge sizes that the
    mergefail run at ``directory`` measured (its ``metrics.json``), over distinct evaluations."""
    path = Path(directory).expanduser() / "metrics.json"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: --mergefail takes a finished spectral-peft mergefail run directory")
    summary = read_json_file(path, "a mergefail run's metrics").get("summary", {})
    rates = [r for r in summary.get("rates", []) if r.get("t") is None]
    if not rates:
        raise InputError(f"{path} holds no pooled fail rates; is it a mergefail run?")
    return {f"{r['method']}|{r['operator']}": {"rate": r["rate"]["estimate"], "ci_low": r["rate"]["low"],
                                               "ci_high": r["rate"]["high"], "n_distinct": r["n_distinct"]}
            for r in rates}


@dataclass
class Config:
    """Measure the lab's validity criteria on one model.

    Attributes:
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        skills: the skill battery of criterion (b) (data specs), each measured at its test mix.
        n_problems: test problems per skill (criterion (b) needs at least 500).
        probe: the SVF expert of criterion (a): an svf run directory or a probe directory trained on this model;
            empty: criterion (a) is not measured.
        expert_skill: the expert's skill (a data spec); empty: the skill recorded in the probe.
        n_expert: held-out test problems on which expert and base are compared (criterion (a) needs at least 500).
        regime: the LoRA calibration fine-tune of criterion (c).
        tasks: the candidate MergeFail/continual tasks of criterion (f) (data specs), scored on the base.
        n_tasks: test problems per candidate task.
        n_controls: test problems of the expert's skill on which every control arm is scored (criterion (e)).
        n_rehearsal: training examples of the expert's skill mixed into the positive control's fine-tune.
        negative: the negative controls' method specs (PALoRA's protected-set and placement ablations).
        seed_probes: the same expert trained with other seeds (svf run or probe directories), for the probe's stability.
        null_probe: the same SVF training on a non-skill objective (an svf run or probe directory); empty: none.
        n_fisher: training examples of the expert's skill for the Fisher scores.
        mergefail: a spectral-peft mergefail run directory whose fail rates criterion (f) reads; empty: not measured.
        chat_template: auto (use the tokenizer's chat template when it has one) or none.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        seed: seed of the problem draws, the calibration fine-tune and its data.
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    model: str = ORGANISM
    device: str = "auto"
    dtype: str = "auto"
    skills: tuple[str, ...] = ORGANISM_SKILLS
    n_problems: int = 500
    probe: str = ""
    expert_skill: str = ""
    n_expert: int = 500
    regime: RegimeSettings = field(default_factory=RegimeSettings)
    tasks: tuple[str, ...] = MERGE_TASKS
    n_tasks: int = 100
    n_controls: int = 500
    n_rehearsal: int = 32
    negative: tuple[str, ...] = DEFAULT_NEGATIVE
    seed_probes: tuple[str, ...] = ()
    null_probe: str = ""
    n_fisher: int = 256
    mergefail: str = ""
    chat_template: str = "auto"
    allow_code_execution: bool = False
    seed: int = 0
    threads: int = 1
    progress: bool = True

    def validate(self) -> None:
        check_finite_numbers(self)
        check_at_least(1, n_problems=self.n_problems, n_expert=self.n_expert, n_tasks=self.n_tasks,
                       n_controls=self.n_controls, n_fisher=self.n_fisher, threads=self.threads)
        check_at_least(0, n_rehearsal=self.n_rehearsal)
        check_distinct("negative", self.negative)
        check_methods(list(self.negative))
        check_distinct("skills", self.skills)
        check_distinct("tasks", self.tasks)
        for spec in (*self.skills, *self.tasks):
            check_task_spec(spec, allow_code_execution=self.allow_code_execution)
        self.regime.validate(self.allow_code_execution)
        if self.mergefail:
            mergefail_rates(self.mergefail)
        if self.probe:
            check_task_spec(self.probe_skill(), allow_code_execution=self.allow_code_execution)
        elif self.expert_skill or self.seed_probes or self.null_probe:
            raise InputError("--expert-skill, --seed-probes and --null-probe go with a --probe; give the probe too")
        for other in (*self.seed_probes, *([self.null_probe] if self.null_probe else [])):
            check_probe(other)
        check_chat_mode(self.chat_template)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)

    def probe_skill(self) -> str:
        """The expert's skill: ``expert_skill``, else the one the probe records."""
        skill = self.expert_skill or check_probe(self.probe).meta.get("skill", "")
        if not skill:
            raise InputError(f"the probe {self.probe} records no skill; name it with --expert-skill")
        return skill


QUICK = {"n_problems": 24, "n_expert": 24, "n_tasks": 16, "tasks": ("sort", "max"), "regime.n_train": 8,
         "regime.epochs": 2, "regime.n_eval": 8, "n_controls": 24, "n_rehearsal": 8, "n_fisher": 16}


@dataclass
class Result:
    """Every measurement, with its per-item outcomes, and the settings it was made with."""

    model: str
    settings: dict[str, Any]
    expert: ExpertMeasure | None
    expert_reason: str
    skills: dict[str, SkillMeasure]
    regime: RegimeMeasure
    task_correct: dict[str, list[float]]
    controls: ControlsMeasure | None
    probe_evidence: dict[str, Any] | None
    fail_rates: dict[str, dict[str, Any]]
    seconds: float

    def verdicts(self) -> list[Verdict]:
        task_accuracy = {t: sum(c) / len(c) for t, c in self.task_correct.items()}
        return [expert_verdict(self.expert.summary() if self.expert else None, self.expert_reason),
                skills_verdict({n: s.summary() for n, s in self.skills.items()}),
                regime_verdict(spread(self.regime.fro_ratio)),
                matched_verdict(),
                controls_verdict(self.controls.positive_control() if self.controls else None, CONTROLS_REASON),
                tasks_verdict(task_accuracy, {k: v["rate"] for k, v in self.fail_rates.items()}, MERGEFAIL_REASON)]

    def lab(self) -> dict[str, Any]:
        """``lab.json``: the verdicts, the headline values (accuracies and gains in points, 0-1) and the settings."""
        r = self.regime
        return {"model": self.model, "calibration_rule": CALIBRATION_RULE,
                "criteria": {v.criterion: v.to_dict() for v in self.verdicts()},
                "expert_gain": self.expert.summary() if self.expert else None,
                "expert_gain_reason": self.expert_reason,
                "positive_control": self.controls.positive_control() if self.controls else None,
                "positive_control_reason": "" if self.controls else CONTROLS_REASON,
                "negative_controls": self.controls.negative_controls() if self.controls else None,
                "probe_evidence": self.probe_evidence,
                "lora_update_fro_ratio": spread(r.fro_ratio),
                "lora_update_spectral_ratio": spread(r.spectral_ratio),
                "lora_calibration": {"spec": r.spec, "settings": asdict(r.settings), "n_pairs": r.n_pairs,
                                     "steps": r.steps, "reached_target": r.reached_target,
                                     "first_loss": r.first_loss, "last_loss": r.last_loss,
                                     "learned_metric": r.learned_metric,
                                     "learned_before": sum(r.learned_before) / len(r.learned_before),
                                     "learned_after": sum(r.learned_after) / len(r.learned_after),
                                     "seconds": r.seconds},
                "skills": {n: s.summary() for n, s in self.skills.items()},
                "task_base_accuracy": {t: sum(c) / len(c) for t, c in self.task_correct.items()},
                "mergefail_fail_rates": {k: v["rate"] for k, v in self.fail_rates.items()},
                "mergefail_fail_rate_intervals": self.fail_rates,
                "mergefail_fail_rates_reason": "" if self.fail_rates else MERGEFAIL_REASON,
                "settings": self.settings, "seconds": self.seconds}

    def to_dict(self) -> dict[str, Any]:
        return {**self.lab(), "items": {
            "expert": self.expert.to_dict() if self.expert else None,
            "skills": {n: s.to_dict() for n, s in self.skills.items()},
            "regime": {"fro_ratio": self.regime.fro_ratio, "spectral_ratio": self.regime.spectral_ratio,
                       "learned_before": self.regime.learned_before, "learned_after": self.regime.learned_after},
            "tasks": self.task_correct, "controls": self.controls.to_dict() if self.controls else None}}


def probe_evidence(cfg: Config, source: ModelSource, task) -> dict[str, Any]:
    """Overlaps (pooled Jaccard against chance, and per matrix) of the probe's protected sets with: the other seeds'
    probes (``stability``: all pairs of the probe and ``seed_probes``), the null probe, and the sets of sigma-aware
    and Fisher scores at the probe's sizes (each also against the top-sigma set)."""
    probe = check_probe(cfg.probe)
    out: dict[str, Any] = {"stability": None, "null": None}
    if cfg.seed_probes:
        out["stability"] = stability([probe, *map(check_probe, cfg.seed_probes)]).summary()
    if cfg.null_probe:
        out["null"] = set_overlap(probe, check_probe(cfg.null_probe)).to_dict()
    base = source.fresh()
    sigma_aware = sigma_aware_scores(probe, singular_values(base, probe))
    pairs = [(e.prompt, e.target) for e in task(cfg.probe_skill()).examples("train", n=cfg.n_fisher, seed=cfg.seed)]
    fisher = fisher_scores(base, source.tokenizer, pairs, list(probe.scales), progress=cfg.progress)
    out["sigma_aware"] = {k: v.to_dict() for k, v in score_overlap(probe, sigma_aware).items()}
    out["fisher"] = {k: v.to_dict() for k, v in score_overlap(probe, fisher).items()}
    return out


def run(cfg: Config, run: RunDir) -> Result:
    t0 = time.perf_counter()
    seed_everything(cfg.seed, cfg.threads)
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    tok = source.tokenizer

    def task(spec: str):
        return load_task(spec, tokenizer=tok, chat_template=cfg.chat_template,
                         allow_code_execution=cfg.allow_code_execution)

    expert, reason = None, "no --probe given: give an svf run directory to measure the expert"
    if cfg.probe:
        probe = check_probe(cfg.probe)
        unit = run.unit("expert", lambda: measure_expert(source, task(cfg.probe_skill()), probe, cfg.n_expert,
                                                         cfg.seed, cfg.progress).to_dict())
        expert, reason = ExpertMeasure(**unit), ""
    base = source.fresh()

    def skill_unit(spec: str) -> dict[str, Any]:
        return measure_skill(base, tok, task(spec), cfg.n_problems, cfg.seed, progress=cfg.progress).to_dict()

    def task_unit(t) -> list[float]:
        examples = t.examples("test", n=cfg.n_tasks, seed=cfg.seed)
        return [float(c) for c in skill_accuracy(base, tok, t, examples, progress=cfg.progress).correct]

    skills = {}
    for spec in cfg.skills:
        unit = run.unit(f"skill-{safe_name(spec)}", partial(skill_unit, spec))
        skills[unit["name"]] = SkillMeasure(**unit)
    task_correct = {}
    for spec in cfg.tasks:
        t = task(spec)
        task_correct[t.name] = run.unit(f"task-{safe_name(spec)}", partial(task_unit, t))

    def calibrate() -> dict[str, Any]:
        seed_everything(cfg.seed, cfg.threads)
        return measure_regime(source.fresh(), tok, cfg.regime, cfg.seed, cfg.chat_template,
                              cfg.allow_code_execution, cfg.progress).to_dict()

    unit = run.unit("regime", calibrate)
    regime = RegimeMeasure(**{**unit, "settings": RegimeSettings(**unit["settings"])})
    controls = None
    if cfg.probe:
        def measure() -> dict[str, Any]:
            seed_everything(cfg.seed, cfg.threads)
            return measure_controls(source, task(cfg.probe_skill()), check_probe(cfg.probe), cfg.regime,
                                    cfg.n_controls, cfg.n_rehearsal, cfg.seed, cfg.negative, cfg.chat_template,
                                    cfg.allow_code_execution, cfg.progress).to_dict()

        controls = ControlsMeasure.from_dict(run.unit("controls", measure))
    evidence = run.unit("probe-evidence", partial(probe_evidence, cfg, source, task)) if cfg.probe else None
    fail_rates = mergefail_rates(cfg.mergefail) if cfg.mergefail else {}
    return Result(model=source.name, settings=asdict(cfg), expert=expert, expert_reason=reason, skills=skills,
                  regime=regime, task_correct=task_correct, controls=controls, probe_evidence=evidence,
                  fail_rates=fail_rates,
                  seconds=time.perf_counter() - t0)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cell(text: str) -> str:
    """Text for a markdown table cell (its pipes escaped)."""
    return text.replace("|", "\\|")


def render(result: Result, run: RunDir) -> str:
    lab = result.lab()
    run.write_json("lab.json", lab)
    run.write_json("metrics.json", result.to_dict())
    verdicts = result.verdicts()
    rows = [{"criterion": f"({v.criterion}) {v.title}", "verdict": v.status, "rule": _cell(v.rule),
             "measured / note": _cell(v.note)} for v in verdicts]
    lines = [f"# Lab check on `{result.model}`", "", CALIBRATION_RULE, "",
             md_table(rows, ["criterion", "verdict", "rule", "measured / note"]), "## (a) The SVF expert", ""]
    gain = lab["expert_gain"]
    if gain:
        ci = {"estimate": gain["estimate"], "low": gain["ci_low"], "high": gain["ci_high"]}
        lines.append(f"On {gain['n']} held-out `{gain['skill']}` problems: base {_pct(gain['base_accuracy'])}, "
                     f"expert {_pct(gain['expert_accuracy'])}; gain (paired bootstrap, percentage points) "
                     f"{fmt_ci(ci, signed=True)}." + ("" if gain["ci_low"] > 0 else " No expert was learned."))
    else:
        lines.append(lab["expert_gain_reason"] + ".")
    skill_rows = [{"skill": n, "accuracy (95% CI)": fmt_ci({"estimate": s["accuracy"], "low": s["ci_low"],
                                                            "high": s["ci_high"]}),
                   "chance": f"{100 * s['chance']:.1f} ({s['chance_rule']})", "gold NLL": f"{s['nll']:.3f}",
                   "n": s["n"]} for n, s in lab["skills"].items()]
    fro, sp, cal = lab["lora_update_fro_ratio"], lab["lora_update_spectral_ratio"], lab["lora_calibration"]
    lines += ["", "## (b) Skills at their test mix", "",
              "Accuracy and chance in %; gold NLL in nats per token of the gold solution.", "",
              md_table(skill_rows, ["skill", "accuracy (95% CI)", "chance", "gold NLL", "n"]),
              "## (c) Update regime of the LoRA calibration fine-tune", "",
              f"`{cal['spec']['label']}` r={cal['spec']['r']}, targets `{cal['spec']['targets']}`, on "
              f"`{cal['settings']['data']}` ({cal['n_pairs']} pairs), {cal['settings']['epochs']} epochs at lr "
              f"{cal['settings']['lr']}, batch {cal['settings']['batch_size']} ({cal['steps']} steps; loss "
              f"{cal['first_loss']:.3f} -> {cal['last_loss']:.3f}); {cal['learned_metric']}: "
              f"{_pct(cal['learned_before'])} -> {_pct(cal['learned_after'])}.", "",
              f"- ||dW||_F / ||W||_F over {fro['n']} matrices: median {_pct(fro['median'])}, p10 {_pct(fro['p10'])}, "
              f"p90 {_pct(fro['p90'])} (range {_pct(fro['min'])}-{_pct(fro['max'])})",
              f"- ||dW||_2 / sigma_1(W): median {sp['median']:.3f}, p10 {sp['p10']:.3f}, p90 {sp['p90']:.3f}", "",
              "## (f) Candidate tasks: the base's accuracy", "",
              md_table([{"task": t, "base accuracy": _pct(a)} for t, a in lab["task_base_accuracy"].items()],
                       ["task", "base accuracy"])]
    if result.probe_evidence:
        ev = result.probe_evidence

        def row(what: str, o: dict[str, Any] | None) -> dict[str, str]:
            return {"probe's sets against": what, "pooled Jaccard": "-" if o is None else f"{o['pooled']:.3f}",
                    "chance": "-" if o is None else f"{o['pooled_chance']:.3f}"}

        lines += ["", "## Is the probe real?", "",
                  "Jaccard index of protected sets, pooled over matrices (sum of intersections over sum of unions), "
                  "against its exact chance level for random sets of the same sizes.", "",
                  md_table([row("other expert seeds (mean over pairs)", ev["stability"]),
                            row("the null probe", ev["null"]),
                            row("sigma-aware scores at the same sizes", ev["sigma_aware"]["probe"]),
                            row("Fisher scores at the same sizes", ev["fisher"]["probe"]),
                            row("top-sigma (sigma-aware scores' sets against it)", ev["sigma_aware"]["sigma"]),
                            row("top-sigma (Fisher scores' sets against it)", ev["fisher"]["sigma"])],
                           ["probe's sets against", "pooled Jaccard", "chance"])]
    if result.controls:
        pos, c = lab["positive_control"], result.controls
        lines += ["", "## (e) Controls", "",
                  f"Every arm starts from the expert ({_pct(pos['expert_accuracy'])} on these {pos['n']} "
                  f"`{pos['skill']}` problems) and injects the regime's facts; gains over LoRA are paired "
                  f"differences in accuracy points. Positive control: LoRA with {c.n_rehearsal} training examples of "
                  "the skill mixed in (rehearsal).", "",
                  md_table([{"arm": _cell(label), "skill accuracy": _pct(a["accuracy"]),
                             "gain vs LoRA (95% CI)": fmt_ci({"estimate": a["estimate"], "low": a["ci_low"],
                                                              "high": a["ci_high"]}, signed=True),
                             c.learned_metric: _pct(a["learned"]), "steps": a["steps"]}
                            for label, a in ((label, c.arm_summary(label)) for label in c.arms)],
                           ["arm", "skill accuracy", "gain vs LoRA (95% CI)", c.learned_metric, "steps"])]
    if result.fail_rates:
        lines += ["MergeFail fail rates (pooled over merge sizes; distinct evaluations):", "",
                  md_table([{"method|operator": _cell(k), "fail rate (95% CI)": fmt_ci(
                      {"estimate": v["rate"], "low": v["ci_low"], "high": v["ci_high"]}),
                      "distinct evaluations": v["n_distinct"]} for k, v in result.fail_rates.items()],
                      ["method|operator", "fail rate (95% CI)", "distinct evaluations"])]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return "\n".join(f"({v.criterion}) {v.title}: {v.status}" + (f" - {v.note}" if v.note else "") for v in verdicts)
