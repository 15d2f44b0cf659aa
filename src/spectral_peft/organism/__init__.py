"""The model organism: a tiny Llama pretrained on the generated world, shipped in `spectral_peft/toy/`."""

from __future__ import annotations

from pathlib import Path

from .config import organism_config, tiny_random_model
from .pretrain import PretrainConfig, pretrain
from .tokenizer import build_tokenizer

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "toy"


def load(path: str | Path | None = None, dtype=None):
    """`(model, tokenizer)` from the shipped checkpoint (or `path`), offline, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else CHECKPOINT_DIR
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


__all__ = ["CHECKPOINT_DIR", "PretrainConfig", "build_tokenizer", "load", "organism_config", "pretrain", "tiny_random_model"]
