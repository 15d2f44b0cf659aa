"""Custom tasks: a JSONL file of `{"prompt": ..., "response": ...}` rows, checked by a chosen checker.

Each row becomes an `Example` with the prompt as given, target = the response (with a final newline added when
missing) and answer = the stripped response. The last 10% of rows (at least 1) are held out: they are the 'val'
split and also the 'test' split; 'train' is the rest, in file order. Few-shot prefixes come from the train rows
(`data.real.loading.with_fewshot`: never the example itself).

Checkers (`CHECKERS`, or any callable `(output, example) -> bool`):
- `exact`: the output equals the answer after whitespace normalisation (runs of whitespace -> one space).
- `numeric`: the last number in the output equals the last number in the answer, |a - b| <= 1e-6 max(|a|, |b|)
  (thousands separators such as `1,200` are read as 1200).
- `regex`: the answer is a Python regular expression that must match the whole first line of the stripped output.

Generation hints: `stop` is a newline, or a blank line when some response spans several lines;
`max_new_tokens` is 256.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

from .example import Example
from .real.loading import RealTask, with_fewshot
from ..errors import InputError, MissingInputError

HOLDOUT_FRACTION = 0.1
MAX_NEW_TOKENS = 256
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_number(text: str) -> float | None:
    """The last number written in `text` ('1,200.5' -> 1200.5, '-3e2' -> -300.0), or None when there is none."""
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    return float(found[-1]) if found else None


def exact_match(output: str, example: Example) -> bool:
    """The whole output equals the answer after whitespace normalisation."""
    return " ".join(output.split()) == " ".join(example.answer.split())


def numeric_match(output: str, example: Example) -> bool:
    """The last number of the output equals the answer's last number within a relative tolerance of 1e-6."""
    got, want = last_number(output), last_number(example.answer)
    return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=0.0)


def regex_match(output: str, example: Example) -> bool:
    """The answer, read as a regular expression, matches the whole stripped first line of the output."""
    first = output.strip().split("\n", 1)[0].strip()
    return re.fullmatch(example.answer, first) is not None


CHECKERS: dict[str, Callable[[str, Example], bool]] = {"exact": exact_match, "numeric": numeric_match,
                                                       "regex": regex_match}


def read_rows(path: Path, checker: str | None) -> list[Example]:
    """The rows of a prompt/response JSONL file as examples; each response is validated for the named checker."""
    rows = []
    for k, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        where = f"{path}:{k + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
            raise InputError(f"{where}: each row needs string fields 'prompt' and 'response'")
        response = row["response"]
        answer = response.strip()
        if checker == "numeric" and last_number(answer) is None:
            raise InputError(f"{where}: checker=numeric needs a number in the response, got {answer!r}")
        if checker == "regex":
            try:
                re.compile(answer)
            except re.error as e:
                raise InputError(f"{where}: checker=regex needs a valid regular expression as response ({e})") from None
        target = response if response.endswith("\n") else response + "\n"
        rows.append(Example(row["prompt"], target, answer, task=path.stem))
    return rows


def load_custom(path: str | Path, checker: str | Callable[[str, Example], bool] = "exact",
                fewshot: int = 0) -> RealTask:
    """A custom task from a prompt/response JSONL file (named after the file's stem); see the module docstring."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"no such task file: {path}")
    if isinstance(checker, str) and checker not in CHECKERS:
        raise InputError(f"unknown checker {checker!r}; use one of {sorted(CHECKERS)} "
                         "or a callable (output, example) -> bool")
    if not isinstance(checker, str) and not callable(checker):
        raise InputError(f"checker must be a name in {sorted(CHECKERS)} or a callable, got {type(checker).__name__}")
    rows = read_rows(path, checker if isinstance(checker, str) else None)
    if len(rows) < 2:
        raise InputError(f"{path}: needs at least 2 prompt/response rows, has {len(rows)}")
    cut = len(rows) - max(1, round(HOLDOUT_FRACTION * len(rows)))
    splits = {"train": rows[:cut], "val": rows[cut:], "test": rows[cut:]}
    check = CHECKERS[checker] if isinstance(checker, str) else checker
    stop = ("\n\n",) if any("\n" in e.answer for e in rows) else ("\n",)
    label = checker if isinstance(checker, str) else getattr(checker, "__name__", "callable")
    return RealTask(path.stem, with_fewshot(splits, fewshot), check, source=str(path), stop=stop,
                    max_new_tokens=MAX_NEW_TOKENS, info={"checker": label, "fewshot": fewshot})
