"""The continuous score of a skill: the teacher-forced NLL of the gold solution.

For problem ``i`` with prompt ``p_i`` and gold solution ``y_i`` (the example's ``target``, tokens ``y_i1..y_iT_i``),
``nll_i = -sum_t log p(y_it | p_i, y_i<t)``, summed over the solution's tokens only (the prompt is context). The
skill's score is the pooled NLL per token, ``sum_i nll_i / sum_i T_i`` nats: lower is better, and unlike accuracy it
moves before a greedy answer flips, so it is informative at the floor and at the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data import Example
from ..training.objectives import IGNORE_INDEX, collate_pairs, masked_nll


@dataclass
class GoldNLL:
    """Per problem: the summed NLL of the gold solution (nats) and its token count."""

    nll: list[float]
    tokens: list[int]

    @property
    def per_token(self) -> float:
        """Pooled NLL per solution token, ``sum(nll) / sum(tokens)``."""
        return sum(self.nll) / max(1, sum(self.tokens))


@torch.inference_mode()
def gold_nll(model, tokenizer, examples: Sequence[Example], batch_size: int = 64, max_length: int | None = 512,
             progress: bool = True) -> GoldNLL:
    """Teacher-forced NLL of every example's ``target`` after its ``prompt`` (module docstring)."""
    device = next(model.parameters()).device
    nll: list[float] = []
    tokens: list[int] = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="gold nll", disable=not progress, total=len(starts)):
        chunk = examples[start:start + batch_size]
        batch = collate_pairs(tokenizer, [(e.prompt, e.target) for e in chunk], max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll += masked_nll(logits, batch["labels"], reduction="sum_per_row").double().tolist()
        tokens += (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
    return GoldNLL(nll, tokens)
