"""Skill `code`: tracing short straight-line programs over a few variables.

A program of `difficulty` assignments over variables a, b, c, d (constants, copies, +, -) ends in
`print(v)`. The worked solution lists the value after each line and ends in `#### answer`. Values stay in
0..99. Difficulty = number of assignments (pretraining mixes 2 to 5).
"""

from __future__ import annotations

import random

from .example import ANSWER_MARKER, Example, GeneratedTask

VARIABLES = "abcd"


def make_code(rng: random.Random, difficulty: int) -> Example:
    """One straight-line program with `difficulty` assignments, its trace and the printed value."""
    env: dict[str, int] = {}
    lines, trace = [], []
    for i in range(difficulty):
        target = rng.choice(VARIABLES[: min(len(VARIABLES), 2 + i)])
        known = list(env)
        kind = rng.choice(["const"] if not known else ["const", "add", "sub", "var"] + ["binop"] * 2)
        if kind == "const":
            val = rng.randint(0, 20)
            expr = str(val)
        elif kind == "var":
            src = rng.choice(known)
            val, expr = env[src], src
        elif kind == "binop" and len(known) >= 2:
            x, y = rng.sample(known, 2)
            if env[x] + env[y] <= 99 and rng.random() < 0.5 or env[x] < env[y]:
                val, expr = env[x] + env[y], f"{x} + {y}"
            else:
                val, expr = env[x] - env[y], f"{x} - {y}"
        else:
            src = rng.choice(known)
            k = rng.randint(1, 9)
            if env[src] + k <= 99 and (kind == "add" or env[src] < k):
                val, expr = env[src] + k, f"{src} + {k}"
            else:
                val, expr = env[src] - k, f"{src} - {k}"
        if val > 99 or val < 0:
            val = rng.randint(0, 20)
            expr = str(val)
        env[target] = val
        lines.append(f"{target} = {expr}")
        trace.append(f"{target}={val}.")
    shown = rng.choice(list(env))
    prompt = "Code: " + "; ".join(lines) + f"; print({shown})\nSolution:"
    target_text = " " + " ".join(trace) + f" {ANSWER_MARKER} {env[shown]}\n"
    return Example(prompt=prompt, target=target_text, answer=str(env[shown]), task="code", difficulty=difficulty)


CODE = GeneratedTask("code", make_code, difficulties=(2, 3, 4), pretrain_difficulties=(2, 3, 4, 5))
