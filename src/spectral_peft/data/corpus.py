"""The organism's pretraining corpus (a seeded stream of documents) and the held-out text for perplexity.

A document is a few worked problems of one skill, a few solved instances of one instruction task (train split
only, both), or a few lines about known facts (statements and QA lines, random paraphrase templates). Held-out facts
never appear.

Two choices make the organism a lab rather than a solved world:

- `SHORTCUT_SHARE`: that share of math problems is written with no working, only ` #### answer`. The model learns
  both styles and, greedy, answers most problems without working, which fails on long chains. Working is the
  latent, improvable skill that an expert can elicit (as reinforcement learning elicits chains of thought in real
  models), so an SVF expert has something real to learn.
- `INSTRUCTION_SHARE`: the instruction tasks are rare, so the base half-knows them, as a real model half-knows a
  downstream task before it is tuned.
"""

from __future__ import annotations

import random
from typing import Iterator

from .example import split_of
from .facts import World
from .knowledge import qa_line
from .example import ANSWER_MARKER
from .registry import INSTRUCTION_TASKS, SKILLS, get_task

INSTRUCTION_SHARE = 0.1
MIXTURE = {"facts": 0.2, "math": 0.25, "code": 0.2, "science": 0.25, "instructions": INSTRUCTION_SHARE}
SHORTCUT_SHARE = {"math": 0.6}


def skill_document(rng: random.Random, skill: str, split: str = "train", n: tuple[int, int] = (1, 3)) -> str:
    """`n[0]` to `n[1]` solved problems of the task `skill`, all from `split`; a `SHORTCUT_SHARE[skill]` share of
    them have their working dropped (target ` #### answer`)."""
    task = get_task(skill)
    shortcut = SHORTCUT_SHARE.get(skill, 0.0)
    parts: list[str] = []
    count = rng.randint(*n)
    while len(parts) < count:
        ex = task.make(rng, rng.choice(task.pretrain_difficulties))
        if split_of(ex.prompt) == split:
            target = f" {ANSWER_MARKER} {ex.answer}\n" if rng.random() < shortcut else ex.target
            parts.append(ex.prompt + target)
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
        if kind == "facts":
            yield fact_document(rng, world)
        elif kind == "instructions":
            yield skill_document(rng, rng.choice(INSTRUCTION_TASKS), split, n=(2, 4))
        else:
            yield skill_document(rng, kind, split)


def heldout_text(n: int = 200, seed: int = 0, world: World | None = None) -> list[str]:
    """`n` held-out pretraining-distribution documents (skills from the val split, new draws of known facts)."""
    stream = documents(seed=10_000 + seed, world=world, split="val")
    return [next(stream) for _ in range(n)]


assert set(MIXTURE) == {"facts", "instructions", *SKILLS}
