"""The `Example` record, the `Task` protocol shared by every generated task, and the final-answer marker."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol
from ..errors import InputError

ANSWER_MARKER = "####"
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 2000, "val": 200, "test": 500}


@dataclass(frozen=True)
class Example:
    """One task instance: the model sees `prompt` and is trained on `target`; `answer`/`aliases` are checked."""

    prompt: str
    target: str
    answer: str
    aliases: tuple[str, ...] = ()
    task: str = ""
    difficulty: int = 0
    meta: tuple = field(default=(), compare=False)


class Task(Protocol):
    """What every task exposes: a name, seeded examples per split, and a checker of a model's output."""

    name: str

    def examples(self, split: str, n: int | None = None, seed: int = 0, difficulty: int | None = None) -> list[Example]: ...

    def check(self, output: str, example: Example) -> bool: ...


def split_of(prompt: str) -> str:
    """Assign a prompt to a split by a stable hash (80% train, 10% val, 10% test), so splits never overlap."""
    bucket = int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def final_answer(output: str) -> str:
    """The text after the last answer marker on the first marked line, or the first line when there is no marker."""
    if ANSWER_MARKER in output:
        tail = output.split(ANSWER_MARKER, 1)[1]
        return tail.split("\n", 1)[0].strip()
    return output.strip().split("\n", 1)[0].strip()


@dataclass
class GeneratedTask:
    """A task defined by a sampler `make(rng, difficulty) -> Example`, with hash-disjoint splits.

    `difficulties` lists the levels mixed when `difficulty=None`; `pretrain_difficulties` (default: the same)
    are the levels of the organism's pretraining corpus. The checker compares the extracted final answer
    with the example's answer after whitespace normalisation.
    """

    name: str
    make: Callable[[random.Random, int], Example]
    difficulties: tuple[int, ...]
    pretrain_difficulties: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.pretrain_difficulties is None:
            self.pretrain_difficulties = self.difficulties

    def examples(self, split: str, n: int | None = None, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        """`n` distinct examples of `split` (default sizes 2000/200/500), deterministic in (name, split, seed, difficulty)."""
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        n = DEFAULT_SIZES[split] if n is None else n
        rng = random.Random(f"{self.name}/{split}/{seed}/{difficulty}")
        out: list[Example] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise InputError(f"{self.name}: cannot draw {n} distinct {split} examples at difficulty {difficulty}; ask for fewer")
            level = difficulty if difficulty is not None else rng.choice(self.difficulties)
            ex = self.make(rng, level)
            if ex.prompt in seen or split_of(ex.prompt) != split:
                continue
            seen.add(ex.prompt)
            out.append(ex)
        return out

    def check(self, output: str, example: Example) -> bool:
        """True when the final answer extracted from `output` equals the example's answer (whitespace-normalised)."""
        got = " ".join(final_answer(output).split())
        return got in {" ".join(a.split()) for a in (example.answer, *example.aliases)}
