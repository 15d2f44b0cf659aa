"""Skill `math`: multi-step integer arithmetic with a worked solution ending in `#### answer`.

A problem starts from a number in 2..40 and applies `difficulty` additions or subtractions of a digit
(1..9); intermediate values stay in 0..99. Difficulty = number of operations (pretraining mixes 1 to 6; the
corpus drops the working from most solutions, see `corpus.SHORTCUT_SHARE`).
"""

from __future__ import annotations

import random

from .example import ANSWER_MARKER, Example, GeneratedTask


def make_math(rng: random.Random, difficulty: int) -> Example:
    """One arithmetic problem with `difficulty` operations and its step-by-step solution."""
    value = rng.randint(2, 40)
    words, steps = [f"Start with {value}."], []
    for _ in range(difficulty):
        k = rng.randint(1, 9)
        if value + k <= 99 and (value < k or rng.random() < 0.5):
            new, word, sym = value + k, f"Add {k}.", "+"
        else:
            new, word, sym = value - k, f"Subtract {k}.", "-"
        words.append(word)
        steps.append(f"{value}{sym}{k}={new}.")
        value = new
    prompt = "Math: " + " ".join(words) + "\nSolution:"
    target = " " + " ".join(steps) + f" {ANSWER_MARKER} {value}\n"
    return Example(prompt=prompt, target=target, answer=str(value), task="math", difficulty=difficulty)


MATH = GeneratedTask("math", make_math, difficulties=(2, 3, 4, 5), pretrain_difficulties=(1, 2, 3, 4, 5, 6))
