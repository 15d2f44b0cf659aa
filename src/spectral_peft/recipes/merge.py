"""Merge adapters trained from the same base on their weight updates ``dW`` into one Hugging Face checkpoint.

``spectral-peft merge --adapters runs/a/adapter,runs/b/adapter --how ties`` loads each adapter onto the base model
in turn (loading, then unloading, so the base is never copied), takes its dense update ``dW_j`` per adapted matrix
(``spectral_peft.merging``: LoRA/DoRA and every spectral adapter) and writes ``W + dW`` with

- ``sum`` (task arithmetic): ``dW = sum_j w_j dW_j``;
- ``ties`` (TIES-merging): keep the top ``density`` fraction of each ``w_j dW_j`` by magnitude, elect the sign of
  their sum per entry, and take the ``w_j``-weighted mean of the kept entries that agree with it.

Writes ``model/`` (the merged checkpoint with the base's tokenizer; load it with
``transformers.AutoModelForCausalLM.from_pretrained`` or pass it as ``--model`` to another recipe), ``merge.json``
(what was merged, and how), ``metrics.json`` (the Frobenius norms of every update) and ``report.md``.
Merging has no sizes to shrink, so ``--quick`` changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..loading import check_device, check_dtype, check_model_name, load_model
from ..merging import MERGE_OPERATORS, adapter_deltas, apply_deltas, merge_deltas
from ..model import read_adapter_config
from ..report import md_table
from ..runs import RunDir
from ..validation import check_adapter, check_finite_numbers, check_interval


@dataclass
class Config:
    """Merge adapters on their weight updates.

    Attributes:
        adapters: adapter directories (each with adapter_config.json) trained from the same base model.
        model: the base model the adapters were trained on: "organism", a checkpoint directory or a Hugging Face
            model id.
        device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        dtype: auto (the checkpoint's own: bf16 for most hub models, fp32 for the organism), float32, bfloat16 or
            float16.
        how: sum (task arithmetic on dW) or ties (TIES-merging on dW).
        weights: one weight per adapter (default: 1 each).
        density: ties only: the fraction of each update's entries kept (the largest by magnitude), in (0, 1].
    """

    adapters: tuple[str, ...] = ()
    model: str = "organism"
    device: str = "auto"
    dtype: str = "auto"
    how: str = "sum"
    weights: tuple[float, ...] = ()
    density: float = 0.2

    def validate(self) -> None:
        if self.how not in MERGE_OPERATORS:
            raise InputError(f"unknown merge operator {self.how!r}; use one of {', '.join(MERGE_OPERATORS)}")
        if not self.adapters:
            raise InputError("give at least one adapter directory: --adapters DIR1,DIR2")
        if self.weights and len(self.weights) != len(self.adapters):
            raise InputError(f"{len(self.weights)} weights for {len(self.adapters)} adapters; give one per adapter")
        check_finite_numbers(self)
        check_interval("density", self.density, 0, 1)
        for adapter in self.adapters:
            check_adapter(adapter)
        check_device(self.device)
        check_dtype(self.dtype)
        check_model_name(self.model)


QUICK: dict[str, Any] = {}


@dataclass
class Result:
    """What was merged: ``norms[j][module]`` = ``||w_j dW_j||_F`` and ``merged[module]`` = ``||dW||_F`` of the
    merged update, per adapted module."""

    adapters: list[str]
    methods: list[str]
    model: str
    how: str
    weights: list[float]
    density: float
    norms: list[dict[str, float]]
    merged: dict[str, float]

    @staticmethod
    def total(norms: dict[str, float]) -> float:
        """The Frobenius norm over all modules."""
        return math.sqrt(sum(v * v for v in norms.values()))

    def recipe(self) -> dict[str, Any]:
        """How the checkpoint was made (``merge.json``)."""
        return {"adapters": self.adapters, "methods": self.methods, "model": self.model, "how": self.how,
                "weights": self.weights, "density": self.density if self.how == "ties" else None}

    def to_dict(self) -> dict[str, Any]:
        return {**self.recipe(), "modules": len(self.merged),
                "update_norm": [self.total(n) for n in self.norms], "merged_norm": self.total(self.merged),
                "module_norms": {"adapters": self.norms, "merged": self.merged}}


def _method(adapter: str) -> str:
    d = read_adapter_config(Path(adapter).expanduser())
    return str(d.get("method") or d.get("peft_type", "peft")).lower()


def run(cfg: Config, run: RunDir) -> Result:
    weights = list(cfg.weights) or [1.0] * len(cfg.adapters)
    base, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
    deltas = [adapter_deltas(Path(a).expanduser(), base) for a in cfg.adapters]
    merged = merge_deltas(deltas, weights, cfg.how, cfg.density)
    apply_deltas(base, merged, inplace=True)
    base.save_pretrained(run.file("model"))
    tokenizer.save_pretrained(run.file("model"))
    norm = lambda d, w=1.0: {n: float(torch.linalg.norm(w * t)) for n, t in d.items()}  # noqa: E731
    return Result(adapters=list(cfg.adapters), methods=[_method(a) for a in cfg.adapters], model=cfg.model,
                  how=cfg.how, weights=weights, density=cfg.density,
                  norms=[norm(d, w) for d, w in zip(deltas, weights)], merged=norm(merged))


def render(result: Result, run: RunDir) -> str:
    run.write_json("merge.json", result.recipe())
    m = result.to_dict()
    run.write_json("metrics.json", m)
    how = "sum" if result.how == "sum" else f"ties (density {result.density})"
    rows = [{"adapter": a, "method": meth, "weight": w, "||w dW||_F": f"{n:.4g}"}
            for a, meth, w, n in zip(result.adapters, result.methods, result.weights, m["update_norm"])]
    rows.append({"adapter": "merged", "||w dW||_F": f"{m['merged_norm']:.4g}"})
    lines = [f"# Merge of {len(result.adapters)} adapter(s) with {how}", "",
             f"Base model `{result.model}`; {m['modules']} adapted matrices. The merged checkpoint is `model/` "
             "(W + dW written into the base weights).", "",
             md_table(rows, ["adapter", "method", "weight", "||w dW||_F"])]
    run.write_text("report.md", "\n".join(lines) + "\n")
    return (f"merged {len(result.adapters)} adapter(s) with {how} over {m['modules']} matrices "
            f"(||dW||_F {m['merged_norm']:.4g}) into model/")
