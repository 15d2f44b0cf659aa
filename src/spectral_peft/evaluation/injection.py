"""Knowledge injection (methods.md, after Pletenev et al.): which facts are injected and which measure retention, the
injection training, and the evaluation suite with per-item outcomes.

Facts (``facts``): ``organism``, the world's held-out facts (never in pretraining) are the candidates for injection
and a sample of its known facts the candidates for retention; or a QA file (JSONL rows with ``question``,
``answers``/``aliases``, optional ``paraphrases``, read with :func:`spectral_peft.data.real.load_qa`), whose rows are
candidates for both. The candidates are categorised on the model that will be injected (the SVF expert) with
:func:`~spectral_peft.evaluation.knowledge_categories` (few-shot exemplar windows from the world's known facts or from
the same file, never the probed question): the first ``n_facts`` Unknown ones are injected, the HighlyKnown ones
(``mix_known`` of them trained too) measure retention.

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

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data import QAItem, World, as_qa, heldout_text, injection_pairs, load_task
from ..methods import MethodSpec
from ..probe import Probe
from ..training.adapter import FinetuneSettings, train_adapter
from ..training.loop import TrainResult
from .knowledge import knowledge_categories, paraphrase_recall, recall
from .perplexity import perplexity
from .skills import skill_accuracy
from .stats import bootstrap_ci, paired_difference_ci, proportion_ci

ORGANISM_FACTS = "organism"
ORGANISM_SKILLS = ("math", "code", "science")


# --- settings -------------------------------------------------------------------------------------------------------

@dataclass
class SplitSettings:
    """How candidate facts are categorised on the expert and split.

    Attributes:
        n_candidates: candidates categorised for injection (organism: held-out facts; a QA file: rows, plus n_known);
            None: 1.5 * n_facts + 8.
        n_known: organism: known facts categorised as retention candidates; a QA file: rows probed beyond n_candidates.
        n_known_eval: HighlyKnown facts held out to measure retention (at most).
        mix_known: HighlyKnown facts mixed into the injection training.
        n_windows: few-shot exemplar windows per question (greedy probes).
        n_samples: sampled answers per question (T=0.7, top-p 0.9).
    """

    n_candidates: int | None = None
    n_known: int = 100
    n_known_eval: int = 80
    mix_known: int = 0
    n_windows: int = 10
    n_samples: int = 4

    def validate(self) -> None:
        if self.n_candidates is not None and self.n_candidates < 1:
            raise ValueError(f"split.n_candidates must be >= 1 (or None), got {self.n_candidates}")
        if min(self.n_known, self.n_known_eval, self.mix_known, self.n_samples) < 0 or self.n_windows < 1:
            raise ValueError("split sizes must be >= 0 (n_windows >= 1)")


@dataclass
class InjectSettings:
    """The injection schedule (SFT on the facts' QA lines, AdamW, 3% warm-up, linear decay).

    Attributes:
        epochs: passes over the facts.
        lr: learning rate (a method spec's lr= overrides it for that method).
        batch_size: QA pairs per step.
        paraphrases: question templates trained per fact (1: the main question only).
    """

    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 8
    paraphrases: int = 1

    def validate(self) -> None:
        if min(self.epochs, self.batch_size, self.paraphrases) < 1 or not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError("train.epochs, batch_size and paraphrases must be >= 1 and train.lr > 0")


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
            raise ValueError("eval.n_skill, max_new_tokens and batch_size must be >= 1 and eval.n_ppl >= 0")


# --- facts and the knowledge split -------------------------------------------------------------------------------

@dataclass
class FactPool:
    """Candidate facts: ``candidates`` for injection, ``known`` for retention (the same rows for a QA file, where
    ``shared`` is true), and the few-shot ``exemplars`` of the categorisation."""

    name: str
    candidates: list[QAItem]
    known: list[QAItem]
    exemplars: list[QAItem]
    shared: bool


def check_facts_spec(spec: str) -> None:
    """``organism`` or an existing QA file; a one-line error otherwise."""
    if spec != ORGANISM_FACTS and not Path(spec).expanduser().is_file():
        raise FileNotFoundError(f"--facts {spec}: no such file; give organism or a QA JSONL file "
                                "(question, answers/aliases, paraphrases rows)")


def load_facts(spec: str) -> FactPool:
    """The facts ``spec`` names (see the module docstring)."""
    check_facts_spec(spec)
    if spec == ORGANISM_FACTS:
        world = World()
        known = [as_qa(f) for f in world.known_facts]
        return FactPool(spec, [as_qa(f) for f in world.heldout_facts], known, known, shared=False)
    from ..data.real import load_qa

    rows = load_qa(str(Path(spec).expanduser()))
    if len(rows) < 4:
        raise ValueError(f"--facts {spec}: {len(rows)} rows; a QA file needs at least 4 (3 few-shot exemplars + 1)")
    return FactPool(str(Path(spec).expanduser().absolute()), rows, rows, rows, shared=True)


def _qa_from_dict(d: Mapping[str, Any]) -> QAItem:
    return QAItem(d["id"], d["question"], d["answer"], tuple(d["aliases"]), tuple(d.get("paraphrases", ())))


@dataclass
class KnowledgeSplit:
    """The facts of one injection run: ``inject`` (Unknown, trained), ``mix`` (HighlyKnown, trained), ``retain``
    (HighlyKnown, held out) and the category counts of the probed candidates."""

    inject: list[QAItem]
    mix: list[QAItem] = field(default_factory=list)
    retain: list[QAItem] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def training_pairs(self, paraphrases: int = 1) -> list[tuple[str, str]]:
        """QA pairs of the trained facts (``inject`` then ``mix``)."""
        return injection_pairs(self.inject + self.mix, paraphrases=paraphrases)

    def to_dict(self) -> dict[str, Any]:
        return {"inject": [asdict(f) for f in self.inject], "mix": [asdict(f) for f in self.mix],
                "retain": [asdict(f) for f in self.retain], "counts": self.counts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KnowledgeSplit":
        return cls(*([_qa_from_dict(f) for f in d[k]] for k in ("inject", "mix", "retain")), counts=dict(d["counts"]))


def find_split(model, tokenizer, pool: FactPool, n_facts: int, settings: SplitSettings, seed: int = 0,
               progress: bool = True) -> KnowledgeSplit:
    """Categorise a seeded sample of the pool's candidates on ``model`` and split them (module docstring)."""
    rng = random.Random(f"split/{seed}")
    n_cand = settings.n_candidates or int(1.5 * n_facts) + 8
    if pool.shared:
        rows = list(pool.candidates)
        rng.shuffle(rows)
        probed = rows[:n_cand + settings.n_known]
        injectable, retainable, groups = probed, probed, {"probed": probed}
    else:
        heldout, known = list(pool.candidates), list(pool.known)
        rng.shuffle(heldout)
        rng.shuffle(known)
        injectable, retainable = heldout[:n_cand], known[:settings.n_known]
        probed = injectable + retainable
        groups = {"heldout_candidates": injectable, "known_sample": retainable}
    cats = knowledge_categories(model, tokenizer, probed, exemplar_pool=pool.exemplars, n_windows=settings.n_windows,
                                n_samples=settings.n_samples, seed=seed, progress=progress)
    unknown = [f for f in injectable if cats.categories[f.id].value == "Unknown"]
    if len(unknown) < n_facts:
        raise ValueError(f"only {len(unknown)} of {len(injectable)} candidate facts are Unknown to the expert; ask for "
                         f"fewer facts (--n-facts, now {n_facts}) or more candidates (--split.n-candidates)")
    highly = [f for f in retainable if cats.categories[f.id].value == "HighlyKnown"]
    counts = {g: _count(cats, facts) for g, facts in groups.items()}
    mix = highly[:settings.mix_known]
    return KnowledgeSplit(unknown[:n_facts], mix, highly[len(mix):len(mix) + settings.n_known_eval], counts)


def _count(cats, facts: Sequence[QAItem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in facts:
        c = cats.categories[f.id].value
        out[c] = out.get(c, 0) + 1
    return out


# --- injection training (CorDA's calibration) -----------------------------------------------------------------------

def calibration_runner(tokenizer, task, n: int = 64) -> Callable[[nn.Module], None]:
    """CorDA's calibration: run the model on ``n`` training examples of ``task`` (a task or a data spec; the data
    whose behaviour is to be preserved), one at a time (PEFT's covariance hook squeezes the batch dimension)."""
    task = load_task(task) if isinstance(task, str) else task
    texts = [e.prompt + e.target for e in task.examples("train", n=n, seed=12345)]

    @torch.no_grad()
    def run(model: nn.Module) -> None:
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))

    return run


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


def train_injection(base: nn.Module, tokenizer, spec: MethodSpec, suite: Suite, settings: InjectSettings, seed: int,
                    probe: Probe, progress: bool = True) -> tuple[nn.Module, TrainResult]:
    """Wrap ``base`` (fresh base weights; every method starts from the probe's expert, see ``methods.build_model``)
    with ``spec`` and train it on the QA pairs of the suite's split; CorDA calibrates on the first retained skill's
    training examples. Returns ``(model, history)``."""
    pairs = suite.split.training_pairs(settings.paraphrases)
    finetune = FinetuneSettings(n_train=len(pairs), n_eval=1, epochs=settings.epochs, lr=settings.lr,
                                batch_size=settings.batch_size)
    first_skill = next(iter(suite.skills.values()))[0]
    calibration = calibration_runner(tokenizer, first_skill) if spec.method == "corda" else None
    return train_adapter(base, tokenizer, spec, pairs, finetune, seed, probe=probe, calibration=calibration,
                         desc=f"inject {spec.label}", progress=progress)


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
