"""Wrap a causal LM with a spectral adapter; save, load, merge and unload it.

``get_peft_model(model, config)`` replaces every targeted ``nn.Linear`` by the config's layer and returns a
:class:`SpectralPeftModel` that trains with the transformers Trainer, TRL or a plain loop. PEFT configs
(LoRA, DoRA, PiSSA, CorDA) are handed to PEFT. An adapter directory holds ``adapter_config.json`` (the config, plus
the shape and content hash of every base weight it adapts) and ``adapter_model.safetensors`` (trainable tensors and
small method state). Singular vectors are never saved: they are recomputed from the base weights or read from the
SVD cache, and the recorded hashes guarantee they are the same.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .adapters import CONFIG_CLASSES, AdapterConfig, HiPLoRALayer, SpectralLayer, project_budgets
from .adapters.hiplora import HiPLoRAConfig
from .adapters.palora import PALoRAConfig
from .spectral import SVDCache, weight_hash

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` of the model except the output head ("all-linear")."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules ``config`` adapts; raise if a listed target matches nothing."""
    linear = linear_names(model)

    def matches(name: str, suffix: str) -> bool:
        return name == suffix or name.endswith("." + suffix)

    if config.target_modules == "all-linear":
        names = linear
    else:
        names = [n for n in linear if any(matches(n, t) for t in config.target_modules)]
        missing = [t for t in config.target_modules if not any(matches(n, t) for n in linear)]
        if missing:
            examples = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ValueError(f"target module(s) {missing} match no nn.Linear in the model (it has {examples})")
    names = [n for n in names if not any(matches(n, e) for e in config.exclude_modules)]
    if isinstance(config, PALoRAConfig):
        names = [n for n in names if config.accepts(n)]
    if not names:
        raise ValueError("no module of the model matches the adapter's target_modules")
    return names


def base_identity(model: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    """Shape and content hash of each named module's weight."""
    modules = dict(model.named_modules())
    return {n: {"shape": list(modules[n].weight.shape), "hash": weight_hash(modules[n].weight)} for n in names}


def check_identity(model: nn.Module, recorded: dict[str, dict[str, Any]]) -> None:
    """Refuse a model whose weights differ from the recorded base (by shape or content hash)."""
    modules = dict(model.named_modules())
    for name, ident in recorded.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the adapter's base module {name!r} is not in the model")
        if list(module.weight.shape) != list(ident["shape"]):
            raise ValueError(f"{name}: the adapter expects shape {ident['shape']}, the model has "
                             f"{list(module.weight.shape)}")
    for name, ident in recorded.items():
        if weight_hash(modules[name].weight) != ident["hash"]:
            raise ValueError(f"{name}: the model's weights differ from the base the adapter was made on (hash mismatch)")


class SpectralPeftModel(nn.Module):
    """A causal LM whose targeted linears carry a spectral adapter. Unknown attributes fall through to the LM."""

    def __init__(self, model: nn.Module, config: AdapterConfig, base: dict[str, dict[str, Any]]):
        super().__init__()
        self.base_model = model
        self.peft_config = config
        self.base_weights = base

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def spectral_layers(self) -> dict[str, SpectralLayer]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SpectralLayer)}

    def hip_layers(self) -> list[HiPLoRALayer]:
        return [m for m in self.spectral_layers().values() if isinstance(m, HiPLoRALayer)]

    def budget_penalty(self) -> torch.Tensor | None:
        """``lambda * sum_layers R(phi)`` when HiP-LoRA runs in penalty mode, else ``None``."""
        cfg = self.peft_config
        if not isinstance(cfg, HiPLoRAConfig) or cfg.budget_mode != "penalty":
            return None
        return cfg.budget_lambda * sum(layer.regulariser() for layer in self.hip_layers())

    def budget_use(self) -> dict[str, float]:
        """``R(phi) / eps`` for every HiP-LoRA layer."""
        return {n: m.budget_use() for n, m in self.spectral_layers().items() if isinstance(m, HiPLoRALayer)}

    def project_budgets(self) -> None:
        """Project every ``phi`` onto its budget ball (HiP-LoRA in constraint mode; a no-op otherwise)."""
        cfg = self.peft_config
        if isinstance(cfg, HiPLoRAConfig) and cfg.budget_mode == "constraint":
            project_budgets(self.hip_layers())

    def forward(self, *args: Any, **kwargs: Any):
        out = self.base_model(*args, **kwargs)
        penalty = self.budget_penalty() if self.training else None
        if penalty is not None and getattr(out, "loss", None) is not None:
            out.loss = out.loss + penalty.to(out.loss.dtype)
        return out

    def generate(self, *args: Any, **kwargs: Any):
        return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        layers = list(self.spectral_layers().values())
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, the adapter's included."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's saved tensors (trainable parameters and persistent method state), keyed by module."""
        state = {}
        for name, layer in self.spectral_layers().items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    state[f"{name}.{key}"] = value.detach().contiguous().cpu()
        return state

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each atomically) into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        name_or_path = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
        config = {"spectral_peft_version": __version__, **self.peft_config.to_dict(),
                  "base_model_name_or_path": name_or_path, "base_weights": self.base_weights}
        tmp_w, tmp_c = path / (ADAPTER_WEIGHTS + ".tmp"), path / (ADAPTER_CONFIG + ".tmp")
        save_file(self.adapter_state_dict(), str(tmp_w))
        tmp_c.write_text(json.dumps(config, indent=2, default=str))
        os.replace(tmp_w, path / ADAPTER_WEIGHTS)
        os.replace(tmp_c, path / ADAPTER_CONFIG)

    def _restore(self, merge: bool) -> nn.Module:
        for name, layer in self.spectral_layers().items():
            if merge:
                layer.merge()
            self.base_model.set_submodule(name, layer.base_layer)
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """Write ``W + dW`` into every adapted linear and return the plain model."""
        return self._restore(merge=True)

    def unload(self) -> nn.Module:
        """Drop the adapter and return the plain, unchanged model."""
        return self._restore(merge=False)


def _svd_cache(svd_cache: SVDCache | str | Path | None) -> SVDCache:
    return svd_cache if isinstance(svd_cache, SVDCache) else SVDCache(svd_cache)


def _wrap(model: nn.Module, config: AdapterConfig, names: list[str], svd_cache: SVDCache, progress: bool):
    modules = dict(model.named_modules())
    for name in names:
        config.check_shape(name, tuple(modules[name].weight.shape))
    if isinstance(config, PALoRAConfig):
        config.probe.check_base(model)
    base = base_identity(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in tqdm(names, desc=f"{config.method}: SVD", unit="matrix", disable=not progress):
        W = modules[name].weight
        svd = svd_cache.get(W, k=config.svd_rank(tuple(W.shape)), method=getattr(config, "svd_method", "exact"),
                            digest=base[name]["hash"])
        layer = config.make_layer(name, modules[name], svd.to(W.device))
        model.set_submodule(name, layer.to(W.device))
    return SpectralPeftModel(model, config, base)


def get_peft_model(
    model: nn.Module,
    config: AdapterConfig | PeftConfig,
    svd_cache: SVDCache | str | Path | None = None,
    calibration: Callable[[], None] | None = None,
    progress: bool = True,
):
    """Wrap ``model`` with the adapter ``config`` describes.

    ``svd_cache``: an :class:`SVDCache` or a directory for one (``None`` keeps SVDs in memory only).
    ``calibration``: for CorDA, a callable that runs the model on calibration data (PEFT's ``run_model``).
    """
    if isinstance(config, PeftConfig):
        import peft

        if getattr(config, "init_lora_weights", None) == "corda":
            if calibration is None:
                raise ValueError("CorDA needs calibration data: pass calibration=<callable running the model>")
            from peft.tuners.lora.corda import preprocess_corda

            if config.target_modules == "all-linear":  # preprocess_corda does not expand it itself
                config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model)})
            preprocess_corda(model, config, run_model=calibration)
        return peft.get_peft_model(model, config)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a spectral_peft or PEFT config, got {type(config).__name__}")
    return _wrap(model, config, find_targets(model, config), _svd_cache(svd_cache), progress)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
    return json.loads((path / ADAPTER_CONFIG).read_text())


def load_adapter(
    model: nn.Module,
    path: str | Path,
    is_trainable: bool = False,
    svd_cache: SVDCache | str | Path | None = None,
    progress: bool = True,
):
    """Load a saved adapter onto ``model``: a spectral-peft adapter, or any PEFT adapter (through PEFT)."""
    d = read_adapter_config(path)
    if "peft_type" in d:
        return PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)
    method = d.get("method")
    if method not in CONFIG_CLASSES:
        raise ValueError(f"{path}: unknown adapter method {method!r}")
    state = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    check_identity(model, d["base_weights"])
    config = CONFIG_CLASSES[method].from_saved(d, state, d["base_weights"])
    wrapped = _wrap(model, config, list(d["base_weights"]), _svd_cache(svd_cache), progress)
    for name, layer in wrapped.spectral_layers().items():
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        missing, unexpected = layer.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.startswith("base_layer.")]
        if missing or unexpected:
            raise ValueError(f"{path}: {name} is missing {missing} / has unexpected {unexpected}")
        for pname, p in layer.named_parameters():
            p.requires_grad_(is_trainable and not pname.startswith("base_layer."))
    return wrapped
