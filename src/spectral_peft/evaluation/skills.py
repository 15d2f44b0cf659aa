"""Skill accuracy: greedy worked solutions, checked by the task's own checker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..data import Example, get_task
from .generation import generate


@dataclass
class SkillResult:
    """Accuracy of one task with per-example correctness and outputs."""

    task: str
    accuracy: float
    correct: list[bool]
    outputs: list[str]

    @property
    def n(self) -> int:
        """Number of examples evaluated."""
        return len(self.correct)


def skill_accuracy(model, tokenizer, task, examples: Sequence[Example] | None = None, n: int = 500,
                   split: str = "test", max_new_tokens: int | None = None, batch_size: int = 64, prefix: str = "",
                   progress: bool = True) -> SkillResult:
    """Exact-match accuracy of greedy outputs on `examples` (default: the first `n` of `split`).

    `task` is a task object or a registry name; `prefix` (e.g. few-shot demonstrations for a general LM) is
    prepended to every prompt. Generation stops at the task's stop strings (``task.stop``, default the end of the
    first line) and after ``max_new_tokens`` (default ``task.max_new_tokens``, else 96).
    """
    task = get_task(task) if isinstance(task, str) else task
    examples = list(examples) if examples is not None else task.examples(split, n=n)
    max_new_tokens = max_new_tokens or getattr(task, "max_new_tokens", 96)
    outputs = generate(model, tokenizer, [prefix + e.prompt for e in examples], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, stop=getattr(task, "stop", ("\n",)), progress=progress,
                       desc=f"eval {task.name}")
    correct = [task.check(o, e) for o, e in zip(outputs, examples)]
    return SkillResult(task.name, sum(correct) / max(1, len(correct)), correct, outputs)
