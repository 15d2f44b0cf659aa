"""Knowledge editing: counterfactual edits of known facts (``data.World().edits``), measured four ways.

With ``match(output, aliases)`` = :func:`alias_match` (a normalised alias is a substring of the normalised output):

- edit success: ``mean_e match(out(q_e), new aliases of e)`` on each edited question ``q_e`` (template 0);
- paraphrase generalisation: the same, pooled over every paraphrased question (templates 1, 2, ...);
- locality: fraction of unrelated known facts whose answer is unchanged by the edit, i.e.
  ``normalize(out_before) == normalize(out_after)`` (the model's own answers are compared, so a fact the base model
  got wrong but still answers the same way counts as kept); ground-truth accuracy before and after is reported too;
- held-out skill preservation: ``score_after / score_before`` per skill, and their mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from torch import nn

from ..data import Edit, Fact, QAItem, as_qa
from .matching import alias_match, normalize

Answer = Callable[[nn.Module, list[str]], list[str]]


def edit_questions(edits: Sequence[Edit]) -> list[str]:
    """The edited question of each edit (its fact's question template 0)."""
    return [e.edited.question(0) for e in edits]


def paraphrase_questions(edits: Sequence[Edit]) -> list[list[str]]:
    """The paraphrased questions of each edit (templates 1, 2, ...)."""
    return [list(as_qa(e.edited).paraphrases) for e in edits]


def locality_facts(facts: Sequence[Fact], edits: Sequence[Edit]) -> list[Fact]:
    """Known facts about people no edit touches (the unrelated facts for locality)."""
    touched = {e.fact.entity for e in edits}
    return [f for f in facts if f.in_pretraining and f.entity not in touched]


def _check(n_outputs: int, n_items: int, what: str) -> None:
    if n_items == 0:
        raise ValueError(f"no {what} to score")
    if n_outputs != n_items:
        raise ValueError(f"{n_outputs} outputs for {n_items} {what}")


def edit_success(outputs: Sequence[str], edits: Sequence[Edit]) -> float:
    """Fraction of edited questions whose output contains a new-answer alias."""
    _check(len(outputs), len(edits), "edits")
    return float(np.mean([alias_match(o, e.new_aliases) for o, e in zip(outputs, edits)]))


def paraphrase_generalisation(outputs: Sequence[Sequence[str]], edits: Sequence[Edit]) -> float:
    """Fraction of paraphrased questions (pooled over edits) whose output contains a new-answer alias."""
    _check(len(outputs), len(edits), "edits")
    hits = [alias_match(o, e.new_aliases) for outs, e in zip(outputs, edits) for o in outs]
    if not hits:
        raise ValueError("the edits have no paraphrased outputs")
    return float(np.mean(hits))


def locality(before: Sequence[str], after: Sequence[str]) -> float:
    """Fraction of unrelated questions whose normalised answer is the same before and after the edit."""
    _check(len(after), len(before), "unrelated questions")
    return float(np.mean([normalize(b) == normalize(a) for b, a in zip(before, after)]))


def skill_preservation(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``after[skill] / before[skill]`` for each skill."""
    if set(before) != set(after):
        raise ValueError(f"skills before {sorted(before)} and after {sorted(after)} differ")
    zero = sorted(s for s, v in before.items() if v <= 0)
    if zero:
        raise ValueError(f"skill preservation is undefined for skills with a score of 0 before the edit: {zero}")
    return {s: after[s] / before[s] for s in sorted(before)}


@dataclass
class EditingResult:
    """The four editing measures (module docstring) plus the raw numbers behind locality and preservation."""

    edit_success: float
    paraphrase_generalisation: float
    locality: float
    locality_accuracy_before: float
    locality_accuracy_after: float
    skills_before: dict[str, float]
    skills_after: dict[str, float]

    @property
    def skill_preservation(self) -> dict[str, float]:
        return skill_preservation(self.skills_before, self.skills_after)

    @property
    def mean_skill_preservation(self) -> float:
        return float(np.mean(list(self.skill_preservation.values())))

    def to_dict(self) -> dict:
        return {**asdict(self), "skill_preservation": self.skill_preservation,
                "mean_skill_preservation": self.mean_skill_preservation}


def evaluate_editing(model_before: nn.Module, model_after: nn.Module, edits: Sequence[Edit],
                     unrelated: Sequence[Fact | QAItem], answer: Answer,
                     skills: Mapping[str, Callable[[nn.Module], float]]) -> EditingResult:
    """All four measures for an edited model against the model before editing.

    ``answer(model, questions) -> outputs`` answers plain questions, e.g.
    ``lambda m, qs: generate(m, tok, [qa_line(q) for q in qs], max_new_tokens=12)``; ``unrelated``: facts no edit
    should change (e.g. :func:`locality_facts`); ``skills[name](model) -> accuracy`` for the held-out skills
    (needs at least one).
    """
    if not skills:
        raise ValueError("skill preservation needs at least one skill evaluation")
    paraphrases = paraphrase_questions(edits)
    flat = answer(model_after, [q for qs in paraphrases for q in qs])
    _check(len(flat), sum(map(len, paraphrases)), "paraphrased questions")
    grouped, start = [], 0
    for qs in paraphrases:
        grouped.append(flat[start:start + len(qs)])
        start += len(qs)
    items = [as_qa(f) for f in unrelated]
    questions = [it.question for it in items]
    before, after = answer(model_before, questions), answer(model_after, questions)
    _check(len(before), len(items), "unrelated questions")
    return EditingResult(
        edit_success(answer(model_after, edit_questions(edits)), edits),
        paraphrase_generalisation(grouped, edits),
        locality(before, after),
        float(np.mean([alias_match(o, it.aliases) for o, it in zip(before, items)])),
        float(np.mean([alias_match(o, it.aliases) for o, it in zip(after, items)])),
        {s: float(f(model_before)) for s, f in skills.items()},
        {s: float(f(model_after)) for s, f in skills.items()},
    )
