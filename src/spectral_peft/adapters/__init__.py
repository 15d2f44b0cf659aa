"""One module per method, a shared projected-LoRA layer, and the registry that builds configs by name."""

from .base import AdapterConfig, SpectralLayer
from .hiplora import HiPLoRAConfig, HiPLoRALayer
from .milora import MiLoRAConfig
from .oplora import OPLoRAConfig
from .palora import PALoRAConfig
from .registry import CONFIG_CLASSES, METHODS, method_config
from .svf import SVFConfig, SVFLayer
from .svft import SVFTConfig

__all__ = [
    "AdapterConfig", "CONFIG_CLASSES", "HiPLoRAConfig", "HiPLoRALayer", "METHODS", "MiLoRAConfig", "OPLoRAConfig",
    "PALoRAConfig", "SVFConfig", "SVFLayer", "SVFTConfig", "SpectralLayer", "method_config",
]
