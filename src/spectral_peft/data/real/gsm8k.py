"""GSM8K (Cobbe et al. 2021) as a task: grade-school word problems with worked solutions ending in `#### n`.

Rows: `question`, `answer` (the solution lines, with `<<a*b=c>>` calculator annotations, then `#### n`).
Prompt: `Question: <question>\\nAnswer:`; target: the solution on one line (annotations removed unless
`keep_calculator=True`), ending in `#### n` and a newline, so the project's evaluators (which stop at the first
newline) read the whole solution. Difficulty = number of solution lines.

Splits (`splits="t2"`, the default) follow Transformer-squared (Sun et al. 2025; SakanaAI/self-adaptive-llms,
`tasks/gsm8k.py`): train = the even-indexed rows of the source train split, val = the odd-indexed rows, test = the
source test split. `splits="source"` keeps the source splits (train, validation if any, test).

Checker: the number after the first `####` in the output (or, with no marker, the last number in the output),
with `,` and `$` removed, compared numerically with the reference.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Mapping

from ..example import ANSWER_MARKER, Example, final_answer
from .loading import RealTask, interleaved, load_rows, with_fewshot
from ...errors import InputError

HUB_NAME, HUB_CONFIG = "openai/gsm8k", "main"
_CALC = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """The first number in `text` after dropping `,` and `$` (e.g. '$1,200.' -> '1200'), or None."""
    match = _NUMBER.search(text.replace(",", "").replace("$", ""))
    return match.group(0) if match else None


def extract_number(output: str) -> str | None:
    """The model's final number: after the answer marker if there is one, else the last number in the output."""
    if ANSWER_MARKER in output:
        return normalize_number(final_answer(output))
    found = _NUMBER.findall(output.replace(",", "").replace("$", ""))
    return found[-1] if found else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two number strings ('72.0' == '72'); False when either is missing."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def check(output: str, example: Example) -> bool:
    """GSM8K checker: the extracted final number equals the reference numerically."""
    return numbers_equal(extract_number(output), example.answer)


def to_example(row: dict, index: int, keep_calculator: bool = False) -> Example:
    """One GSM8K row as an `Example`."""
    solution, _, final = row["answer"].rpartition(ANSWER_MARKER)
    answer = normalize_number(final)
    if answer is None:
        raise InputError(f"gsm8k row {index}: no final answer after {ANSWER_MARKER!r}")
    steps = [line.strip() for line in solution.strip().splitlines() if line.strip()]
    if not keep_calculator:
        steps = [_CALC.sub("", s) for s in steps]
    target = " " + " ".join(steps + [f"{ANSWER_MARKER} {answer}"]) + "\n"
    return Example(prompt=f"Question: {row['question'].strip()}\nAnswer:", target=target, answer=answer,
                   task="gsm8k", difficulty=len(steps), meta=(("index", index),))


def load_gsm8k(path_or_name: str | Path | Mapping[str, str] = HUB_NAME, config: str = HUB_CONFIG, *,
               splits: str = "t2", fewshot: int = 0, keep_calculator: bool = False,
               single_split: str = "test") -> RealTask:
    """GSM8K from a local file/directory/saved dataset, a {split: file} mapping, or a hub name (network).

    `splits`: "t2" (Transformer-squared: train/val = even/odd rows of train, test = test) or "source".
    `fewshot`: prefix every prompt with that many worked train examples. A single file is taken as the
    source split `single_split`.
    """
    rows = load_rows(path_or_name, config, single_split=single_split)
    source = {name: [to_example(r, i, keep_calculator) for i, r in enumerate(rs)] for name, rs in rows.items()}
    if splits == "t2":
        train = source.get("train", [])
        out = {"train": interleaved(train, 0), "val": interleaved(train, 1), "test": source.get("test", [])}
    elif splits == "source":
        out = {"train": source.get("train", []), "val": source.get("validation", source.get("val", [])),
               "test": source.get("test", [])}
    else:
        raise InputError(f"splits must be 't2' or 'source', got {splits!r}")
    return RealTask("gsm8k", with_fewshot(out, fewshot), check, source=str(path_or_name), max_new_tokens=256,
                    info={"splits": splits, "fewshot": fewshot})
