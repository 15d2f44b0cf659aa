"""Shared plumbing of the experiments: loading a model by name, atomic run directories and JSON files, seeding,
and folding an SVF expert (a probe) into a model's weights."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..probe import Probe
from ..spectral import SVDCache

ORGANISM = "organism"


def load_model(name: str | None = None):
    """``(model, tokenizer)`` in eval mode, fp32: the built-in organism (``None`` or ``"organism"``), a local
    checkpoint directory, or a Hugging Face model id (offline cache or network, as transformers allows)."""
    if name in (None, "", ORGANISM):
        from ..organism import load

        return load()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
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


@dataclass
class ProtocolRun:
    """What a protocol run returns: its ``metrics.json`` content."""

    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.metrics


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed python and torch; fix the number of CPU threads (results are deterministic for a thread count)."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_run_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``path``; on success it replaces ``path``, on error it is removed.

    So a run directory is either absent, the previous complete run, or the new complete run: never half-written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def merge_expert(model: nn.Module, probe: Probe, svd_cache: SVDCache | None = None) -> nn.Module:
    """Write the SVF expert ``W_e = U diag(sigma z) V^T`` into every probed matrix of ``model`` (in place).

    The probe must have been trained on exactly these weights (checked by hash). Uses the same SVD as the SVF and
    PALoRA layers (the spectral cache), so ``W_e`` equals PALoRA's folded expert weight.
    """
    probe.check_base(model)
    cache = svd_cache or SVDCache(None)
    modules = dict(model.named_modules())
    for name, z in probe.scales.items():
        W = modules[name].weight
        svd = cache.get(W, k=None)
        dW = (svd.U.float() * (svd.S.float() * (z.float().to(W.device) - 1.0))) @ svd.V.float().T
        W.copy_((W.float() + dW).to(W.dtype))
    return model
