"""MBPP (Austin et al. 2021) as a task: short Python functions checked by their assert tests.

Rows: the hub's `full` layout (`task_id`, `text`, `code`, `test_list`, `test_setup_code`, `challenge_test_list`)
or the `sanitized`/MBPP+ layout (`task_id`, `prompt`, `code`, `test_list`, `test_imports`). Prompt (the MBPP
paper's format): `You are an expert Python programmer, and here is your task: <text> Your code should pass these
tests:\\n\\n<asserts>\\n[BEGIN]\\n`; target: `<reference code>\\n[DONE]\\n`. Code has no single final answer, so
the target ends in `[DONE]` rather than the project's `####` marker; `RealTask.stop` is ("[DONE]",) and
`answer` holds the reference code.

Checking runs model-generated code. It happens only through `evaluation.sandbox` (an unprivileged process under
kernel limits, in fresh namespaces where they are available; docs/security.md is the threat model), and only
when the task was loaded with `allow_code_execution=True`; otherwise `check` raises `CodeExecutionNotAllowed`.
An example passes when every assert in `test_list` (plus `challenge_test_list` with `challenge_tests=True`)
holds as judged by the sandbox's judge, outside the process that runs the code: printing, exit codes or objects
that claim equality cannot fake it. Accuracy over examples is the pass@1 pass rate.

Splits (`splits="t2"`, the default) follow Transformer-squared (SakanaAI/self-adaptive-llms, `tasks/mbpp2.py`):
its problems (MBPP+ from evalplus, in task-id order) are split as the first `t2_pool` = 300 problems for
training, shuffled with Python's `random.seed(16)` and cut into `t2_train` = 200 train and 100 val, and all
later problems for test. Here every row of every source split is pooled, de-duplicated by task id and sorted
by task id before that rule is applied: on the MBPP+ problem list this reproduces their split exactly; on
other MBPP variants (e.g. the 974-problem `full`) it is the same rule on different rows. `splits="source"`
keeps the source splits (train, validation, test; the `prompt` split is left out).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Mapping

from ..example import Example
from .loading import RealTask, load_rows, meta_value, with_fewshot
from ...errors import InputError

HUB_NAME, HUB_CONFIG = "google-research-datasets/mbpp", "full"
BEGIN, DONE = "[BEGIN]", "[DONE]"
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


class CodeExecutionNotAllowed(RuntimeError):
    """Raised when checking code without the caller's explicit opt-in."""


def _task_key(task_id) -> tuple:
    text = str(task_id)
    digits = re.findall(r"\d+", text)
    return (int(digits[-1]) if digits else float("inf"), text)


def to_example(row: dict) -> Example:
    """One MBPP row (full or sanitized layout) as an `Example`; tests and setup live in `meta`."""
    text = (row.get("text") or row.get("prompt") or "").strip()
    tests = tuple(t.strip() for t in row["test_list"])
    setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or ())
    code = row["code"].replace("\r\n", "\n").strip("\n")
    prompt = (f"You are an expert Python programmer, and here is your task: {text} "
              "Your code should pass these tests:\n\n" + "\n".join(tests) + f"\n{BEGIN}\n")
    meta = (("task_id", row["task_id"]), ("tests", tests), ("setup", setup.strip()),
            ("challenge_tests", tuple(row.get("challenge_test_list") or ())))
    return Example(prompt=prompt, target=f"{code}\n{DONE}\n", answer=code, task="mbpp", meta=meta)


def extract_code(output: str) -> str:
    """The program in a model's output: inside a ``` fence if there is one, else the text before `[DONE]`."""
    fenced = _FENCE.search(output)
    code = fenced.group(1) if fenced else output.split(DONE, 1)[0]
    code = code.replace(BEGIN, "") if code.lstrip().startswith(BEGIN) else code
    return code.strip("\n")


class MBPPChecker:
    """Judges the example's asserts on the generated code in the sandbox, if and only if execution is allowed.

    True only when the sandbox's judge saw every assert hold (`SandboxResult.ok`); a crash, a timeout, a limit, or a
    value that is not plain data is a failure.
    """

    def __init__(self, allow_code_execution: bool = False, timeout: float = 10.0, memory_mb: int = 1024,
                 challenge_tests: bool = False):
        self.allow_code_execution, self.timeout, self.memory_mb = allow_code_execution, timeout, memory_mb
        self.challenge_tests = challenge_tests

    def __call__(self, output: str, example: Example) -> bool:
        if not self.allow_code_execution:
            raise CodeExecutionNotAllowed(
                "mbpp: checking runs model-generated code; opt in with allow_code_execution=True "
                "(load_mbpp/load_task; CLI --allow-code-execution) to run it in the sandbox (evaluation.sandbox)")
        from ...evaluation.sandbox import run_with_tests  # lazy: keeps data importable without evaluation

        tests = list(meta_value(example, "tests", ()))
        if self.challenge_tests:
            tests += list(meta_value(example, "challenge_tests", ()))
        result = run_with_tests(extract_code(output), tests, setup=meta_value(example, "setup", ""),
                                timeout=self.timeout, memory_mb=self.memory_mb)
        return result.ok


def t2_split(examples: list[Example], pool: int = 300, n_train: int = 200, seed: int = 16) -> dict[str, list[Example]]:
    """Transformer-squared's MBPP split of problems in task-id order (see the module docstring)."""
    head, tail = examples[:pool], examples[pool:]
    order = list(range(len(head)))
    random.Random(seed).shuffle(order)  # the same permutation as random.seed(seed); random.shuffle(order)
    return {"train": [head[i] for i in order[:n_train]], "val": [head[i] for i in order[n_train:]], "test": tail}


def load_mbpp(path_or_name: str | Path | Mapping[str, str] = HUB_NAME, config: str = HUB_CONFIG, *,
              allow_code_execution: bool = False, splits: str = "t2", t2_pool: int = 300, t2_train: int = 200,
              t2_seed: int = 16, fewshot: int = 0, timeout: float = 10.0, memory_mb: int = 1024,
              challenge_tests: bool = False, single_split: str = "test") -> RealTask:
    """MBPP from a local file/directory/saved dataset, a {split: file} mapping, or a hub name (network).

    `allow_code_execution` must be True for `check` to run generated code (in the sandbox, with `timeout`
    seconds and `memory_mb` MiB per program). `splits`: "t2" (see the module docstring; `t2_*` set its sizes
    and seed) or "source". `fewshot`: prefix every prompt with that many train examples.
    """
    rows = load_rows(path_or_name, config, single_split=single_split)
    if splits == "t2":
        seen, pooled = set(), []
        for name, rs in rows.items():
            for r in rs:
                if r["task_id"] not in seen:
                    seen.add(r["task_id"])
                    pooled.append(r)
        pooled.sort(key=lambda r: _task_key(r["task_id"]))
        out = t2_split([to_example(r) for r in pooled], t2_pool, t2_train, t2_seed)
    elif splits == "source":
        ex = {name: [to_example(r) for r in rs] for name, rs in rows.items()}
        out = {"train": ex.get("train", []), "val": ex.get("validation", ex.get("val", [])), "test": ex.get("test", [])}
    else:
        raise InputError(f"splits must be 't2' or 'source', got {splits!r}")
    checker = MBPPChecker(allow_code_execution, timeout, memory_mb, challenge_tests)
    return RealTask("mbpp", with_fewshot(out, fewshot), checker, source=str(path_or_name), stop=(DONE,),
                    max_new_tokens=512, info={"splits": splits, "fewshot": fewshot,
                                              "allow_code_execution": allow_code_execution})
