"""The organism's architecture: a tiny `LlamaForCausalLM` (SwiGLU MLP, RoPE, RMSNorm, tied embeddings)."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def organism_config(tokenizer: PreTrainedTokenizerBase, hidden_size: int = 256, intermediate_size: int = 688,
                    num_layers: int = 6, num_heads: int = 4, max_positions: int = 512) -> LlamaConfig:
    """The Llama configuration of the organism (about 5.0M parameters at the defaults, vocabulary 1024)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_random_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **sizes) -> LlamaForCausalLM:
    """A randomly initialised Llama of the organism's family (default sizes, or smaller via `sizes`), for tests."""
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(organism_config(tokenizer, **sizes)).eval()
