"""spectral-peft: spectrum-aware parameter-efficient fine-tuning (PALoRA, HiP-LoRA and their baselines).

The public names are imported lazily, so that ``import spectral_peft.spectral`` (or the CLI's ``--help``) does not
pay for importing transformers and PEFT.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BudgetCallback": "training",
    "HiPLoRAConfig": "adapters",
    "MiLoRAConfig": "adapters",
    "OPLoRAConfig": "adapters",
    "PALoRAConfig": "adapters",
    "Probe": "probe",
    "SVFConfig": "adapters",
    "SVFTConfig": "adapters",
    "SpectralPeftModel": "model",
    "attach_budget_projection": "training",
    "export_lora": "export",
    "get_peft_model": "model",
    "load_adapter": "model",
    "merge_adapters": "merging",
    "method_config": "adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spectral_peft' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
