"""Loading the model a recipe works on, by name, and seeding.

``model`` is ``"organism"`` (the built-in model organism, offline), a local checkpoint directory, or a Hugging Face
model id (the local cache, or the network where there is one). Models load in fp32 in eval mode; a tokenizer
without a pad token pads with its end-of-sequence token.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch
from torch import nn

ORGANISM = "organism"


def check_model_name(name: str | None) -> None:
    """Fail fast, in one line, on a model that cannot exist: a path-like name that is not a checkpoint directory."""
    if name in (None, "", ORGANISM):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {name}: directory has no config.json (not a Hugging Face checkpoint)")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"--model {name}: no such checkpoint directory")


def load_model(name: str | None = None):
    """``(model, tokenizer)`` in eval mode, fp32 (see the module docstring for ``name``)."""
    if name in (None, "", ORGANISM):
        from .organism import load

        return load()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_name(name)
    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


class ModelSource:
    """Loads a model once and hands out independent copies (methods such as PiSSA rewrite weights in place)."""

    def __init__(self, name: str | None = None):
        self.name = name or ORGANISM
        self._model, self.tokenizer = load_model(name)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self._model).eval()

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self._model.parameters())


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed python and torch; fix the number of CPU threads (results are deterministic for a thread count)."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
