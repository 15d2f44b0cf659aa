"""Spectral drift and pretraining degradation of fine-tuned adapters (HiP-LoRA paper, methods.md).

For each method spec in ``methods`` and each seed, one adapter is trained on ``task`` from the same base model (with
``match_budget``, a LoRA-family spec without an explicit ``r`` gets the rank matching the first HiP-LoRA spec's
count).

Interference, per adapted matrix ``W`` with update ``dW`` (``evaluation.interference``, float64, the top ``k``
singular triplets of ``W``): the energy fraction ``||U_k^T dW V_k||_F^2 / ||dW||_F^2``, the subspace invariance
``||(I - U_k U_k^T)(W + dW) V_k||_F / ||(W + dW) V_k||_F`` (0 exactly when ``span(U_k)`` stays invariant) and the
relative change of the top-k singular values. Principal angles are kept in ``metrics.json`` but not reported: for a
block-diagonal update (HiP-LoRA, OPLoRA) the largest one is 0 or pi/2 by construction.

Degradation, adapted minus base on the same items: the pooled NLL on ``n_ppl`` held-out pretraining documents
(``data.heldout_text``), the accuracy on ``n_skill`` test problems of each skill (math, code, science; greedy, each
skill's own generation budget) and on ``n_facts`` known facts (greedy recall), and the task's own test accuracy.

Every per-item outcome is kept as a ``[seeds, items]`` array (the base model's: one row, shared by every seed): per
document the summed NLL and the token count, 0/1 per problem and per fact. Intervals come from
``evaluation.stats``: ``paired_difference_ci`` for adapted minus base and for method minus reference (the first
method; paired by seed and item, hierarchical bootstrap over seeds, then items) and ``proportion_ci`` for accuracies.
The pooled NLL change is a ratio estimate, ``sum_i (a_i - b_i) / T`` over documents ``i`` with ``T`` the base
model's predicted-token count; it is the mean of the per-document columns ``(a_i - b_i) n / T``, which are what is
resampled. The base evaluation and each (method, seed) are resumable units (``--resume``).

Writes ``metrics.json`` (summary, per-item outcomes, per-matrix interference rows), ``report.md`` and ``figures/``
(interference per layer, degradation, training loss, HiP-LoRA budget use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..data import SKILLS, World, check_task_spec, heldout_text, load_task
from ..data.chat import check_chat_mode
from ..evaluation import perplexity, recall, skill_accuracy
from ..evaluation.interference import INTERFERENCE_METRICS, InterferenceRow, interference_table, plot_interference
from ..evaluation.stats import CI, paired_difference_ci, proportion_ci
from ..loading import ModelSource, check_device, check_dtype, check_model_name, seed_everything
from ..merging import adapter_deltas
from ..methods import ADDITIVE_METHODS, MethodSpec, budget_table, count_trainable, match_budgets, parse_methods
from ..report import error_bars, fmt_ci, fmt_steps, md_table, plot_budget_use, plot_loss, save_figure
from ..runs import RunDir, safe_name
from ..training.adapter import FinetuneSettings, final_budget_use, train_adapter
from ..training.matched_gain import task_stop
from ..validation import check_at_least, check_constructed, check_distinct, check_finite_numbers, check_methods

GENERAL = (*SKILLS, "facts")  # the general evaluations, besides held-out NLL
REPORTED = ("energy_fraction", "invariance", "sv_rel_change", "sv_max_rel_change", "fro_ratio", "intruders")


@dataclass
class Config:
    """Train every method on one task over seeds; measure spectral interference and pretraining degradation.

    Attributes:
        methods: comma-separated method specs (lora, hiplora:rho=0.5, hiplora:mode=penalty, oplora, ...); the first
            is the reference of the paired differences. Methods must add a weight update dW (lora, dora, oplora,
            milora, svft, hiplora).
        task: the fine-tuning task: organism task (sort, max@3, math, ...), gsm8k:PATH, mbpp:PATH, arc-easy:PATH,
            arc-challenge:PATH, or a prompt/response JSONL (PATH.jsonl?checker=exact|numeric|regex).
        model: "organism", a checkpoint directory or a Hugging Face model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        seeds: training seeds (adapter initialisation and batch order), one adapter per method and seed.
        r: default LoRA rank (HiP-LoRA's residual rank) for a spec that does not set r.
        k: default HiP-LoRA principal size (OPLoRA's protected size) for a spec that does not set k; also the top-k of
            the interference metrics.
        targets: default target matrices, mlp or all-linear.
        match_budget: give a LoRA-family method without an explicit r the rank matching the first HiP-LoRA spec
            of methods (HiP-LoRA(r, k) if there is none).
        train: training sizes; n_eval test examples of the task are scored.
        n_ppl: held-out pretraining documents for the NLL change.
        n_skill: test problems per general skill (math, code, science).
        n_facts: known facts for the recall change.
        chat_template: auto (use the tokenizer's chat template when it has one) or none.
        allow_code_execution: let MBPP's checker run model-written code in the sandbox.
        threads: torch CPU threads (runs are deterministic for a seed and a thread count).
        progress: show progress bars.
    """

    methods: str = "lora,hiplora:rho=0.02,hiplora,hiplora:rho=0.5,hiplora:mode=penalty,oplora"
    task: str = "max"
    model: str = "organism"
    device: str = "auto"
    dtype: str = "auto"
    seeds: tuple[int, ...] = (0, 1, 2)
    r: int = 8
    k: int = 16
    targets: str = "all-linear"
    match_budget: bool = True
    train: FinetuneSettings = field(default_factory=FinetuneSettings)
    n_ppl: int = 100
    n_skill: int = 64
    n_facts: int = 100
    chat_template: str = "auto"
    allow_code_execution: bool = False
    threads: int = 1
    progress: bool = True

    def defaults(self) -> MethodSpec:
        return MethodSpec(r=self.r, k=self.k, targets=self.targets)

    def validate(self) -> None:
        check_finite_numbers(self)
        check_constructed(self.train)
        check_at_least(1, n_ppl=self.n_ppl, n_skill=self.n_skill, n_facts=self.n_facts)
        check_at_least(1, threads=self.threads)
        check_distinct("seeds", self.seeds)
        check_methods(self.methods, self.defaults(), allowed=ADDITIVE_METHODS)
        check_task_spec(self.task, allow_code_execution=self.allow_code_execution)
        check_chat_mode(self.chat_template)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK = {"methods": "lora,hiplora,hiplora:mode=penalty", "seeds": (0,), "n_ppl": 32, "n_skill": 16, "n_facts": 40,
         "train.n_train": 256, "train.n_eval": 32, "train.epochs": 2}


@dataclass
class Outcomes:
    """Per-item outcomes of one model over seeds, ``[seeds, items]`` arrays (the base model: one row).

    ``nll``/``tokens``: per held-out document, the summed next-token NLL and the number of predicted tokens;
    ``scores``: 0/1 per item for ``task`` (the fine-tuning task's test examples), each skill and ``facts``.
    """

    nll: np.ndarray
    tokens: np.ndarray
    scores: dict[str, np.ndarray]

    @classmethod
    def stack(cls, units: list[dict[str, Any]]) -> Outcomes:
        """Rows from per-seed evaluations (``{"nll", "tokens", "scores"}``, as :func:`run`'s units store them)."""
        rows = lambda key: np.array([u[key] for u in units], dtype=float)  # noqa: E731
        return cls(rows("nll"), rows("tokens"),
                   {n: np.array([u["scores"][n] for u in units], dtype=float) for n in units[0]["scores"]})

    @property
    def pooled_nll(self) -> float:
        """Mean NLL per predicted token, pooled over seeds and documents."""
        return float(self.nll.sum() / self.tokens.sum())

    def to_dict(self) -> dict[str, Any]:
        return {"nll": self.nll, "tokens": self.tokens, "scores": self.scores}


@dataclass
class Result:
    """What the drift study measured. ``specs[0]`` is the reference; per method label: its outcomes, its interference
    rows ``[seed][matrix]``, HiP-LoRA budget use per seed, trainable count, loss curves per seed and the first seed's
    step logs."""

    task: str
    model: str
    specs: list[MethodSpec]
    seeds: list[int]
    k: int
    sizes: dict[str, int]
    budget_counts: list[dict[str, Any]]
    base: Outcomes
    methods: dict[str, Outcomes]
    interference: dict[str, list[list[dict[str, Any]]]]
    budget_use: dict[str, list[dict[str, float] | None]]
    trainable: dict[str, int]
    losses: dict[str, list[list[float]]]
    logs: dict[str, list[dict[str, float]]]
    stops: dict[str, list[dict[str, Any]]]

    @property
    def reference(self) -> str:
        return self.specs[0].label

    def _other(self, against: str | None) -> Outcomes:
        return self.base if against is None else self.methods[against]

    def delta_nll(self, label: str, against: str | None = None) -> CI:
        """Pooled NLL change of ``label`` minus the base (or minus method ``against``), paired by seed and document:
        the mean of the per-document columns ``nll * n / T`` (``T`` = the base's predicted-token count)."""
        a, b = self.methods[label].nll, self._other(against).nll
        scale = a.shape[1] / self.base.tokens[0].sum()
        return paired_difference_ci(a * scale, _seed_rows(b, len(a)) * scale)

    def change(self, label: str, name: str, against: str | None = None) -> CI:
        """Accuracy change on ``name`` of ``label`` minus the base (or minus method ``against``), paired."""
        a, b = self.methods[label].scores[name], self._other(against).scores[name]
        return paired_difference_ci(a, _seed_rows(b, len(a)))

    def interference_mean(self, label: str) -> dict[str, float | None]:
        """Each interference metric averaged over matrices and seeds (NaN entries, from ``dW = 0``, skipped; ``None``
        when every entry is NaN)."""
        rows = [r for seed_rows in self.interference[label] for r in seed_rows]
        return {m: float(np.nanmean([r[m] for r in rows])) if np.isfinite([r[m] for r in rows]).any() else None
                for m in INTERFERENCE_METRICS}

    def to_dict(self) -> dict[str, Any]:
        names = list(self.base.scores)
        methods = {}
        for spec in self.specs:
            label, out = spec.label, self.methods[spec.label]
            vs = None if label == self.reference else {
                "delta_nll": self.delta_nll(label, self.reference).to_dict(),
                **{n: self.change(label, n, self.reference).to_dict() for n in names}}
            methods[label] = {
                "spec": spec.to_dict(), "trainable_parameters": self.trainable[label], "nll": out.pooled_nll,
                "delta_nll": self.delta_nll(label).to_dict(),
                "accuracy": {n: proportion_ci(out.scores[n]).to_dict() for n in names},
                "change": {n: self.change(label, n).to_dict() for n in names}, "vs_reference": vs,
                "budget_use_max": [max(u.values()) if u else None for u in self.budget_use[label]],
                "training": self.stops[label], "interference_mean": self.interference_mean(label)}
        return {"recipe": "drift", "task": self.task, "model": self.model, "reference": self.reference,
                "seeds": self.seeds, "k": self.k, "sizes": self.sizes, "budget_counts": self.budget_counts,
                "base": {"nll": self.base.pooled_nll,
                         "accuracy": {n: proportion_ci(self.base.scores[n]).to_dict() for n in names}},
                "methods": methods, "interference": self.interference,
                "items": {"base": self.base.to_dict(), **{k: v.to_dict() for k, v in self.methods.items()}}}


def _seed_rows(x: np.ndarray, n_seeds: int) -> np.ndarray:
    """``x`` with one row per seed: the base model's single row repeated, a method's rows as they are."""
    return np.repeat(x, n_seeds, axis=0) if len(x) == 1 else x



def run(cfg: Config, run: RunDir) -> Result:
    seed_everything(cfg.seeds[0], cfg.threads)
    source = ModelSource(cfg.model, cfg.device, cfg.dtype)
    tok = source.tokenizer
    base = source.fresh()
    task = load_task(cfg.task, tokenizer=tok, chat_template=cfg.chat_template,
                     allow_code_execution=cfg.allow_code_execution)
    specs = parse_methods(cfg.methods, cfg.defaults(), allowed=ADDITIVE_METHODS)
    if cfg.match_budget:
        specs = match_budgets(specs, base, cfg.defaults())
    s = cfg.train
    pairs = [(e.prompt, e.target) for e in task.examples("train", n=s.n_train)]
    examples = task.examples("test", n=s.n_eval)
    budget = min(s.max_new_tokens, task.max_new_tokens)
    texts = heldout_text(cfg.n_ppl)
    skills = {name: load_task(name, tokenizer=tok, chat_template=cfg.chat_template) for name in SKILLS}
    skill_examples = {name: t.examples("test", n=cfg.n_skill) for name, t in skills.items()}
    facts = World().known_facts[:cfg.n_facts]

    def flags(correct) -> list[float]:
        return [float(c) for c in correct]

    def evaluate(model) -> dict[str, Any]:
        ppl = perplexity(model, tok, texts, progress=cfg.progress)
        scores = {"task": flags(skill_accuracy(model, tok, task, examples, max_new_tokens=budget,
                                               progress=cfg.progress).correct)}
        for name, t in skills.items():
            scores[name] = flags(skill_accuracy(model, tok, t, skill_examples[name], progress=cfg.progress).correct)
        scores["facts"] = flags(recall(model, tok, facts, progress=cfg.progress).correct)
        return {"nll": ppl.doc_nll, "tokens": ppl.doc_tokens, "scores": scores}

    def adapter_unit(spec: MethodSpec, seed: int) -> dict[str, Any]:
        seed_everything(seed, cfg.threads)
        model, history = train_adapter(source.fresh(), tok, spec, pairs, s, seed,
                                       desc=f"drift {spec.label} seed {seed}", progress=cfg.progress,
                                       **task_stop(task, tok, s, budget))
        rows = interference_table(base, adapter_deltas(model), cfg.k, progress=cfg.progress)
        return {**evaluate(model), "interference": [r.to_dict() for r in rows], "budget_use": final_budget_use(model),
                "trainable": count_trainable(model), "losses": history.losses, "logs": history.logs,
                "stop": {"steps": history.steps, "reached_stop_at": history.reached_stop_score}}

    base_unit = run.unit("base", lambda: evaluate(base))
    units = {spec.label: [run.unit(f"{safe_name(spec.label)}-seed{seed}",
                                   lambda spec=spec, seed=seed: adapter_unit(spec, seed)) for seed in cfg.seeds]
             for spec in specs}
    sizes = {"n_train": len(pairs), "epochs": s.epochs, "n_eval": len(examples), "n_ppl": len(texts),
             **{f"n_{name}": len(exs) for name, exs in skill_examples.items()}, "n_facts": len(facts)}
    return Result(task=task.name, model=source.name, specs=specs, seeds=list(cfg.seeds), k=cfg.k, sizes=sizes,
                  budget_counts=budget_table(specs, base), base=Outcomes.stack([base_unit]),
                  methods={label: Outcomes.stack(u) for label, u in units.items()},
                  interference={label: [x["interference"] for x in u] for label, u in units.items()},
                  budget_use={label: [x["budget_use"] for x in u] for label, u in units.items()},
                  trainable={label: u[0]["trainable"] for label, u in units.items()},
                  losses={label: [x["losses"] for x in u] for label, u in units.items()},
                  logs={label: u[0]["logs"] for label, u in units.items()},
                  stops={label: [x["stop"] for x in u] for label, u in units.items()})


def plot_degradation(m: dict[str, Any]) -> Figure:
    """Left: pooled NLL change per method; right: accuracy change (points) per general evaluation; 95% CI bars."""
    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.2]})
    labels = list(m["methods"])
    d = [m["methods"][label]["delta_nll"] for label in labels]
    ax1.bar(range(len(labels)), [x["estimate"] for x in d], color=[f"C{i % 10}" for i in range(len(labels))],
            yerr=error_bars(*([x[k] for x in d] for k in ("estimate", "low", "high"))), capsize=3)
    ax1.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax1.set_ylabel("delta NLL (nats/token)")
    ax1.axhline(0, color="k", lw=0.6)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        c = [m["methods"][label]["change"][n] for n in GENERAL]
        ax2.bar(np.arange(len(GENERAL)) + i * width, [100 * x["estimate"] for x in c], width, label=label,
                yerr=error_bars(*([x[k] for x in c] for k in ("estimate", "low", "high")), scale=100),
                capsize=2, color=f"C{i % 10}")
    ax2.set_xticks(np.arange(len(GENERAL)) + 0.4 - width / 2, GENERAL)
    ax2.set_ylabel("accuracy change (points)")
    ax2.axhline(0, color="k", lw=0.6)
    ax2.legend(fontsize=7)
    fig.suptitle(f"pretraining degradation after fine-tuning on {m['task']}")
    fig.tight_layout()
    return fig


def render(result: Result, run: RunDir) -> str:
    m = result.to_dict()
    run.write_json("metrics.json", m)
    rows = {label: [InterferenceRow.from_dict(r) for seed_rows in result.interference[label] for r in seed_rows]
            for label in result.interference}
    figs = [save_figure(plot_interference(rows, metric, title=f"{metric} per layer (k = {result.k}, {result.task})"),
                        run.file(f"figures/interference_{metric}.png")) for metric in REPORTED[:3]]
    figs.append(save_figure(plot_degradation(m), run.file("figures/degradation.png")))
    figs.append(save_figure(plot_loss({label: losses[0] for label, losses in result.losses.items()},
                                      f"training loss on {result.task} (seed {result.seeds[0]})"),
                            run.file("figures/loss.png")))
    if any("budget_use_max" in r for logs in result.logs.values() for r in logs):
        figs.append(save_figure(plot_budget_use(result.logs), run.file("figures/budget_use.png")))

    s, pts = result.sizes, lambda ci: fmt_ci(ci, signed=True)
    lines = [f"# Spectral drift and pretraining degradation (`{result.task}`)", "",
             f"Model `{result.model}`, seeds {result.seeds}; {s['n_train']} training pairs x {s['epochs']} epoch(s); "
             f"task accuracy on {s['n_eval']} test examples; degradation on {s['n_ppl']} held-out documents, "
             + ", ".join(f"{s[f'n_{n}']} {n} problems" for n in SKILLS) + f" and {s['n_facts']} known facts.", "",
             f"Base: NLL {m['base']['nll']:.4f}; accuracy (%) "
             + ", ".join(f"{n} {fmt_ci(ci)}" for n, ci in m["base"]["accuracy"].items()) + ".", "",
             "Trainable parameters:", "",
             md_table([{**r, "vs_reference": f"{100 * r['vs_reference']:+.2f}%"} for r in result.budget_counts],
                      ["method", "r", "k", "trainable", "vs_reference"]),
             "Adapted minus base (95% CIs: paired hierarchical bootstrap over seeds, then items; accuracies: Wilson "
             "for one seed, hierarchical bootstrap for several). NLL in nats/token, changes in percentage points:", ""]
    table = [{"method": label, "task acc (%)": fmt_ci(pm["accuracy"]["task"]), "task (pp)": pts(pm["change"]["task"]),
              "delta NLL": fmt_ci(pm["delta_nll"], 1, 4, True), **{f"{n} (pp)": pts(pm["change"][n]) for n in GENERAL},
              "budget use": ", ".join("–" if u is None else f"{u:.2f}" for u in pm["budget_use_max"]),
              "steps": fmt_steps(pm["training"])}
             for label, pm in m["methods"].items()]
    lines += [md_table(table, list(table[0])), f"Method minus `{result.reference}` (paired by seed and item):", ""]
    table = [{"method": label, "delta NLL": fmt_ci(pm["vs_reference"]["delta_nll"], 1, 4, True),
              **{f"{n} (pp)": pts(pm["vs_reference"][n]) for n in ("task", *GENERAL)}}
             for label, pm in m["methods"].items() if pm["vs_reference"]]
    lines += [md_table(table, ["method", "delta NLL", *[f"{n} (pp)" for n in ("task", *GENERAL)]]) if table
              else "(one method only)\n",
              f"Interference, mean over matrices and seeds (k = {result.k}). invariance = "
              "||(I - U_k U_k^T)(W + dW) V_k||_F / ||(W + dW) V_k||_F, 0 exactly when span(U_k) stays invariant; "
              "principal angles are in metrics.json only (0 or pi/2 by construction for block-diagonal updates):", ""]
    mean = {label: {k: "–" if v is None else f"{v:.4g}" for k, v in pm["interference_mean"].items()}
            for label, pm in m["methods"].items()}
    lines += [md_table([{"method": label, **v} for label, v in mean.items()], ["method", *REPORTED])]
    lines += [f"![{f}](figures/{f})" for f in figs]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return "\n".join(f"{label}: delta NLL {fmt_ci(pm['delta_nll'], 1, 4, True)}, task accuracy "
                     f"{fmt_ci(pm['accuracy']['task'])}%, invariance {mean[label]['invariance']}"
                     for label, pm in m["methods"].items())
