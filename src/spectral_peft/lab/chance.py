"""The chance level of a skill: the accuracy of the best answer strategy that does not read the question.

Two such strategies are scored on the very problems the skill is measured on, and the chance level is the better
of the two:

- the constant answer: always give the most frequent gold answer; its accuracy is the majority answer's share,
  ``max_a #{i : answer_i = a} / n`` (for open answers such as math's 0..99, this is the honest floor: a uniform guess
  over the value range does worse);
- a uniform pick among the problem's candidates, when the problem names them: ``mean_i 1 / k_i``. ``k_i`` is the
  number of options of a multiple-choice problem (``("options", ...)`` in the example's ``meta``, e.g. ARC) or, for
  the organism's ``science`` skill, the number of people in the ordering, ``difficulty + 1`` (the answer is one of
  them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ..data import Example
from ..errors import InputError


@dataclass(frozen=True)
class Chance:
    """The chance level ``rate`` and the strategy that reaches it (``"constant answer"`` or ``"uniform pick"``)."""

    rate: float
    rule: str


def candidates(example: Example) -> int | None:
    """How many answers the problem names (``None`` when it names none)."""
    options = dict(example.meta).get("options")
    if options:
        return len(options)
    if example.task == "science":
        return example.difficulty + 1
    return None


def chance_level(examples: Sequence[Example]) -> Chance:
    """The better of the constant-answer and uniform-pick accuracies on ``examples`` (module docstring)."""
    if not examples:
        raise InputError("the chance level needs at least one problem")
    answers = Counter(" ".join(e.answer.split()) for e in examples)
    constant = max(answers.values()) / len(examples)
    ks = [candidates(e) for e in examples]
    if all(k for k in ks):
        pick = sum(1 / k for k in ks) / len(ks)
        if pick > constant:
            return Chance(pick, "uniform pick")
    return Chance(constant, "constant answer")
