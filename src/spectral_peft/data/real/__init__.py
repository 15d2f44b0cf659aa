"""Real data sets as tasks with the organism's interface: GSM8K, MBPP, ARC-Easy/Challenge, knowledge QA sets.

Every loader reads through `datasets.load_dataset` (local json/jsonl/parquet/arrow/csv files, directories of
them, `save_to_disk` datasets, {split: file} mappings, or hub names when there is network) and returns a
`RealTask` with `name`, `examples(split, n=None, seed=0, difficulty=None)`, `check(output, example)`, `stop` and
`max_new_tokens`, so `evaluation.skill_accuracy` and the training code take it unchanged. Splits are
Transformer-squared's (see each module). MBPP checking runs generated code only in `evaluation.sandbox` and only
with `allow_code_execution=True`.

A `--task` value such as `gsm8k:/data/gsm8k` or `arc-challenge:/data/ai2_arc` is turned into one of these tasks by
`data.spec.load_task`.
"""

from __future__ import annotations

from .arc import extract_choice, load_arc
from .gsm8k import extract_number, load_gsm8k
from .knowledge import load_qa
from .loading import RealTask, load_rows
from .mbpp import CodeExecutionNotAllowed, extract_code, load_mbpp

__all__ = [
    "CodeExecutionNotAllowed", "RealTask", "extract_choice", "extract_code", "extract_number",
    "load_arc", "load_gsm8k", "load_mbpp", "load_qa", "load_rows",
]
