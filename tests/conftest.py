"""Shared fixtures: tiny random Llama and Mistral models built in the test (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

ARCHS = ("llama", "mistral")


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 2-layer causal LM with distinct matrix shapes (hidden 32, MLP 48, 4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else MistralForCausalLM(MistralConfig(**kw))
    return model.to(dtype).eval()


@pytest.fixture
def input_ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
