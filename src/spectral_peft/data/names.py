"""Invented names built from syllables: people, cities, languages. Deterministic for a seed."""

from __future__ import annotations

import random

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "th", "sh", "st", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd"]


def syllable(rng: random.Random) -> str:
    """One random consonant-vowel-consonant syllable."""
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def word(rng: random.Random, n_syllables: int) -> str:
    """A capitalised invented word of `n_syllables` syllables."""
    return "".join(syllable(rng) for _ in range(n_syllables)).capitalize()


def unique_words(rng: random.Random, n: int, n_syllables: tuple[int, ...], exclude: set[str] = frozenset()) -> list[str]:
    """`n` distinct invented words (syllable counts drawn from `n_syllables`), none in `exclude`."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = word(rng, rng.choice(n_syllables))
        if w not in seen and 3 <= len(w) <= 12:
            seen.add(w)
            out.append(w)
    return out
