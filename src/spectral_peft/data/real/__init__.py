"""Real data sets as tasks with the organism's interface: GSM8K, MBPP, ARC-Easy/Challenge, knowledge QA sets.

Every loader reads through `datasets.load_dataset` (local json/jsonl/parquet/arrow/csv files, directories of
them, `save_to_disk` datasets, {split: file} mappings, or hub names when there is network) and returns a
`RealTask` with `name`, `examples(split, n=None, seed=0, difficulty=None)` and `check(output, example)`, so
`evaluation.skill_accuracy` and the training code take it unchanged. Splits are Transformer-squared's (see each
module). MBPP checking runs generated code only in `evaluation.sandbox` and only with
`allow_code_execution=True`.

For the CLI: `load_task(spec)` turns a `--task` value into a task, whether an organism task name (`math`,
`reverse`, ...) or a real data set spec `NAME[:SOURCE]`:

    load_task("math")                                   # the organism's skill (data.get_task)
    load_task("gsm8k:/data/gsm8k")                      # a directory (train/test files, or a main/ subdir)
    load_task("arc-challenge:/data/ai2_arc")            # ARC-Challenge/ subdir, or files of that subset
    load_task("mbpp:/data/mbpp.jsonl", allow_code_execution=True)
    load_task("gsm8k")                                  # the hub (openai/gsm8k, main): needs network

Keyword arguments go to the loader (e.g. `fewshot=3`, `splits="source"`, `allow_code_execution=True`, which only
MBPP accepts); `register=True` also adds the task to the registry so `get_task(task.name)` finds it.
"""

from __future__ import annotations

from functools import partial

from ..example import Task
from ..registry import get_task, register_task
from .arc import extract_choice, load_arc
from .gsm8k import extract_number, load_gsm8k
from .knowledge import load_qa
from .loading import RealTask, load_rows
from .mbpp import CodeExecutionNotAllowed, extract_code, load_mbpp

LOADERS = {
    "gsm8k": load_gsm8k,
    "mbpp": load_mbpp,
    "arc-easy": partial(load_arc, subset="ARC-Easy"),
    "arc-challenge": partial(load_arc, subset="ARC-Challenge"),
}


def load_task(spec: str, *, register: bool = False, **kwargs) -> Task:
    """A task from a `--task` value: an organism task name, or `NAME[:SOURCE]` with NAME in gsm8k, mbpp,
    arc-easy, arc-challenge and SOURCE a local path or hub name (default: the hub data set).

    `kwargs` go to the real loader; passing them with an organism task name is an error.
    """
    name, _, source = spec.partition(":")
    name = name.strip().lower()
    if name in LOADERS:
        loader = LOADERS[name]
        task = loader(source.strip(), **kwargs) if source.strip() else loader(**kwargs)
        if register:
            register_task(task)
        return task
    if source:
        raise ValueError(f"unknown real data set {name!r} in {spec!r}; known: {sorted(LOADERS)}")
    try:
        task = get_task(name)
    except KeyError as err:
        raise ValueError(f"unknown task {spec!r}: not a registered task ({err.args[0].split('known: ')[-1]}) nor "
                         f"NAME:SOURCE with NAME in {sorted(LOADERS)}") from None
    if kwargs:
        raise ValueError(f"options {sorted(kwargs)} only apply to real data sets, not to the task {name!r}")
    return task


__all__ = [
    "CodeExecutionNotAllowed", "LOADERS", "RealTask", "extract_choice", "extract_code", "extract_number",
    "load_arc", "load_gsm8k", "load_mbpp", "load_qa", "load_rows", "load_task",
]
