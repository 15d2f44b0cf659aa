"""Batched generation for any HF causal LM: left padding, greedy or nucleus sampling, stop strings."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


class StopOnStrings(StoppingCriteria):
    """Per-sequence stop once the generated text (after the prompt) contains any of `stops`."""

    def __init__(self, tokenizer, prompt_len: int, stops: Sequence[str]):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, tuple(stops)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


@contextmanager
def padded_left(tokenizer):
    """Temporarily pad on the left, with EOS as the pad token when the tokenizer has none."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 64,
             do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
             stop: Sequence[str] = ("\n",), progress: bool = True, desc: str = "generate") -> list[str]:
    """Continuations of `prompts`, cut at the first stop string (greedy, or sampled at `temperature`/`top_p`).

    Prompts are sorted by length and batched with left padding; the outputs come back in the input order.
    Generation of a sequence ends at EOS or once it contains a stop string. Sampling is seeded with `seed`.
    """
    if do_sample:
        torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    device = next(model.parameters()).device  # the weights' device (wrappers may not expose .device)
    with padded_left(tokenizer):
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, total=len(starts)):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            width = enc["input_ids"].shape[1]
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, width, stop)]) if stop else None,
                **sampling,
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                outputs[i] = truncate_at_stop(text, stop) if stop else text
    return outputs
