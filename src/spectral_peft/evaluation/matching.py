"""Answer normalisation and alias-substring matching (SQuAD-style normalisation)."""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Iterable

from ..data.example import final_answer as extract_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """Lower-case, strip accents, turn punctuation into spaces, drop articles, collapse whitespace."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def alias_match(output: str, aliases: Iterable[str]) -> bool:
    """True when some non-empty normalised alias is a substring of the normalised output."""
    out = normalize(output)
    return any(a and a in out for a in map(normalize, aliases))


__all__ = ["alias_match", "extract_answer", "normalize"]
