"""Knowledge editing: an edit set, and four per-item measures of an edited model against the model before the edit.

An edit (:class:`EditCase`) asks that ``question`` be answered with ``new_answer`` instead of ``old_answer``; its
``paraphrases`` ask the same thing in other words and are never trained on. An edit set is either the organism's
counterfactual edits (``data.World().edits``: template 0 is the question, templates 1-3 the paraphrases) or a JSONL
file with one edit per row, ``{"question", "old_answer", "new_answer", "paraphrases": [...]}`` (:func:`load_edits`).

With ``match(output, aliases)`` = :func:`alias_match` (a normalised alias is a substring of the normalised output),
each measure is kept per item, so intervals can be drawn over items (and seeds) later:

- edit success, per edit: ``match(out_after(question), new aliases)`` (0/1);
- paraphrase generalisation, per edit: the fraction of its paraphrases with ``match(out_after(p), new aliases)``;
- locality, per unrelated question: ``normalize(out_before) == normalize(out_after)`` (0/1). The model is compared
  with itself, so a fact the base model got wrong but still answers the same way counts as kept; ground-truth
  correctness before and after is kept too;
- skills, per held-out problem: correctness before and after (0/1); skill preservation is
  ``accuracy_after / accuracy_before`` per skill (undefined, ``None``, when the accuracy before is 0).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from torch import nn

from ..data import Edit, Fact, QAItem, World, as_qa
from .matching import alias_match, normalize
from ..errors import InputError, MissingInputError

Answer = Callable[[nn.Module, list[str]], list[str]]
Skill = Callable[[nn.Module], Sequence[float]]
ORGANISM_EDITS = "organism"
ROW_KEYS = ("question", "old_answer", "new_answer", "paraphrases")
ROW_FORM = '{"question", "old_answer", "new_answer", "paraphrases": [...]}'


@dataclass(frozen=True)
class EditCase:
    """One edit: ``question`` should now be answered by an alias in ``new_aliases`` (the first is the answer trained
    on) instead of one in ``old_aliases``; ``paraphrases`` are held-out rewordings of the question."""

    id: str
    question: str
    old_aliases: tuple[str, ...]
    new_aliases: tuple[str, ...]
    paraphrases: tuple[str, ...]

    @property
    def old_answer(self) -> str:
        return self.old_aliases[0]

    @property
    def new_answer(self) -> str:
        return self.new_aliases[0]


def as_case(edit: Edit | EditCase) -> EditCase:
    """An organism :class:`~spectral_peft.data.Edit` as an :class:`EditCase` (question template 0; the other
    templates are the paraphrases), or the case itself."""
    if isinstance(edit, EditCase):
        return edit
    qa = as_qa(edit.edited)
    return EditCase(edit.fact.id, qa.question, edit.fact.aliases, edit.new_aliases, qa.paraphrases)


def _row(path: Path, line: int, text: str) -> EditCase:
    where = f"{path}:{line}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg}); each line is one edit {ROW_FORM}") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object {ROW_FORM}, got {type(row).__name__}")
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)}; each row is {ROW_FORM}")
    unknown = sorted(set(row) - {*ROW_KEYS, "id"})
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; each row is {ROW_FORM} (optionally \"id\")")
    texts = [row[k] for k in ("question", "old_answer", "new_answer")]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise InputError(f"{where}: question, old_answer and new_answer must be non-empty strings")
    paraphrases = row["paraphrases"]
    if not (isinstance(paraphrases, list) and paraphrases
            and all(isinstance(p, str) and p.strip() for p in paraphrases)):
        raise InputError(f"{where}: paraphrases must be a non-empty list of non-empty strings (paraphrase "
                         "generalisation is measured on them)")
    if normalize(row["old_answer"]) == normalize(row["new_answer"]):
        raise InputError(f"{where}: new_answer {row['new_answer']!r} is the old answer; an edit must change it")
    question, old, new = (t.strip() for t in texts)
    return EditCase(str(row.get("id", line)), question, (old,), (new,), tuple(p.strip() for p in paraphrases))


def load_edits(path: str | Path) -> list[EditCase]:
    """The edits of a JSONL file, one :data:`ROW_FORM` object per line (blank lines skipped); any malformed row
    raises a one-line ``ValueError`` naming the file and line."""
    path = Path(path).expanduser()
    if path.suffix != ".jsonl":
        raise InputError(f"an edit set is {ORGANISM_EDITS!r} or a .jsonl file of {ROW_FORM} rows, got {str(path)!r}")
    if not path.is_file():
        raise MissingInputError(f"no such edits file: {path} (an edit set is {ORGANISM_EDITS!r} or a .jsonl file)")
    lines = path.read_text().splitlines()
    cases = [_row(path, k + 1, text) for k, text in enumerate(lines) if text.strip()]
    if not cases:
        raise InputError(f"{path} holds no edits; write one {ROW_FORM} object per line")
    return cases


def load_edit_set(spec: str) -> list[EditCase]:
    """The edit set ``spec`` names: ``"organism"`` (the world's counterfactual edits) or a JSONL file."""
    if spec == ORGANISM_EDITS:
        return [as_case(e) for e in World().edits]
    return load_edits(spec)


def locality_facts(facts: Sequence[Fact], edits: Sequence[Edit | EditCase]) -> list[Fact]:
    """The known facts about people no edit mentions (in its question or a paraphrase): the unrelated facts."""
    asked = [q for e in map(as_case, edits) for q in (e.question, *e.paraphrases)]
    return [f for f in facts if f.in_pretraining and not any(f.entity in q for q in asked)]


def _check(n_outputs: int, n_items: int, what: str) -> None:
    if n_items == 0:
        raise InputError(f"no {what} to score")
    if n_outputs != n_items:
        raise InputError(f"{n_outputs} outputs for {n_items} {what}")


def edit_success(outputs: Sequence[str], edits: Sequence[Edit | EditCase]) -> list[float]:
    """Per edit, 1 when the output to its question contains a new-answer alias."""
    _check(len(outputs), len(edits), "edits")
    return [float(alias_match(o, as_case(e).new_aliases)) for o, e in zip(outputs, edits)]


def paraphrase_generalisation(outputs: Sequence[Sequence[str]], edits: Sequence[Edit | EditCase]) -> list[float]:
    """Per edit, the fraction of its paraphrased questions whose output contains a new-answer alias."""
    _check(len(outputs), len(edits), "edits")
    if any(len(outs) == 0 for outs in outputs):
        raise InputError("every edit needs at least one paraphrased output")
    return [float(np.mean([alias_match(o, as_case(e).new_aliases) for o in outs])) for outs, e in zip(outputs, edits)]


def locality(before: Sequence[str], after: Sequence[str]) -> list[float]:
    """Per unrelated question, 1 when the normalised answer is the same before and after the edit."""
    _check(len(after), len(before), "unrelated questions")
    return [float(normalize(b) == normalize(a)) for b, a in zip(before, after)]


def skill_preservation(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float | None]:
    """``after[skill] / before[skill]`` for each skill (``None`` where ``before`` is 0: the ratio is undefined)."""
    if set(before) != set(after):
        raise InputError(f"skills before {sorted(before)} and after {sorted(after)} differ")
    return {s: after[s] / before[s] if before[s] > 0 else None for s in sorted(before)}


@dataclass
class EditingResult:
    """Per-item outcomes of one edited model (module docstring): lists over edits (``edit_success``,
    ``paraphrase_generalisation``, ``old_answer_before``: the model before answered with the old answer), over
    unrelated questions (``locality``, ``locality_correct_before``/``_after``) and, per skill, over problems."""

    edit_success: list[float]
    paraphrase_generalisation: list[float]
    old_answer_before: list[float]
    locality: list[float]
    locality_correct_before: list[float]
    locality_correct_after: list[float]
    skills_before: dict[str, list[float]]
    skills_after: dict[str, list[float]]

    @property
    def skill_preservation(self) -> dict[str, float | None]:
        mean = lambda d: {s: float(np.mean(v)) for s, v in d.items()}  # noqa: E731
        return skill_preservation(mean(self.skills_before), mean(self.skills_after))

    @property
    def mean_skill_preservation(self) -> float | None:
        defined = [v for v in self.skill_preservation.values() if v is not None]
        return float(np.mean(defined)) if defined else None

    def means(self) -> dict[str, float]:
        """The mean of every per-item measure."""
        return {k: float(np.mean(getattr(self, k))) for k in ("edit_success", "paraphrase_generalisation",
                                                              "old_answer_before", "locality",
                                                              "locality_correct_before", "locality_correct_after")}

    def to_dict(self) -> dict:
        return {**asdict(self), "skill_preservation": self.skill_preservation,
                "mean_skill_preservation": self.mean_skill_preservation}


def evaluate_editing(model_before: nn.Module, model_after: nn.Module, edits: Sequence[Edit | EditCase],
                     unrelated: Sequence[Fact | QAItem], answer: Answer,
                     skills: Mapping[str, Skill]) -> EditingResult:
    """Every measure for an edited model against the model before editing.

    ``answer(model, questions) -> outputs`` answers plain questions, e.g.
    ``lambda m, qs: generate(m, tok, [qa_line(q) for q in qs], max_new_tokens=12)``; ``unrelated``: questions no edit
    should change (e.g. :func:`locality_facts`); ``skills[name](model) -> per-problem correctness`` for the held-out
    skills (at least one).
    """
    if not skills:
        raise InputError("skill preservation needs at least one skill evaluation")
    cases = [as_case(e) for e in edits]
    flat = answer(model_after, [p for c in cases for p in c.paraphrases])
    _check(len(flat), sum(len(c.paraphrases) for c in cases), "paraphrased questions")
    grouped, start = [], 0
    for c in cases:
        grouped.append(flat[start:start + len(c.paraphrases)])
        start += len(c.paraphrases)
    questions = [c.question for c in cases]
    old = answer(model_before, questions)
    _check(len(old), len(cases), "edits")
    items = [as_qa(f) for f in unrelated]
    asked = [it.question for it in items]
    before, after = answer(model_before, asked), answer(model_after, asked)
    _check(len(before), len(items), "unrelated questions")
    return EditingResult(
        edit_success(answer(model_after, questions), cases),
        paraphrase_generalisation(grouped, cases),
        [float(alias_match(o, c.old_aliases)) for o, c in zip(old, cases)],
        locality(before, after),
        [float(alias_match(o, it.aliases)) for o, it in zip(before, items)],
        [float(alias_match(o, it.aliases)) for o, it in zip(after, items)],
        {s: [float(x) for x in f(model_before)] for s, f in skills.items()},
        {s: [float(x) for x in f(model_after)] for s, f in skills.items()},
    )
