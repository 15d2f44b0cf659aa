"""The task registry: skills and instruction tasks by name."""

from __future__ import annotations

from .code_task import CODE
from .example import GeneratedTask
from .instructions import INSTRUCTION_TASK_LIST
from .math_task import MATH
from .science_task import SCIENCE

_TASKS: dict[str, GeneratedTask] = {t.name: t for t in (MATH, CODE, SCIENCE, *INSTRUCTION_TASK_LIST)}
SKILLS: tuple[str, ...] = ("math", "code", "science")
INSTRUCTION_TASKS: tuple[str, ...] = tuple(t.name for t in INSTRUCTION_TASK_LIST)


def get_task(name: str) -> GeneratedTask:
    """The task called `name` (a skill or an instruction task)."""
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(_TASKS)}") from None


def register_task(task: GeneratedTask) -> None:
    """Add a task to the registry (e.g. a loader for a real data set exposing the same interface)."""
    _TASKS[task.name] = task
