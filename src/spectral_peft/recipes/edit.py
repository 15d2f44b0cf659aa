"""Knowledge editing per method: edit success, paraphrase generalisation, locality and skill preservation.

``spectral-peft edit --methods lora,hiplora`` trains, for each method spec and seed, one adapter on the edit set's
questions (``Q: question / A: new answer``; ``--task organism`` = the organism's counterfactual edits, or a JSONL of
``{"question", "old_answer", "new_answer", "paraphrases": [...]}`` rows) and scores it against the model before the
edit (``spectral_peft.evaluation.editing``): edit success on the trained questions, generalisation to the
paraphrases (never trained), locality on ``n_local`` unrelated questions (the organism world's known facts about
people no edit mentions: answered as before?) and accuracy on ``n_skill`` held-out problems of each retention skill.

Intervals (``spectral_peft.evaluation.stats``) come from the per-item outcomes kept as ``[seeds, items]`` arrays:
0/1 outcomes (edit success, locality, skill problems) by ``proportion_ci`` (Wilson for one seed, hierarchical
bootstrap over seeds then items otherwise), per-edit paraphrase fractions and skill changes by ``bootstrap_ci``,
and every method's difference from the reference (the first method) by ``paired_difference_ci`` on the same items.
Each (method, seed) is a resumable unit.

Writes ``metrics.json`` (with every per-item outcome), ``report.md``, ``figures/editing.png`` and
``figures/loss.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..data import World, check_task_spec, load_task, qa_line
from ..data.chat import check_chat_mode
from ..evaluation import generate, skill_accuracy
from ..evaluation.editing import (ORGANISM_EDITS, EditCase, edit_success, evaluate_editing, load_edit_set,
                                  locality_facts, skill_preservation)
from ..evaluation.stats import CI, bootstrap_ci, paired_difference_ci, proportion_ci
from ..loading import ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..methods import ADDITIVE_METHODS, MethodSpec, budget_table, count_trainable, match_budgets, parse_methods
from ..report import error_bars, fmt_ci, fmt_steps, md_table, plot_loss, save_figure
from ..runs import RunDir
from ..training.adapter import FinetuneSettings, final_budget_use, train_adapter
from ..validation import check_at_least, check_constructed, check_distinct, check_finite_numbers, check_methods

ANSWER_TOKENS = 12
# measure -> (interval of its per-item values, what one item is)
MEASURES: dict[str, tuple[Callable[..., CI], str]] = {
    "edit_success": (proportion_ci, "edit"),
    "paraphrase": (bootstrap_ci, "edit (fraction of its paraphrases)"),
    "locality": (proportion_ci, "unrelated question"),
    "skill": (proportion_ci, "skill problem"),
}


@dataclass
class Config:
    """Knowledge editing with several methods over seeds.

    Attributes:
        methods: comma-separated method specs (lora, hiplora:mode=penalty, oplora, ...); the first is the reference
            of the paired differences.
        task: the edit set: organism (the organism's counterfactual edits) or a JSONL file of
            {"question", "old_answer", "new_answer", "paraphrases": [...]} rows.
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        seeds: seeds of the adapters' initialisation and batch order (one adapter per method and seed).
        r: default LoRA rank (HiP-LoRA's residual rank) for a spec that does not set r.
        k: default HiP-LoRA principal size (OPLoRA's protected size) for a spec that does not set k.
        targets: default target matrices, mlp or all-linear.
        match_budget: give LoRA-family specs without an explicit r the rank matching the first HiP-LoRA spec's
            trainable-parameter count (HiP-LoRA(r, k) when no spec is HiP-LoRA).
        train: epochs, lr and batch_size of the edit training; max_new_tokens caps the skill answers (n_train,
            n_eval and n_val are not used here: n_edits, n_local and n_skill set the sizes). With stop_at, training
            ends at the first check (every check_every steps) whose edit success on the trained questions reaches
            it: methods compared at matched edit success, as injection stops at a recall target.
        n_edits: edits used: the first n_edits of the set (all of a smaller set).
        n_local: unrelated questions for locality (the first n_local known facts about people no edit mentions).
        n_skill: held-out test problems per retention skill.
        skills: retention skills, data specs (math, code, science, gsm8k:PATH, a prompt/response JSONL, ...).
        chat_template: auto (render the skill prompts with the tokenizer's chat template when it has one) or none;
            edit questions are always plain "Q: ... A:" lines.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox (an mbpp skill).
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    methods: str = "lora,hiplora,hiplora:mode=penalty"
    task: str = ORGANISM_EDITS
    model: str = "organism"
    device: str = "auto"
    dtype: str = "auto"
    seeds: tuple[int, ...] = (0, 1)
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    match_budget: bool = True
    train: FinetuneSettings = field(
        default_factory=lambda: FinetuneSettings(epochs=15, lr=5e-3, batch_size=8, max_new_tokens=96))
    n_edits: int = 50
    n_local: int = 200
    n_skill: int = 48
    skills: tuple[str, ...] = ("math", "code", "science")
    chat_template: str = "auto"
    allow_code_execution: bool = False
    threads: int = 1
    progress: bool = True

    def defaults(self) -> MethodSpec:
        return MethodSpec(r=self.r, k=self.k, targets=self.targets)

    def validate(self) -> None:
        check_finite_numbers(self)
        check_constructed(self.train)
        check_at_least(1, n_edits=self.n_edits, n_local=self.n_local, n_skill=self.n_skill, threads=self.threads)
        check_distinct("seeds", self.seeds)
        check_methods(self.methods, self.defaults(), allowed=ADDITIVE_METHODS)
        check_distinct("skills", self.skills)
        for skill in self.skills:
            check_task_spec(skill, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        load_edit_set(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"methods": "lora,hiplora", "n_edits": 16, "n_local": 40, "n_skill": 12, "seeds": (0,), "train.epochs": 10}


@dataclass
class Result:
    """What the editing study measured. ``items[label][measure]`` are per-item outcomes ``[seeds, items]``
    (:data:`MEASURES`; ``skill`` pools the skills' problems in ``skills`` order, ``skill_sizes`` each); ``base``
    holds the model before the edit: ``old_answer`` (per edit), ``locality_correct`` (per unrelated question) and
    ``skill`` (per problem); ``runs[label]`` the per-seed training records."""

    specs: list[MethodSpec]
    task: str
    seeds: list[int]
    edits: list[EditCase]
    skills: list[str]
    skill_sizes: list[int]
    items: dict[str, dict[str, list[list[float]]]]
    base: dict[str, list[float]]
    runs: dict[str, list[dict[str, Any]]]
    budget_counts: list[dict[str, Any]]
    n_local: int
    settings: FinetuneSettings

    @property
    def reference(self) -> str:
        return self.specs[0].label

    def ci(self, label: str, measure: str) -> CI:
        return MEASURES[measure][0](self.items[label][measure])

    def vs_reference(self, label: str, measure: str) -> CI:
        """``label`` minus the reference, paired on the same seeds and items."""
        return paired_difference_ci(self.items[label][measure], self.items[self.reference][measure])

    def skill_change(self, label: str) -> CI:
        """Skill accuracy after minus before, per problem (paired on the problems)."""
        return bootstrap_ci(np.asarray(self.items[label]["skill"]) - np.asarray(self.base["skill"]))

    def preservation(self, label: str) -> dict[str, float | None]:
        """``accuracy after / before`` per skill (``None`` where the base scores 0)."""
        after = np.asarray(self.items[label]["skill"]).mean(axis=0)
        before, bounds = np.asarray(self.base["skill"]), np.cumsum([0, *self.skill_sizes])
        return skill_preservation({s: float(before[a:b].mean()) for s, a, b in zip(self.skills, bounds, bounds[1:])},
                                  {s: float(after[a:b].mean()) for s, a, b in zip(self.skills, bounds, bounds[1:])})

    def to_dict(self) -> dict[str, Any]:
        methods = {}
        for spec in self.specs:
            label = spec.label
            ratios = [v for v in self.preservation(label).values() if v is not None]
            methods[label] = {
                "spec": spec.to_dict(), "ci": {m: self.ci(label, m).to_dict() for m in MEASURES},
                "skill_change": self.skill_change(label).to_dict(), "skill_preservation": self.preservation(label),
                "mean_skill_preservation": float(np.mean(ratios)) if ratios else None,
                "vs_reference": None if label == self.reference else
                {m: self.vs_reference(label, m).to_dict() for m in MEASURES},
                "runs": [{k: v for k, v in r.items() if k != "losses"} for r in self.runs[label]],
                "items": self.items[label]}
        return {"task": self.task, "seeds": self.seeds, "reference": self.reference,
                "sizes": {"n_edits": len(self.edits), "n_local": self.n_local, "skills": dict(zip(self.skills,
                                                                                             self.skill_sizes)),
                          "epochs": self.settings.epochs, "lr": self.settings.lr,
                          "batch_size": self.settings.batch_size},
                "base": {"old_answer": proportion_ci(self.base["old_answer"]).to_dict(),
                         "locality_correct": proportion_ci(self.base["locality_correct"]).to_dict(),
                         "skill": proportion_ci(self.base["skill"]).to_dict(), "items": self.base},
                "budget_counts": self.budget_counts, "methods": methods,
                "edits": [{"question": e.question, "old_answer": e.old_answer, "new_answer": e.new_answer,
                           "paraphrases": list(e.paraphrases)} for e in self.edits]}


def _remembered(fn: Callable[..., Any], model: Any) -> Callable[..., Any]:
    """``fn(m, *args)`` with its results for ``model`` (the base) remembered: the base is scored once, not once per
    adapter."""
    memo: dict[Any, Any] = {}

    def wrapped(m, *args):
        if m is not model:
            return fn(m, *args)
        key = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        if key not in memo:
            memo[key] = fn(m, *args)
        return memo[key]

    return wrapped


def _unit_key(label: str, seed: int) -> str:
    return "".join(c if c.isalnum() or c in "=.-" else "_" for c in label) + f"-seed{seed}"


def run(cfg: Config, run: RunDir) -> Result:
    seed_everything(cfg.seeds[0], cfg.threads)
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    tok = source.tokenizer
    specs = parse_methods(cfg.methods, cfg.defaults(), allowed=ADDITIVE_METHODS)
    if cfg.match_budget:
        specs = match_budgets(specs, source.fresh(), cfg.defaults())
    edits = load_edit_set(cfg.task)[:cfg.n_edits]
    unrelated = locality_facts(World().known_facts, edits)[:cfg.n_local]
    tasks = [load_task(s, tokenizer=tok, chat_template=cfg.chat_template,
                       allow_code_execution=cfg.allow_code_execution) for s in cfg.skills]
    problems = [t.examples("test", n=cfg.n_skill) for t in tasks]
    pairs = [(qa_line(e.question), f" {e.new_answer}\n") for e in edits]
    before = source.fresh()

    def answer(model, questions: list[str]) -> list[str]:
        return generate(model, tok, [qa_line(q) for q in questions], max_new_tokens=ANSWER_TOKENS,
                        progress=cfg.progress, desc="answer questions")

    def solve(model, i: int) -> list[bool]:
        budget = min(cfg.train.max_new_tokens, tasks[i].max_new_tokens)
        return skill_accuracy(model, tok, tasks[i], problems[i], max_new_tokens=budget, progress=cfg.progress).correct

    answer, solve = _remembered(answer, before), _remembered(solve, before)
    skill_fns = {name: (lambda m, i=i: solve(m, i)) for i, name in enumerate(cfg.skills)}

    def success(model) -> float:
        """Edit success on the trained questions (greedy), the score ``train.stop_at`` stops at."""
        outputs = generate(model, tok, [qa_line(e.question) for e in edits], max_new_tokens=ANSWER_TOKENS,
                           progress=False)
        return float(np.mean(edit_success(outputs, edits)))

    stop = ({} if cfg.train.stop_at is None else
            {"validate": success, "eval_every": cfg.train.check_every, "stop_score": cfg.train.stop_at})

    def unit(spec: MethodSpec, seed: int) -> dict[str, Any]:
        seed_everything(seed, cfg.threads)
        model, history = train_adapter(source.fresh(), tok, spec, pairs, cfg.train, seed,
                                       desc=f"edit {spec.label} seed {seed}", progress=cfg.progress, **stop)
        res = evaluate_editing(before, model, edits, unrelated, answer, skill_fns)
        use = final_budget_use(model)
        return {"outcomes": res.to_dict(), "trainable_parameters": count_trainable(model),
                "budget_use_max": max(use.values()) if use else None, "train_seconds": history.seconds,
                "losses": history.losses, "stop": {"steps": history.steps, "reached_stop_at": history.reached_stop_score}}

    done = {s.label: [run.unit(_unit_key(s.label, seed), lambda s=s, seed=seed: unit(s, seed)) for seed in cfg.seeds]
            for s in specs}
    pooled = lambda d: [x for skill in cfg.skills for x in d[skill]]  # noqa: E731
    first = done[specs[0].label][0]["outcomes"]
    items = {label: {"edit_success": [u["outcomes"]["edit_success"] for u in units],
                     "paraphrase": [u["outcomes"]["paraphrase_generalisation"] for u in units],
                     "locality": [u["outcomes"]["locality"] for u in units],
                     "skill": [pooled(u["outcomes"]["skills_after"]) for u in units]}
             for label, units in done.items()}
    base = {"old_answer": first["old_answer_before"], "locality_correct": first["locality_correct_before"],
            "skill": pooled(first["skills_before"])}
    runs = {label: [{"seed": seed, **{k: v for k, v in u.items() if k != "outcomes"}}
                    for seed, u in zip(cfg.seeds, units)] for label, units in done.items()}
    return Result(specs=specs, task=cfg.task, seeds=list(cfg.seeds), edits=edits, skills=list(cfg.skills),
                  skill_sizes=[len(p) for p in problems], items=items, base=base, runs=runs,
                  budget_counts=budget_table(specs, before), n_local=len(unrelated), settings=cfg.train)


def _plot(result: Result):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    labels = [s.label for s in result.specs]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        cis = [result.ci(label, m) for m in MEASURES]
        est = [c.estimate for c in cis]
        err = error_bars(est, [c.low for c in cis], [c.high for c in cis])
        ax.bar(np.arange(len(MEASURES)) + i * width, est, width, yerr=err, capsize=2, label=label, color=f"C{i}")
    ax.set_xticks(np.arange(len(MEASURES)) + 0.4 - width / 2, list(MEASURES))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction (95% CI)")
    ax.set_title(f"knowledge editing ({len(result.edits)} edits, {result.task})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def render(result: Result, run: RunDir) -> str:
    m = result.to_dict()
    run.write_json("metrics.json", m)
    figs = [save_figure(_plot(result), run.file("figures/editing.png")),
            save_figure(plot_loss({f"{label} s{r['seed']}": r["losses"] for label, rs in result.runs.items()
                                   for r in rs}, "edit training loss"), run.file("figures/loss.png"))]
    s, b = m["sizes"], m["base"]
    lines = [f"# Knowledge editing: {s['n_edits']} edits ({result.task})", "",
             f"Seeds {result.seeds}; {s['epochs']} epochs at lr {s['lr']} (batch {s['batch_size']}) on the edited "
             f"questions; paraphrases never trained. Locality on {s['n_local']} unrelated known facts; retention "
             + ", ".join(f"{k} ({v} problems)" for k, v in s["skills"].items()) + ".", "",
             f"Before the edit (95% Wilson CI): old answer given on {fmt_ci(b['old_answer'])}% of the edited "
             f"questions; unrelated facts correct {fmt_ci(b['locality_correct'])}%; skill problems solved "
             f"{fmt_ci(b['skill'])}%.", "",
             md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in result.budget_counts],
                      ["method", "r", "k", "trainable", "vs_reference"]), "",
             "Percent with 95% CIs: 0/1 outcomes by Wilson (one seed) or the hierarchical bootstrap over seeds, then "
             "items (several seeds); per-edit paraphrase fractions and skill changes (after minus before, percentage "
             "points) by the bootstrap, which collapses to the estimate when every item is equal. Preservation is "
             "skill accuracy after / before, averaged over skills:", ""]
    rows = [{"method": label, "edit success": fmt_ci(pm["ci"]["edit_success"]),
             "paraphrase": fmt_ci(pm["ci"]["paraphrase"]), "locality": fmt_ci(pm["ci"]["locality"]),
             "skill": fmt_ci(pm["ci"]["skill"]), "skill change (pp)": fmt_ci(pm["skill_change"], signed=True),
             "preservation": None if pm["mean_skill_preservation"] is None else f"{pm['mean_skill_preservation']:.3f}",
             "steps": fmt_steps([r["stop"] for r in pm["runs"]])}
            for label, pm in m["methods"].items()]
    lines.append(md_table(rows, ["method", "edit success", "paraphrase", "locality", "skill", "skill change (pp)",
                                 "preservation", "steps"]))
    rows = [{"method": f"{label} - {result.reference}",
             **{k: fmt_ci(v, signed=True) for k, v in pm["vs_reference"].items()}}
            for label, pm in m["methods"].items() if pm["vs_reference"]]
    if rows:
        lines += ["", "Paired differences from the reference (percentage points, same seeds and items):", "",
                  md_table(rows, ["method", *MEASURES])]
    lines += [""] + [f"![{f}](figures/{f})" for f in figs]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return "\n".join(f"{label}: edit success {100 * pm['ci']['edit_success']['estimate']:.1f}%, paraphrase "
                     f"{100 * pm['ci']['paraphrase']['estimate']:.1f}%, locality "
                     f"{100 * pm['ci']['locality']['estimate']:.1f}%, skill change "
                     f"{100 * pm['skill_change']['estimate']:+.1f} pp" for label, pm in m["methods"].items())
