"""spectral-peft: spectrum-aware parameter-efficient fine-tuning (PALoRA, HiP-LoRA and their baselines)."""

__version__ = "0.1.0"

from .adapters import (  # noqa: E402
    HiPLoRAConfig,
    MiLoRAConfig,
    OPLoRAConfig,
    PALoRAConfig,
    SVFConfig,
    SVFTConfig,
    method_config,
)
from .export import export_lora  # noqa: E402
from .merging import merge_adapters  # noqa: E402
from .model import SpectralPeftModel, get_peft_model, load_adapter  # noqa: E402
from .probe import Probe  # noqa: E402
from .training import BudgetCallback, attach_budget_projection  # noqa: E402

__all__ = [
    "BudgetCallback", "HiPLoRAConfig", "MiLoRAConfig", "OPLoRAConfig", "PALoRAConfig", "Probe", "SVFConfig",
    "SVFTConfig", "SpectralPeftModel", "attach_budget_projection", "export_lora", "get_peft_model", "load_adapter",
    "merge_adapters", "method_config",
]
