"""Build the config of any method by name, so experiments can loop over methods."""

from __future__ import annotations

from typing import Any

from .base import AdapterConfig
from .hiplora import HiPLoRAConfig
from .milora import MiLoRAConfig
from .oplora import OPLoRAConfig
from .palora import PALoRAConfig
from .peft_methods import PEFT_METHODS, peft_lora_config
from .svf import SVFConfig
from .svft import SVFTConfig
from ..errors import InputError

CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (SVFConfig, SVFTConfig, OPLoRAConfig, PALoRAConfig, HiPLoRAConfig, MiLoRAConfig)
}
METHODS = tuple(sorted((*CONFIG_CLASSES, *PEFT_METHODS)))


def method_config(name: str, **kwargs: Any):
    """The config for method ``name`` (one of :data:`METHODS`) with ``kwargs`` as its fields."""
    key = name.lower().replace("-", "").replace("_", "")
    if key in PEFT_METHODS:
        return peft_lora_config(key, **kwargs)
    if key not in CONFIG_CLASSES:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return CONFIG_CLASSES[key](**kwargs)
