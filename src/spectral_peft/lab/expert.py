"""Is the SVF expert an expert? Its accuracy against the base's on held-out problems of its own skill.

The expert is the probe's scales folded into the base, ``W_e = U diag(sigma z) V^T``
(:func:`~spectral_peft.adapters.svf_fold.fold_expert`). Both models answer the same ``n`` problems of the skill's
``test`` split (never seen in training, nor in the expert's best-step selection, which uses the ``val`` split); the
gain is the paired difference ``mean(expert_i - base_i)`` with its 95% bootstrap interval over problems
(:func:`~spectral_peft.evaluation.stats.paired_difference_ci`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..adapters.svf_fold import fold_expert
from ..evaluation import skill_accuracy
from ..evaluation.stats import CI, paired_difference_ci, proportion_ci
from ..probe import Probe


@dataclass
class ExpertMeasure:
    """Per-problem outcomes (0/1) of the base and of the expert on the same held-out problems."""

    skill: str
    probe: str
    base_correct: list[float]
    expert_correct: list[float]

    @property
    def gain(self) -> CI:
        return paired_difference_ci(self.expert_correct, self.base_correct)

    @property
    def learned(self) -> bool:
        """Whether the expert beats the base: the gain's 95% interval lies above 0."""
        return self.gain.low > 0

    def summary(self) -> dict[str, Any]:
        """``{estimate, ci_low, ci_high}`` of the gain (accuracy points, 0-1) with both accuracies and ``n``."""
        gain, base, expert = self.gain, proportion_ci(self.base_correct), proportion_ci(self.expert_correct)
        return {"estimate": gain.estimate, "ci_low": gain.low, "ci_high": gain.high, "n": len(self.base_correct),
                "base_accuracy": base.estimate, "expert_accuracy": expert.estimate, "skill": self.skill,
                "probe": self.probe}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_expert(source, task, probe: Probe, n: int, seed: int = 0, progress: bool = True) -> ExpertMeasure:
    """Score a fresh base and a fresh base with ``probe``'s expert folded in on ``n`` test problems of ``task``
    (``source``: a :class:`~spectral_peft.loading.ModelSource`)."""
    examples = task.examples("test", n=n, seed=seed)

    def score(model) -> list[float]:
        res = skill_accuracy(model, source.tokenizer, task, examples, progress=progress)
        return [float(c) for c in res.correct]

    base = score(source.fresh())
    expert = score(fold_expert(source.fresh(), probe))
    return ExpertMeasure(task.name, probe.source or "", base, expert)
