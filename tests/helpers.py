"""Shared test helpers: tiny random models of real architectures and a tiny organism checkpoint (no downloads)."""

from __future__ import annotations

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


def save_tiny_organism(path, num_layers: int = 1) -> str:
    """A tiny random member of the organism's family (hidden 32, MLP 64), saved with its tokenizer as a checkpoint."""
    import itertools

    from transformers import GenerationConfig

    from spectral_peft.data import documents
    from spectral_peft.organism import build_tokenizer, tiny_random_model

    tok = build_tokenizer(itertools.islice(documents(seed=1), 300), vocab_size=400)
    model = tiny_random_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_layers=num_layers, num_heads=2)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_tiny_qwen2(path) -> str:
    """A tiny random `Qwen2ForCausalLM` (hidden 32, 2 layers, 4 heads, 2 KV heads, MLP 64) with the organism's
    tokenizer, saved with that tokenizer and a greedy GenerationConfig as a checkpoint directory."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from spectral_peft.organism import CHECKPOINT_DIR

    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR, local_files_only=True)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


LLAMA_8B_SHAPES = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8}


def save_llama8b_shaped(path, num_layers: int = 2, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> str:
    """A random-init Llama with Llama-3.1-8B's layer shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads), only
    ``num_layers`` layers and the organism's tokenizer (a small vocabulary, so organism tasks are meaningful), saved
    in ``dtype`` with a greedy GenerationConfig as a checkpoint directory."""
    from transformers import AutoTokenizer, GenerationConfig

    from spectral_peft.organism import CHECKPOINT_DIR

    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR, local_files_only=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), num_hidden_layers=num_layers, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **LLAMA_8B_SHAPES)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


PAIRS = [("Q: Where does Ana Bel live?\nA:", " Velmora\n"), ("Q: What is the job of Cy Do?\nA:", " baker\n"),
         ("Math: Start with 3. Add 4.\nSolution:", " 3+4=7. #### 7\n"), ("Q: When was Ed Fa born?\nA:", " 1931\n")]


def tiny_tokenizer():
    """The organism's kind of tokenizer (byte-level BPE), trained on 300 world documents with 400 tokens."""
    import itertools

    from spectral_peft.data import documents
    from spectral_peft.organism import build_tokenizer

    return build_tokenizer(itertools.islice(documents(seed=1), 300), vocab_size=400)
