"""Skill `math`: multi-step integer arithmetic with a worked solution ending in `#### answer`.

A problem starts from a two-digit number and applies `difficulty` operations (add, subtract, multiply by a
digit). Intermediate values stay in 0..999. Difficulty = number of operations (default mix 2, 3, 4).
"""

from __future__ import annotations

import random

from .example import ANSWER_MARKER, Example, GeneratedTask


def make_math(rng: random.Random, difficulty: int) -> Example:
    """One arithmetic problem with `difficulty` operations and its step-by-step solution."""
    value = rng.randint(10, 99)
    words, steps = [f"Start with {value}."], []
    for _ in range(difficulty):
        ops = ["add", "sub"] + (["mul"] if value <= 99 else [])
        op = rng.choice(ops)
        if op == "add":
            k = rng.randint(2, min(99, 999 - value))
            new, words_op, sym = value + k, f"Add {k}.", "+"
        elif op == "sub" and value >= 2:
            k = rng.randint(1, min(99, value - 1))
            new, words_op, sym = value - k, f"Subtract {k}.", "-"
        else:
            k = rng.randint(2, 9)
            new, words_op, sym = value * k, f"Multiply by {k}.", "*"
        words.append(words_op)
        steps.append(f"{value}{sym}{k}={new}.")
        value = new
    prompt = "Math: " + " ".join(words) + "\nSolution:"
    target = " " + " ".join(steps) + f" {ANSWER_MARKER} {value}\n"
    return Example(prompt=prompt, target=target, answer=str(value), task="math", difficulty=difficulty)


MATH = GeneratedTask("math", make_math, difficulties=(2, 3, 4))
