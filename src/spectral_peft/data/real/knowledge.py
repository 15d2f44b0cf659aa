"""Knowledge question sets (e.g. the knowledge-packing sets of Pletenev et al.) through `datasets`.

Rows: `question` plus accepted answers in `answers`, `aliases`, `answer` or `possible_answers` (a list, a
string, or a JSON-encoded list, as in PopQA); optional `id` and `paraphrases`. The first answer is the canonical
one; all the listed answers are aliases. `data.load_jsonl` reads the same shape from a JSONL file without
`datasets`; `load_qa` also reads parquet/arrow/csv, saved datasets and hub names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from ..knowledge import QAItem
from .loading import load_rows
from ...errors import InputError

ANSWER_FIELDS = ("answers", "aliases", "answer", "possible_answers")


def _answers(row: dict) -> list[str]:
    found: list[str] = []
    for key in ANSWER_FIELDS:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = [value]
            else:
                value = [value]
        found += [str(v) for v in value if str(v).strip() and str(v) not in found]
    return found


def to_item(row: dict, index: int) -> QAItem:
    """One row as a `QAItem`."""
    answers = _answers(row)
    if not answers:
        raise InputError(f"row {index}: no answers (fields {ANSWER_FIELDS})")
    return QAItem(str(row.get("id", index) if row.get("id") is not None else index), row["question"].strip(),
                  answers[0], tuple(answers), tuple(row.get("paraphrases") or ()))


def load_qa(path_or_name: str | Path | Mapping[str, str], split: str | None = None, config: str | None = None) -> list[QAItem]:
    """The questions of a knowledge set (all source splits concatenated, or only `split`)."""
    rows = load_rows(path_or_name, config, single_split="train")
    if split is not None:
        if split not in rows:
            raise InputError(f"no split {split!r} in {path_or_name} (have {sorted(rows)})")
        rows = {split: rows[split]}
    items = [to_item(r, i) for rs in rows.values() for i, r in enumerate(rs)]
    if len({it.id for it in items}) != len(items):  # ids must be unique (categories are keyed by id)
        items = [QAItem(f"{k}:{it.id}", it.question, it.answer, it.aliases, it.paraphrases) for k, it in enumerate(items)]
    return items
