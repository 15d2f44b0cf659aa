"""The organism's pretraining corpus (a seeded stream of documents) and the held-out text for perplexity.

A document is either a few worked problems of one skill (train split only), or a few lines about known facts
(statements and QA lines, random paraphrase templates). Instruction tasks and held-out facts never appear.
"""

from __future__ import annotations

import random
from typing import Iterator

from .example import split_of
from .facts import World
from .knowledge import qa_line
from .registry import SKILLS, get_task

MIXTURE = {"facts": 0.2, "math": 0.3, "code": 0.2, "science": 0.3}


def skill_document(rng: random.Random, skill: str, split: str = "train") -> str:
    """1 to 3 worked problems of `skill`, all from `split`."""
    task = get_task(skill)
    parts: list[str] = []
    n = rng.randint(1, 3)
    while len(parts) < n:
        ex = task.make(rng, rng.choice(task.pretrain_difficulties))
        if split_of(ex.prompt) == split:
            parts.append(ex.prompt + ex.target)
    return "".join(parts)


def fact_document(rng: random.Random, world: World) -> str:
    """3 to 8 lines about random known facts: statements or QA pairs, random paraphrase templates."""
    known = world.known_facts
    lines = []
    for _ in range(rng.randint(3, 8)):
        f = rng.choice(known)
        if rng.random() < 0.5:
            lines.append(f.statement(rng.randrange(4)) + "\n")
        else:
            lines.append(qa_line(f.question(rng.randrange(4)), f.answer))
    return "".join(lines)


def documents(seed: int = 0, world: World | None = None, split: str = "train",
              mixture: dict[str, float] | None = None) -> Iterator[str]:
    """An endless, seeded stream of pretraining documents (skills drawn from `split`)."""
    world = world or World()
    mixture = mixture or MIXTURE
    rng = random.Random(f"corpus/{seed}/{split}")
    kinds, weights = list(mixture), list(mixture.values())
    while True:
        kind = rng.choices(kinds, weights)[0]
        yield fact_document(rng, world) if kind == "facts" else skill_document(rng, kind, split)


def heldout_text(n: int = 200, seed: int = 0, world: World | None = None) -> list[str]:
    """`n` held-out pretraining-distribution documents (skills from the val split, new draws of known facts)."""
    stream = documents(seed=10_000 + seed, world=world, split="val")
    return [next(stream) for _ in range(n)]


assert set(MIXTURE) == {"facts", *SKILLS}
