"""Short instruction tasks with exact checkers, for merging and continual tuning.

Each prompt is `Task: <instruction>\\nInput: <input>\\nOutput:` and the target is ` <answer>\\n`.
These tasks are not in the organism's pretraining corpus: adapters learn them.
Difficulty = input length (or the shift range, for `caesar`).
"""

from __future__ import annotations

import random
import string

from .example import Example, GeneratedTask

LETTERS = "abcdefghij"


def _example(name: str, instruction: str, given: str, answer: str, difficulty: int) -> Example:
    prompt = f"Task: {instruction}\nInput: {given}\nOutput:"
    return Example(prompt=prompt, target=f" {answer}\n", answer=answer, task=name, difficulty=difficulty)


def make_reverse(rng: random.Random, d: int) -> Example:
    """Reverse a list of letters."""
    items = [rng.choice(LETTERS) for _ in range(d)]
    return _example("reverse", "reverse the list.", " ".join(items), " ".join(reversed(items)), d)


def make_sort(rng: random.Random, d: int) -> Example:
    """Sort numbers ascending."""
    items = [rng.randint(0, 99) for _ in range(d)]
    return _example("sort", "sort the numbers.", " ".join(map(str, items)), " ".join(map(str, sorted(items))), d)


def make_count(rng: random.Random, d: int) -> Example:
    """Count the occurrences of a letter in a string."""
    items = [rng.choice("abcde") for _ in range(d)]
    letter = rng.choice("abcde")
    return _example("count", f"count the letter {letter}.", " ".join(items), str(items.count(letter)), d)


def make_caesar(rng: random.Random, d: int) -> Example:
    """Shift each letter of a word forward in the alphabet by k (1 <= k <= d)."""
    k = rng.randint(1, d)
    w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    shifted = "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in w)
    return _example("caesar", f"shift each letter by {k}.", w, shifted, d)


def make_max(rng: random.Random, d: int) -> Example:
    """The largest of a list of numbers."""
    items = [rng.randint(0, 99) for _ in range(d)]
    return _example("max", "give the largest number.", " ".join(map(str, items)), str(max(items)), d)


def make_acronym(rng: random.Random, d: int) -> Example:
    """The upper-case initials of a list of words."""
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5))) for _ in range(d)]
    return _example("acronym", "give the initials.", " ".join(words), "".join(w[0] for w in words).upper(), d)


INSTRUCTION_TASK_LIST = (
    GeneratedTask("reverse", make_reverse, difficulties=(3, 4, 5, 6)),
    GeneratedTask("sort", make_sort, difficulties=(3, 4, 5)),
    GeneratedTask("count", make_count, difficulties=(4, 6, 8)),
    GeneratedTask("caesar", make_caesar, difficulties=(1, 2, 3)),
    GeneratedTask("max", make_max, difficulties=(3, 4, 5, 6)),
    GeneratedTask("acronym", make_acronym, difficulties=(3, 4, 5)),
)
