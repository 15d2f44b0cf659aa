"""ARC-Easy / ARC-Challenge (Clark et al. 2018) as tasks: multiple-choice science questions.

Rows (allenai/ai2_arc): `id`, `question`, `choices` = {`text`: [...], `label`: [...]}, `answerKey`. Options are
shown as A, B, C, ... in their given order, whatever their labels (some rows use 1-4); `answerKey` is mapped to
the letter of its position. Prompt: `Question: <q>\\nA. <opt>\\nB. <opt>\\n...Answer:`; target:
` <correct option text>. #### <letter>\\n`. The checker compares the option letter only.

Splits (`splits="t2"`, the default) follow Transformer-squared (SakanaAI/self-adaptive-llms, `tasks/arc.py`,
which trains on ARC-Easy): train = even-indexed rows of the source train split, val = odd-indexed rows, test =
the source test split. The same rule is applied to ARC-Challenge (Transformer-squared uses only its test split,
as a transfer set). `splits="source"` keeps train/validation/test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from ..example import ANSWER_MARKER, Example, final_answer
from .loading import RealTask, interleaved, load_rows, with_fewshot
from ...errors import InputError

HUB_NAME = "allenai/ai2_arc"
SUBSETS = {"arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge"}
LETTERS = "ABCDEFGH"
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-H])\b")
_LEADING = re.compile(r"^\s*\(?([A-H])(?:[).:,]|\s*$)")
_ANY = re.compile(r"\b([A-H])\b")


def extract_choice(output: str) -> str | None:
    """The chosen option letter: the first letter after the answer marker; else 'the answer is (X)'; else a
    letter that opens the output ('B', '(B)', 'B. text', not 'A plant ...'); else None."""
    if ANSWER_MARKER in output:
        m = _ANY.search(final_answer(output))
        return m.group(1) if m else None
    for pattern in (_ANSWER_IS, _LEADING):
        m = pattern.search(output)
        if m:
            return m.group(1)
    return None


def check(output: str, example: Example) -> bool:
    """ARC checker: the extracted option letter equals the correct one."""
    return extract_choice(output) == example.answer


def to_example(row: dict, name: str) -> Example:
    """One ARC row as an `Example`."""
    texts, labels = list(row["choices"]["text"]), [str(x) for x in row["choices"]["label"]]
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise InputError(f"{name} row {row.get('id')}: answerKey {key!r} not among labels {labels}")
    if len(texts) > len(LETTERS):
        raise InputError(f"{name} row {row.get('id')}: more than {len(LETTERS)} options")
    k = labels.index(key)
    options = "".join(f"{LETTERS[i]}. {t.strip()}\n" for i, t in enumerate(texts))
    prompt = f"Question: {row['question'].strip()}\n{options}Answer:"
    target = f" {texts[k].strip().rstrip('.')}. {ANSWER_MARKER} {LETTERS[k]}\n"
    return Example(prompt=prompt, target=target, answer=LETTERS[k], task=name,
                   meta=(("id", str(row.get("id", ""))), ("options", tuple(texts))))


def load_arc(path_or_name: str | Path | Mapping[str, str] = HUB_NAME, subset: str = "ARC-Easy", *,
             splits: str = "t2", fewshot: int = 0, single_split: str = "test") -> RealTask:
    """ARC-Easy or ARC-Challenge (`subset`, also 'arc-easy'/'arc-challenge') from a local source or the hub.

    A local directory may hold the subsets as subdirectories (`ARC-Easy/`, `ARC-Challenge/`, as on the hub).
    `splits`: "t2" (train/val = even/odd rows of train, test = test) or "source". `fewshot`: prefix every prompt
    with that many train examples. The task is called 'arc-easy' or 'arc-challenge'.
    """
    subset = SUBSETS.get(subset.lower(), subset)
    if subset not in SUBSETS.values():
        raise InputError(f"subset must be one of {sorted(SUBSETS.values())}, got {subset!r}")
    name = {v: k for k, v in SUBSETS.items()}[subset]
    rows = load_rows(path_or_name, subset, single_split=single_split)
    source = {split: [to_example(r, name) for r in rs] for split, rs in rows.items()}
    if splits == "t2":
        train = source.get("train", [])
        out = {"train": interleaved(train, 0), "val": interleaved(train, 1), "test": source.get("test", [])}
    elif splits == "source":
        out = {"train": source.get("train", []), "val": source.get("validation", source.get("val", [])),
               "test": source.get("test", [])}
    else:
        raise InputError(f"splits must be 't2' or 'source', got {splits!r}")
    return RealTask(name, with_fewshot(out, fewshot), check, source=str(path_or_name), max_new_tokens=64,
                    info={"subset": subset, "splits": splits, "fewshot": fewshot})
