"""The knowledge-injection evaluation suite (after Pletenev et al.), with per-item outcomes.

Per-item outcomes of one model (:class:`InjectionOutcome`): greedy recall of every injected fact (0/1), its
paraphrase recall (the fraction of its paraphrased questions answered), recall of every held-out HighlyKnown fact
(0/1), correctness of every test problem of every retained skill (0/1), and the summed NLL and token count of every
held-out document. Relative to a reference model ``E`` (the SVF expert), for a model ``M``:

- retention of skill ``k``: ``acc_k(M) / acc_k(E)``; mean skill retention: the mean over skills with ``acc_k(E) > 0``;
- HighlyKnown retention: ``recall_HK(M) / recall_HK(E)``;
- NLL increase: ``(sum_d nll_d(M) - sum_d nll_d(E)) / sum_d T_d`` nats per token (perplexity increase beside it).

:func:`metric_items` writes every metric as per-item values whose mean is the metric (a ratio's items are divided by
the reference's mean), so :func:`summarise` takes its intervals from :mod:`.stats`: ``proportion_ci`` for 0/1 outcomes,
``bootstrap_ci`` otherwise, ``paired_difference_ci`` against a baseline model (the same items), over ``[seeds, items]``
(the hierarchical bootstrap) when there are several seeds. The reference's mean is held fixed in a ratio's interval.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..data import World, heldout_text, load_task
from .knowledge import paraphrase_recall, recall
from .knowledge_split import KnowledgeSplit
from .perplexity import perplexity
from .skills import skill_accuracy
from .stats import bootstrap_ci, paired_difference_ci, proportion_ci
from ..errors import InputError

ORGANISM_SKILLS = ("math", "code", "science")


@dataclass
class EvalSettings:
    """Sizes of the evaluation suite.

    Attributes:
        n_skill: test problems per retained skill.
        n_ppl: held-out organism documents for perplexity (0: skip perplexity).
        max_new_tokens: generation budget for skill problems (a task's own budget, if smaller, wins).
        batch_size: prompts per generation batch for skill problems.
    """

    n_skill: int = 100
    n_ppl: int = 50
    max_new_tokens: int = 96
    batch_size: int = 64

    def validate(self) -> None:
        if min(self.n_skill, self.max_new_tokens, self.batch_size) < 1 or self.n_ppl < 0:
            raise InputError("eval.n_skill, max_new_tokens and batch_size must be >= 1 and eval.n_ppl >= 0")


# --- the evaluation suite -------------------------------------------------------------------------------------------

@dataclass
class Suite:
    """What every model of a run is evaluated on: the split's facts, ``skills`` (name -> (task, test examples)) and
    held-out documents."""

    split: KnowledgeSplit
    skills: dict[str, tuple[Any, list]]
    documents: list[str]
    settings: EvalSettings


def make_suite(split: KnowledgeSplit, skills: Sequence[str], tokenizer, settings: EvalSettings,
               chat_template: str = "auto", allow_code_execution: bool = False) -> Suite:
    """Load the retained skills (data specs) and the held-out documents."""
    tasks: dict[str, tuple[Any, list]] = {}
    for spec in skills:
        task = load_task(spec, tokenizer=tokenizer, chat_template=chat_template,
                         allow_code_execution=allow_code_execution)
        name = task.name if task.name not in tasks else spec
        tasks[name] = (task, task.examples("test", n=settings.n_skill))
    docs = heldout_text(settings.n_ppl, world=World()) if settings.n_ppl else []
    return Suite(split, tasks, docs, settings)


@dataclass
class InjectionOutcome:
    """Per-item outcomes of one model (see the module docstring)."""

    recall: list[float]
    paraphrase_recall: list[float]
    highly_known: list[float]
    skills: dict[str, list[float]]
    doc_nll: list[float]
    doc_tokens: list[int]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InjectionOutcome":
        return cls(**{k: d[k] for k in ("recall", "paraphrase_recall", "highly_known", "skills", "doc_nll",
                                        "doc_tokens", "seconds")})

    @property
    def nll(self) -> float | None:
        return sum(self.doc_nll) / sum(self.doc_tokens) if self.doc_tokens else None

    def aggregates(self) -> dict[str, Any]:
        """Means of the outcomes: recall, paraphrase recall, HighlyKnown recall, skill accuracies, NLL, perplexity."""
        nll = self.nll
        return {"recall": _mean(self.recall), "paraphrase_recall": _mean(self.paraphrase_recall),
                "highly_known_recall": _mean(self.highly_known),
                "skills": {k: _mean(v) for k, v in self.skills.items()},
                "nll": nll, "perplexity": float(np.exp(nll)) if nll is not None else None}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def evaluate_injection(model, tokenizer, suite: Suite, progress: bool = True) -> InjectionOutcome:
    """Every per-item outcome of ``model`` on ``suite``."""
    t0 = time.perf_counter()
    s, split = suite.settings, suite.split
    kw = dict(progress=progress, batch_size=128)
    rec = recall(model, tokenizer, split.inject, **kw).correct if split.inject else []
    para = paraphrase_recall(model, tokenizer, split.inject, **kw).correct if split.inject else []
    hk = recall(model, tokenizer, split.retain, **kw).correct if split.retain else []
    skills = {}
    for name, (task, examples) in suite.skills.items():
        budget = min(s.max_new_tokens, getattr(task, "max_new_tokens", s.max_new_tokens))
        res = skill_accuracy(model, tokenizer, task, examples=examples, max_new_tokens=budget,
                             batch_size=s.batch_size, progress=progress)
        skills[name] = [float(c) for c in res.correct]
    ppl = perplexity(model, tokenizer, suite.documents, progress=progress) if suite.documents else None
    return InjectionOutcome([float(c) for c in rec], [float(c) for c in para], [float(c) for c in hk], skills,
                            ppl.doc_nll if ppl else [], ppl.doc_tokens if ppl else [], time.perf_counter() - t0)


# --- retention and intervals ----------------------------------------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def retention(outcome: InjectionOutcome, reference: InjectionOutcome) -> dict[str, Any]:
    """Point estimates relative to ``reference`` (module docstring): per-skill and mean skill retention, HighlyKnown
    retention, NLL and perplexity increase."""
    m, r = outcome.aggregates(), reference.aggregates()
    per_skill = {k: _ratio(v, r["skills"].get(k)) for k, v in m["skills"].items()}
    defined = [v for v in per_skill.values() if v is not None]
    both = m["nll"] is not None and r["nll"] is not None
    return {"skill_retention": per_skill, "mean_skill_retention": float(np.mean(defined)) if defined else None,
            "highly_known_retention": _ratio(m["highly_known_recall"], r["highly_known_recall"]),
            "nll_increase": m["nll"] - r["nll"] if both else None,
            "perplexity_increase": m["perplexity"] - r["perplexity"] if both else None}


PROPORTIONS = ("recall", "highly_known_recall")


def is_proportion(metric: str) -> bool:
    """Whether ``metric``'s items are 0/1 outcomes (its interval is a proportion's)."""
    return metric in PROPORTIONS or metric.startswith("skill:")


def metric_items(outcome: InjectionOutcome, reference: InjectionOutcome) -> dict[str, np.ndarray | None]:
    """Every metric as a 1-D array of per-item values whose mean is the metric (``None``: undefined here).

    ``recall``, ``paraphrase_recall``, ``highly_known_recall`` and ``skill:K`` are the outcomes themselves;
    ``highly_known_retention`` and ``retention:K`` divide them by the reference's mean; ``mean_skill_retention``
    concatenates the defined skills' retention items, each weighted by ``N / (K n_k)`` (``N`` items over ``K`` skills,
    ``n_k`` of skill ``k``), so its mean is the mean of the per-skill retentions; ``nll_increase`` is
    ``(nll_d - nll_d(ref)) D / sum_d T_d`` per document.
    """
    def arr(values) -> np.ndarray | None:
        return np.asarray(values, dtype=np.float64) if len(values) else None

    def ratio_items(values, ref) -> np.ndarray | None:
        ref_mean = _mean(ref)
        return arr(values) / ref_mean if len(values) and ref_mean else None

    out: dict[str, np.ndarray | None] = {
        "recall": arr(outcome.recall), "paraphrase_recall": arr(outcome.paraphrase_recall),
        "highly_known_recall": arr(outcome.highly_known),
        "highly_known_retention": ratio_items(outcome.highly_known, reference.highly_known)}
    kept = {}
    for k, values in outcome.skills.items():
        out[f"skill:{k}"] = arr(values)
        out[f"retention:{k}"] = kept[k] = ratio_items(values, reference.skills.get(k, []))
    kept = {k: v for k, v in kept.items() if v is not None}
    if kept:
        n = sum(len(v) for v in kept.values())
        out["mean_skill_retention"] = np.concatenate([v * n / (len(kept) * len(v)) for v in kept.values()])
    else:
        out["mean_skill_retention"] = None
    if outcome.doc_tokens and reference.doc_tokens:
        delta = np.asarray(outcome.doc_nll) - np.asarray(reference.doc_nll)
        out["nll_increase"] = delta * len(delta) / sum(reference.doc_tokens)
    else:
        out["nll_increase"] = None
    return out


def _stack(per_seed: Sequence[np.ndarray]) -> np.ndarray:
    """``[seeds, items]`` (each seed's first ``min`` items when counts differ), or ``[items]`` for one seed."""
    n = min(len(v) for v in per_seed)
    return per_seed[0][:n] if len(per_seed) == 1 else np.stack([v[:n] for v in per_seed])


def summarise(per_seed: Sequence[Mapping[str, InjectionOutcome]], reference: str, baseline: str | None = None,
              confidence: float = 0.95, n_resamples: int = 9999) -> dict[str, dict[str, Any]]:
    """Intervals of every metric of every model over ``[seeds, items]``, and paired differences to ``baseline``.

    ``per_seed[s][model]`` are the outcomes of seed ``s``; ``reference`` names the model ratios are relative to.
    Returns ``{model: {"n_seeds", "metrics": {metric: CI dict}, "vs_baseline": {metric: CI dict}, "n_items":
    {metric: items per seed}, "perplexity": mean over seeds}}`` (a metric undefined in some seed is left out).
    """
    names = list(per_seed[0])
    items = [{m: metric_items(seed[m], seed[reference]) for m in names} for seed in per_seed]
    kw = dict(confidence=confidence, n_resamples=n_resamples)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        entry: dict[str, Any] = {"n_seeds": len(per_seed), "metrics": {}, "vs_baseline": {}, "n_items": {}}
        for metric in items[0][name]:
            values = [seed[name][metric] for seed in items]
            if any(v is None for v in values):
                continue
            x = _stack(values)
            ci = proportion_ci(x, **kw) if is_proportion(metric) else bootstrap_ci(x, **kw)
            entry["metrics"][metric] = ci.to_dict()
            entry["n_items"][metric] = int(x.shape[-1])
            base = [seed[baseline][metric] for seed in items] if baseline and name != baseline else None
            if base is not None and all(v is not None for v in base):
                entry["vs_baseline"][metric] = paired_difference_ci(x, _stack(base), **kw).to_dict()
        ppl = [seed[name].aggregates()["perplexity"] for seed in per_seed]
        entry["perplexity"] = float(np.mean(ppl)) if all(p is not None for p in ppl) else None
        out[name] = entry
    return out


# --- tables and figure points for the reports ----------------------------------------------------------------------

COLUMNS = {"recall": "recall %", "paraphrase_recall": "paraphrase recall %",
           "highly_known_retention": "HighlyKnown retention %", "mean_skill_retention": "skill retention %"}


def summary_table(summary: Mapping[str, Mapping[str, Any]], which: str = "metrics",
                  trainable: Mapping[str, int | None] | None = None) -> str:
    """A markdown table of a :func:`summarise` result, one row per model: estimate [95% CI] in % (``which=
    "vs_baseline"``: the paired differences to the baseline, in percentage points), per-skill accuracy and retention
    (estimates), and the NLL increase in nats per token."""
    from ..report import fmt_ci, md_table

    signed = which == "vs_baseline"
    sign = "+" if signed else ""
    rows = []
    for name, e in summary.items():
        cis = e[which]
        if signed and not cis:
            continue

        def cell(metric: str, scale: float = 100.0, digits: int = 1) -> str | None:
            return fmt_ci(cis[metric], scale, digits, signed) if metric in cis else None

        def per_skill(prefix: str) -> str | None:
            return " / ".join(f"{m[len(prefix):]} {100 * ci['estimate']:{sign}.0f}" for m, ci in cis.items()
                              if m.startswith(prefix)) or None

        row: dict[str, Any] = {"model": name}
        if trainable is not None:
            row["trainable"] = f"{trainable[name]:,}" if trainable.get(name) is not None else None
        row.update({header: cell(metric) for metric, header in COLUMNS.items()})
        row["skill accuracy %"] = per_skill("skill:")
        row["per-skill retention %"] = per_skill("retention:")
        row["NLL increase"] = cell("nll_increase", 1.0, 4)
        rows.append(row)
    return md_table(rows, list(rows[0]) if rows else ["model"])


def tradeoff_points(summary: Mapping[str, Mapping[str, Any]], skip: Sequence[str] = ("base",)) -> list[dict]:
    """Points of ``report.plot_tradeoff``: recall against mean skill retention, with their intervals."""
    points = []
    for name, e in summary.items():
        r, t = e["metrics"].get("recall"), e["metrics"].get("mean_skill_retention")
        if name in skip or r is None or t is None:
            continue
        points.append({"method": name, "recall": r["estimate"], "retention": t["estimate"],
                       "recall_ci": (r["low"], r["high"]), "retention_ci": (t["low"], t["high"])})
    return points
