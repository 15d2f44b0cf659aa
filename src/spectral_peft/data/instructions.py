"""Short instruction tasks with exact checkers, for merging and continual tuning.

Each task has its own prompt format (so a merged adapter cannot lean on one shared template), and the target is
` <answer>\\n`. The organism's pretraining corpus holds a small share of them (see `corpus.INSTRUCTION_SHARE`), so the
base model half-knows them: accuracy falls with the difficulty knob, and the default test mix (`difficulties`) is
the range where the shipped organism scores 20-60% (measured in `docs/organism.md`). Difficulty = input length
(the shift range, for `caesar`; the operand size, for `add`).
"""

from __future__ import annotations

import random
import string

from .example import Example, GeneratedTask

LETTERS = "abcdefghij"


def _example(name: str, prompt: str, answer: str, difficulty: int) -> Example:
    return Example(prompt=prompt, target=f" {answer}\n", answer=answer, task=name, difficulty=difficulty)


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def make_reverse(rng: random.Random, d: int) -> Example:
    """Reverse a list of letters: `Reverse: a b c =>` -> ` c b a`."""
    items = [rng.choice(LETTERS) for _ in range(d)]
    return _example("reverse", f"Reverse: {' '.join(items)} =>", " ".join(reversed(items)), d)


def make_sort(rng: random.Random, d: int) -> Example:
    """Sort numbers ascending: `Sort ascending: 42 7 19\\nSorted:` -> ` 7 19 42`."""
    items = [rng.randint(0, 99) for _ in range(d)]
    prompt = f"Sort ascending: {' '.join(map(str, items))}\nSorted:"
    return _example("sort", prompt, " ".join(map(str, sorted(items))), d)


def make_count(rng: random.Random, d: int) -> Example:
    """Count a letter: `How many times does c appear in: a c b c?\\nCount:` -> ` 2`."""
    items = [rng.choice("abcde") for _ in range(d)]
    letter = rng.choice("abcde")
    return _example("count", f"How many times does {letter} appear in: {' '.join(items)}?\nCount:",
                    str(items.count(letter)), d)


def make_caesar(rng: random.Random, d: int) -> Example:
    """Shift each letter forward by k (1 <= k <= d): `Caesar +2: abc ->` -> ` cde`."""
    k = rng.randint(1, d)
    w = _word(rng, 3, 5)
    shifted = "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in w)
    return _example("caesar", f"Caesar +{k}: {w} ->", shifted, d)


def make_max(rng: random.Random, d: int) -> Example:
    """The largest number: `Numbers: 4, 81, 23. Largest?\\nAnswer:` -> ` 81`."""
    items = [rng.randint(0, 99) for _ in range(d)]
    return _example("max", f"Numbers: {', '.join(map(str, items))}. Largest?\nAnswer:", str(max(items)), d)


def make_acronym(rng: random.Random, d: int) -> Example:
    """Upper-case initials: `Initials of "ab cde fg" =` -> ` ACF`."""
    words = [_word(rng, 2, 5) for _ in range(d)]
    return _example("acronym", f'Initials of "{" ".join(words)}" =', "".join(w[0] for w in words).upper(), d)


def make_swap(rng: random.Random, d: int) -> Example:
    """Swap the first and last items: `Swap ends [a b c d]:` -> ` d b c a`."""
    items = [rng.choice(LETTERS) for _ in range(d)]
    swapped = [items[-1], *items[1:-1], items[0]]
    return _example("swap", f"Swap ends [{' '.join(items)}]:", " ".join(swapped), d)


def make_add(rng: random.Random, d: int) -> Example:
    """Add two numbers below 10**d, answered at once: `What is 37 plus 45?\\nSum:` -> ` 82`."""
    a, b = rng.randrange(10 ** d), rng.randrange(10 ** d)
    return _example("add", f"What is {a} plus {b}?\nSum:", str(a + b), d)


INSTRUCTION_TASK_LIST = (
    GeneratedTask("reverse", make_reverse, difficulties=(2, 3), pretrain_difficulties=(2, 3, 4, 5, 6, 7)),
    GeneratedTask("sort", make_sort, difficulties=(2,), pretrain_difficulties=(2, 3, 4, 5, 6)),
    GeneratedTask("count", make_count, difficulties=(4, 6, 8), pretrain_difficulties=(3, 4, 5, 6, 7, 8, 9)),
    GeneratedTask("caesar", make_caesar, difficulties=(1, 2, 3), pretrain_difficulties=(1, 2, 3, 4)),
    GeneratedTask("max", make_max, difficulties=(14, 16), pretrain_difficulties=(2, 3, 4, 5, 6, 7, 8)),
    GeneratedTask("acronym", make_acronym, difficulties=(3, 4, 5), pretrain_difficulties=(2, 3, 4, 5, 6)),
    GeneratedTask("swap", make_swap, difficulties=(2, 3), pretrain_difficulties=(2, 3, 4, 5, 6, 7)),
    GeneratedTask("add", make_add, difficulties=(2,), pretrain_difficulties=(1, 2)),
)
