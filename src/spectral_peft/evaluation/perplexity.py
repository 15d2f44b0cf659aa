"""Perplexity of a causal LM on texts (token-level, pooled over all texts), with per-document NLL sums."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    """Mean next-token NLL (nats) over `n_tokens` predicted tokens, and its exponential; per document, the summed
    NLL (`doc_nll`) and the number of predicted tokens (`doc_tokens`), so `nll = sum(doc_nll) / sum(doc_tokens)`."""

    nll: float
    perplexity: float
    n_tokens: int
    doc_nll: list[float]
    doc_tokens: list[int]


@torch.inference_mode()
def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """Pooled perplexity: exp(sum of token NLLs / number of predicted tokens), each text scored on its own.

    Texts are tokenised with the tokenizer's own special tokens and truncated to `max_length` (default: the
    model's context length).
    """
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    doc_nll: list[float] = []
    doc_tokens: list[int] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="perplexity", disable=not progress, total=len(starts)):
            enc = tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length)
            width = max(len(ids) for ids in enc["input_ids"])
            ids = torch.full((len(enc["input_ids"]), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(enc["input_ids"]):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            token_nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            doc_nll += token_nll.sum(1).double().tolist()
            doc_tokens += (labels != -100).sum(1).tolist()
    finally:
        tokenizer.padding_side = side
    count = sum(doc_tokens)
    nll = sum(doc_nll) / max(1, count)
    return PerplexityResult(nll, math.exp(nll), count, doc_nll, doc_tokens)
