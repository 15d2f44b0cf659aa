"""One skill of the battery measured at its test mix: greedy accuracy (per problem), its chance level, and the
teacher-forced NLL of the gold solutions (per problem).

The test mix is the skill's own ``test`` split at its default difficulty mix (for the organism's skills: math
levels 4-6, code 2-4, science 1-2); the same ``n`` problems serve all three numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..evaluation import skill_accuracy
from ..evaluation.stats import CI, proportion_ci
from .chance import chance_level
from .gold_nll import gold_nll


@dataclass
class SkillMeasure:
    """Per-problem outcomes of one skill (``correct`` 0/1, ``nll`` nats and ``tokens`` of the gold solution) and its
    chance level (``chance``, reached by ``chance_rule``)."""

    name: str
    correct: list[float]
    nll: list[float]
    tokens: list[int]
    chance: float
    chance_rule: str

    @property
    def accuracy(self) -> CI:
        """Accuracy with its 95% Wilson interval."""
        return proportion_ci(self.correct)

    @property
    def nll_per_token(self) -> float:
        return sum(self.nll) / max(1, sum(self.tokens))

    def summary(self) -> dict[str, Any]:
        """``{accuracy, ci_low, ci_high, chance, chance_rule, nll, n}`` (``nll``: nats per gold-solution token)."""
        ci = self.accuracy
        return {"accuracy": ci.estimate, "ci_low": ci.low, "ci_high": ci.high, "chance": self.chance,
                "chance_rule": self.chance_rule, "nll": self.nll_per_token, "n": len(self.correct)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_skill(model, tokenizer, task, n: int, seed: int = 0, max_new_tokens: int | None = None,
                  progress: bool = True) -> SkillMeasure:
    """Accuracy, chance level and gold NLL of ``task`` on ``n`` problems of its test split (``seed`` draws them)."""
    examples = task.examples("test", n=n, seed=seed)
    res = skill_accuracy(model, tokenizer, task, examples, max_new_tokens=max_new_tokens, progress=progress)
    scored = gold_nll(model, tokenizer, examples, progress=progress)
    chance = chance_level(examples)
    return SkillMeasure(task.name, [float(c) for c in res.correct], scored.nll, scored.tokens, chance.rate,
                        chance.rule)
