"""Question-answer views of facts: QA lines, few-shot prompts, injection pairs, and a JSONL loader for real sets."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .facts import Fact
from ..errors import InputError


@dataclass(frozen=True)
class QAItem:
    """A knowledge question with accepted answers; built from a `Fact` or loaded from a real data set."""

    id: str
    question: str
    answer: str
    aliases: tuple[str, ...]
    paraphrases: tuple[str, ...] = ()


def qa_line(question: str, answer: str | None = None) -> str:
    """The QA format shared by pretraining and evaluation: 'Q: <question>\\nA: <answer>\\n' (or the open prompt)."""
    return f"Q: {question}\nA:" + ("" if answer is None else f" {answer}\n")


def as_qa(item: Fact | QAItem, paraphrase: int = 0) -> QAItem:
    """A `QAItem` for a fact (its question template `paraphrase`, the others as paraphrases) or the item itself."""
    if isinstance(item, QAItem):
        return item
    n = item.n_paraphrases
    others = tuple(item.question(paraphrase + j) for j in range(1, n))
    return QAItem(item.id, item.question(paraphrase), item.answer, item.aliases, others)


def fewshot_prompt(question: str, exemplars: Sequence[QAItem]) -> str:
    """A few-shot prompt: the exemplars' QA lines, then the open question."""
    return "".join(qa_line(e.question, e.answer) for e in exemplars) + qa_line(question)


def fewshot_windows(pool: Sequence[QAItem], n_windows: int = 10, shots: int = 3, seed: int = 0,
                    exclude_id: str | None = None) -> list[list[QAItem]]:
    """`n_windows` distinct exemplar windows of `shots` items drawn from `pool` (never the item `exclude_id`)."""
    rng = random.Random(f"windows/{seed}/{exclude_id}")
    candidates = [p for p in pool if p.id != exclude_id]
    return [rng.sample(candidates, shots) for _ in range(n_windows)]


def injection_pairs(facts: Iterable[Fact | QAItem], paraphrases: int = 1) -> list[tuple[str, str]]:
    """Training pairs (prompt, target) for injection: prompt = the QA-format question, target = ' answer\\n'.

    `paraphrases` question templates are used per fact (1 = the first template only).
    """
    pairs = []
    for f in facts:
        qa = as_qa(f)
        questions = (qa.question, *qa.paraphrases)[:paraphrases]
        pairs.extend((qa_line(q), f" {qa.answer}\n") for q in questions)
    return pairs


def load_jsonl(path: str | Path) -> list[QAItem]:
    """Load a real knowledge set: one JSON object per line with `question` and `answers` or `aliases` (list or str),
    optionally `id` and `paraphrases`. The first answer is the canonical one."""
    items = []
    for k, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        answers = row.get("answers", row.get("aliases", row.get("answer")))
        answers = [answers] if isinstance(answers, str) else list(answers)
        if not answers:
            raise InputError(f"{path}:{k + 1}: no answers")
        items.append(QAItem(str(row.get("id", k)), row["question"], answers[0], tuple(answers), tuple(row.get("paraphrases", ()))))
    return items
