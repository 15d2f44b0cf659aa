"""Skill `science`: multi-hop relational inference over an ordering.

`difficulty` + 1 invented people are ordered by one attribute; the premises state each adjacent pair in a
shuffled order, and the question asks for the extreme (e.g. the tallest). The worked solution writes the
full chain from the greatest to the least and ends in `#### name`. Difficulty = number of premises
(pretraining mixes 1 to 5).
"""

from __future__ import annotations

import random

from .example import ANSWER_MARKER, Example, GeneratedTask
from .names import unique_words

ATTRIBUTES = [  # (comparative, superlative of the greatest, superlative of the least)
    ("taller", "tallest", "shortest"),
    ("older", "oldest", "youngest"),
    ("heavier", "heaviest", "lightest"),
    ("faster", "fastest", "slowest"),
]
PEOPLE = tuple(unique_words(random.Random("science-people"), 40, (1, 2)))


def make_science(rng: random.Random, difficulty: int) -> Example:
    """One ordering puzzle with `difficulty` shuffled premises and its chain-building solution."""
    comparative, most, least = rng.choice(ATTRIBUTES)
    chain = rng.sample(PEOPLE, difficulty + 1)  # chain[0] is the greatest
    premises = [f"{chain[i]} is {comparative} than {chain[i + 1]}." for i in range(difficulty)]
    rng.shuffle(premises)
    ask_most = rng.random() < 0.5
    answer = chain[0] if ask_most else chain[-1]
    prompt = "Science: " + " ".join(premises) + f" Who is the {most if ask_most else least}?\nSolution:"
    target = " " + " > ".join(chain) + f". {ANSWER_MARKER} {answer}\n"
    return Example(prompt=prompt, target=target, answer=answer, task="science", difficulty=difficulty)


SCIENCE = GeneratedTask("science", make_science, difficulties=(4, 5, 6), pretrain_difficulties=(1, 2, 3, 4, 5))
