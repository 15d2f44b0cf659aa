"""One data spec for every `--skill`, `--task` and `--tasks` value: a string that names a task, and how to load it.

Grammar (`SPEC = BASE [ "?" KEY "=" VALUE { "&" KEY "=" VALUE } ]`):

    math, reverse, ...              an organism task (skill or instruction task, `data.get_task`)
    reverse@3                       the same at one fixed difficulty level (a positive integer)
    gsm8k:PATH                      a real data set from a local file or directory (see `data.real`); also
                                    mbpp:PATH, arc-easy:PATH, arc-challenge:PATH; without `:PATH`, the hub set
                                    (needs network)
    data/qa.jsonl                   a custom task: a JSONL file of {"prompt", "response"} rows (`data.custom_task`)

Query keys: `fewshot=K` (every kind: prefix K worked train examples, never the example itself), `checker=exact|
numeric|regex` (custom tasks), `splits=t2|source` (real sets), e.g. `data/qa.jsonl?checker=numeric&fewshot=2`.

`load_task(spec, tokenizer=..., chat_template="auto")` returns a task with `name`, `examples(split, n, seed,
difficulty)`, `check(output, example)`, `stop` and `max_new_tokens`; with a tokenizer that has a chat template, the
prompts are rendered as one user turn (`data.chat`). `check_task_spec(spec)` validates names, query keys and that
local files exist, without reading data or loading a model, so a bad spec fails at once with a one-line error.
MBPP checks run model-generated code: `load_task` refuses an MBPP spec unless `allow_code_execution=True` (the CLI's
`--allow-code-execution`), and so does `check_task_spec` when it is given that flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .chat import apply_chat, check_chat_mode
from .custom_task import CHECKERS, load_custom
from .example import Example, Task
from .real import load_arc, load_gsm8k, load_mbpp
from .real.loading import BUILDERS
from .registry import INSTRUCTION_TASKS, SKILLS, get_task
from ..errors import InputError, MissingInputError

REAL_LOADERS: dict[str, Callable[..., Task]] = {
    "gsm8k": load_gsm8k,
    "mbpp": load_mbpp,
    "arc-easy": partial(load_arc, subset="ARC-Easy"),
    "arc-challenge": partial(load_arc, subset="ARC-Challenge"),
}
OPTIONS = {"organism": ("fewshot",), "real": ("fewshot", "splits"), "custom": ("checker", "fewshot")}
SPLIT_RULES = ("t2", "source")
ORGANISM_MAX_NEW_TOKENS = 96
_NAME = re.compile(r"[A-Za-z][\w-]*")
FORMS = ("organism NAME[@LEVEL], gsm8k|mbpp|arc-easy|arc-challenge[:PATH], or FILE.jsonl of prompt/response rows, "
         "each with optional ?fewshot=K (&checker=exact|numeric|regex for .jsonl, &splits=t2|source for real sets)")


@dataclass
class TaskSpec:
    """A parsed task spec: `kind` is "organism", "real" or "custom"; `source` is the real set's local path or hub
    name ("" = the default hub set) or the custom task's file; `options` holds the parsed query values."""

    spec: str
    kind: str
    name: str
    source: str = ""
    level: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OrganismTask:
    """An organism task with generation hints (`stop`: its own, else a newline; `max_new_tokens`: its own, else 96),
    optionally fixed at one difficulty `level` (named `name@level`) and with `fewshot` worked train examples
    (the first `fewshot` + 1 of the train split at the same difficulty, never the example itself) before each
    prompt."""

    task: Any
    level: int | None = None
    fewshot: int = 0

    @property
    def name(self) -> str:
        return self.task.name if self.level is None else f"{self.task.name}@{self.level}"

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(getattr(self.task, "stop", ("\n",)))

    @property
    def max_new_tokens(self) -> int:
        return int(getattr(self.task, "max_new_tokens", ORGANISM_MAX_NEW_TOKENS))

    def examples(self, split: str, n: int | None = None, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        """The inner task's examples (at the fixed level, when there is one), with the few-shot prefix."""
        level = self.level if self.level is not None else difficulty
        examples = self.task.examples(split, n=n, seed=seed, difficulty=level)
        if not self.fewshot:
            return examples
        pool = self.task.examples("train", n=self.fewshot + 1, seed=0, difficulty=level)

        def shots(ex: Example) -> str:
            chosen = [p for p in pool if p.prompt != ex.prompt][:self.fewshot]
            return "".join(p.prompt + p.target + "\n" for p in chosen)

        return [replace(e, prompt=shots(e) + e.prompt) for e in examples]

    def check(self, output: str, example: Example) -> bool:
        """The inner task's checker."""
        return self.task.check(output, example)


def _organism_names() -> list[str]:
    return sorted({*SKILLS, *INSTRUCTION_TASKS})


def _query(spec: str, query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in query.split("&"):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not key:
            raise InputError(f"bad option {part!r} in task spec {spec!r}; write ?key=value&key=value")
        if key in options:
            raise InputError(f"option {key!r} given twice in task spec {spec!r}")
        options[key] = value.strip()
    return options


def _options(spec: str, kind: str, what: str, raw: dict[str, str]) -> dict[str, Any]:
    allowed = OPTIONS[kind]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise InputError(f"unknown option {unknown[0]!r} in task spec {spec!r}; "
                         f"allowed for {what}: {', '.join(allowed)}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "fewshot":
            if not value.isdigit():
                raise InputError(f"fewshot must be a non-negative integer, got {value!r} in task spec {spec!r}")
            out[key] = int(value)
        elif key == "checker":
            if value not in CHECKERS:
                raise InputError(f"unknown checker {value!r} in task spec {spec!r}; use one of {', '.join(CHECKERS)}")
            out[key] = value
        elif key == "splits":
            if value not in SPLIT_RULES:
                raise InputError(f"splits must be one of {', '.join(SPLIT_RULES)}, got {value!r} in task spec {spec!r}")
            out[key] = value
    return out


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in BUILDERS


def parse_task_spec(spec: str) -> TaskSpec:
    """`spec` parsed and validated: the name is known, query keys and values are allowed for its kind, and local
    files exist. Reads no data. Raises a one-line ValueError or FileNotFoundError otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"empty task spec; use {FORMS}")
    base, _, query = spec.strip().partition("?")
    raw = _query(spec, query)
    head, colon, source = base.partition(":")
    name = head.strip().lower()
    if name in REAL_LOADERS:
        source = source.strip()
        if colon and not source:
            raise InputError(f"empty path in task spec {spec!r}; write {name}:PATH, or {name} for the hub set")
        if source and not Path(source).expanduser().exists() and _looks_local(source):
            raise MissingInputError(f"no such data file or directory: {source} (task spec {spec!r})")
        return TaskSpec(spec, "real", name, source, options=_options(spec, "real", name, raw))
    path = Path(base.strip()).expanduser()
    named = bool(colon) and _NAME.fullmatch(head.strip()) is not None  # NAME:SOURCE rather than a path with a colon
    if path.is_file() or (base.strip().endswith(".jsonl") and not named):
        if path.suffix != ".jsonl":
            raise InputError(f"custom task files are .jsonl files of prompt/response rows, got {base.strip()!r}")
        if not path.is_file():
            raise MissingInputError(f"no such task file: {path} (task spec {spec!r})")
        return TaskSpec(spec, "custom", path.stem, str(path), options=_options(spec, "custom", "a .jsonl task", raw))
    if colon and name in _organism_names():
        raise InputError(f"organism task {name!r} takes no :PATH (task spec {spec!r}); write {name} or {name}@LEVEL")
    if colon:
        raise InputError(f"unknown data set {name!r} in task spec {spec!r}; known: {', '.join(REAL_LOADERS)}")
    name, at, level = base.strip().partition("@")
    try:
        get_task(name)
    except KeyError:
        raise InputError(f"unknown task {spec!r}; organism tasks: {', '.join(_organism_names())}; "
                         f"forms: {FORMS}") from None
    if at and not (level.isdigit() and int(level) > 0):
        raise InputError(f"bad difficulty {level!r} in task spec {spec!r}; "
                         f"write {name}@LEVEL with LEVEL a positive integer")
    return TaskSpec(spec, "organism", name, level=int(level) if at else None,
                    options=_options(spec, "organism", "organism tasks", raw))


def _check_execution(parsed: TaskSpec, allow_code_execution: bool) -> None:
    if parsed.kind == "real" and parsed.name == "mbpp" and not allow_code_execution:
        raise InputError(f"task {parsed.spec!r} is checked by running model-generated code; "
                         "pass --allow-code-execution (allow_code_execution=True) to run it in the sandbox")


def check_task_spec(spec: str, *, allow_code_execution: bool | None = None) -> None:
    """Validate `spec` cheaply: names, query keys and values, that local files exist, and, when
    `allow_code_execution` is given, that an MBPP spec has it (as `load_task` requires). Loads no data and no model;
    raises a one-line error."""
    parsed = parse_task_spec(spec)
    if allow_code_execution is not None:
        _check_execution(parsed, allow_code_execution)


def _merged(spec: str, key: str, given: Any, parsed: TaskSpec) -> Any:
    in_spec = parsed.options.get(key)
    if given is not None and in_spec is not None and given != in_spec:
        raise InputError(f"{key}={given!r} conflicts with {key}={in_spec!r} in task spec {spec!r}; give it once")
    return given if given is not None else in_spec


def load_task(spec: str, *, tokenizer: Any = None, chat_template: str = "auto",
              checker: str | Callable[[str, Example], bool] | None = None, allow_code_execution: bool = False,
              fewshot: int | None = None) -> Task:
    """The task named by `spec` (see the module docstring), rendered with `tokenizer`'s chat template when
    `chat_template` is "auto" and it has one ("none": never).

    `checker` (a name in `CHECKERS` or a callable `(output, example) -> bool`) and `fewshot` may also be given
    here instead of in the spec; `checker` applies to custom .jsonl tasks only. `fewshot=None` keeps the loader's
    default (no demonstrations).
    """
    check_chat_mode(chat_template)
    parsed = parse_task_spec(spec)
    _check_execution(parsed, allow_code_execution)
    if fewshot is not None and (isinstance(fewshot, bool) or not isinstance(fewshot, int) or fewshot < 0):
        raise InputError(f"fewshot must be a non-negative integer, got {fewshot!r}")
    shots = _merged(spec, "fewshot", fewshot, parsed) or 0
    if checker is not None and parsed.kind != "custom":
        raise InputError(f"checker= applies to .jsonl tasks only; {spec!r} uses its data set's own checker")
    if parsed.kind == "custom":
        task = load_custom(parsed.source, checker=_merged(spec, "checker", checker, parsed) or "exact", fewshot=shots)
    elif parsed.kind == "real":
        kwargs: dict[str, Any] = {"fewshot": shots}
        if "splits" in parsed.options:
            kwargs["splits"] = parsed.options["splits"]
        if parsed.name == "mbpp":
            kwargs["allow_code_execution"] = allow_code_execution
        loader = REAL_LOADERS[parsed.name]
        task = loader(parsed.source, **kwargs) if parsed.source else loader(**kwargs)
    else:
        task = OrganismTask(get_task(parsed.name), parsed.level, shots)
    return apply_chat(task, tokenizer, chat_template)
