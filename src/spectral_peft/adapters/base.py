"""What every spectral adapter shares: the config base class and the wrapped-matrix layer base class.

A layer wraps one frozen matrix ``W`` (``m x n``, the ``out x in`` view of :mod:`.matrices`: an ``nn.Linear``, a
transformers ``Conv1D`` or one expert of a 3-D expert stack) and adds an update ``dW = B_eff A_eff``:
``y = W x + b + B_eff (A_eff x)``. The factors are computed in fp32 from the trainable parameters, so merging,
exporting and the interference metrics all read the same ``dW``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..spectral import SVD
from ..spectral.stash import WeightStash
from .derived import DerivedState
from .experts import ExpertMatrix
from .matrices import layer_kind, weight_view

# Llama's MLP projections (the benchmarks build Llama-shaped layers); the "mlp" target resolves per architecture
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_RULES = ("all-linear", "mlp")


@dataclass
class AdapterConfig:
    """Fields shared by every spectral adapter.

    ``target_modules``: module-name suffixes to adapt (an expert stack is matched by its module, its parameter path
    or its expert's name ``module.param.e``), or a rule: ``"all-linear"`` (every linear, Conv1D and expert matrix but
    the output head) or ``"mlp"`` (the MLP matrices, resolved per architecture; docs/architectures.md). The rules leave
    out matrices whose ``min(m, n)`` is below :meth:`rank_need`; named targets that small are refused. ``None`` takes
    the method's default. ``exclude_modules``: suffixes never adapted.
    """

    method: ClassVar[str] = ""
    default_targets: ClassVar[tuple[str, ...] | str] = "all-linear"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = (
                self.default_targets if isinstance(self.default_targets, str) else list(self.default_targets)
            )
        if isinstance(self.target_modules, str) and self.target_modules not in TARGET_RULES:
            self.target_modules = [self.target_modules]
        self.validate()

    def validate(self) -> None:
        """Check field ranges that do not depend on the model; raise ``ValueError`` with a one-line reason."""

    def rank_need(self) -> int:
        """The smallest ``min(m, n)`` a matrix needs for this config."""
        return 1

    def need_text(self) -> str:
        """What :meth:`rank_need` counts, for error messages (e.g. ``"rank r=8"``)."""
        return "one singular triplet"

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        """Refuse a target whose shape does not fit this config (called for all targets before any change)."""
        if min(shape) < self.rank_need():
            raise InputError(f"{name}: {self.need_text()} is larger than min(m, n)={min(shape)} of its "
                             f"{shape[0]}x{shape[1]} matrix; lower it or leave the module out (exclude_modules)")

    def refusal(self, name: str) -> str | None:
        """Why the config leaves out a matrix the target rule matched (``None``: it is adapted)."""
        return None

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model the config cannot be applied to (called before any change); a no-op by default."""

    def svd_rank(self, shape: tuple[int, int]) -> int | None:
        """How many leading triplets a layer needs (``None``: all of them)."""
        return None

    def make_layer(self, name: str, base_layer: nn.Module, svd: SVD | None) -> "SpectralLayer":
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {"method": self.method, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_saved(cls, d: dict[str, Any], state: dict[str, torch.Tensor], base: dict[str, Any]) -> "AdapterConfig":
        """Rebuild the config of a saved adapter from its JSON, its tensors and its base-weight identities."""
        return cls.from_dict(d)


def base_weight(base_layer: nn.Module) -> torch.Tensor:
    """``W`` (``m x n``) of a linear layer, a Conv1D or an :class:`ExpertMatrix`, as a view of the stored weight."""
    return base_layer.weight if isinstance(base_layer, ExpertMatrix) else weight_view(base_layer)


def init_lora_factors(r: int, shape: tuple[int, int]) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's init, as in PEFT: ``A`` (``r x n``) Kaiming-uniform with ``a = sqrt(5)``, ``B`` (``m x r``) zero."""
    m, n = shape
    A = torch.empty(r, n)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return nn.Parameter(A), nn.Parameter(torch.zeros(m, r))


class SpectralLayer(DerivedState):
    """``y = base(x) + dW x`` with ``dW = B_eff A_eff`` (fp32), unless merged or disabled.

    ``weight`` is ``W`` as an ``m x n`` view of the base layer's stored weight (``kind``: ``linear``, ``conv1d`` or
    ``expert``); merging writes through it. Cached singular vectors are derived state (:mod:`.derived`): never
    buffers, so DDP does not broadcast them and ``state_dict`` does not hold them.
    """

    expert_digest: str | None = None  # the hash of W after a layer folded part of its update into it in place

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if layer_kind(base_layer) is None and not isinstance(base_layer, ExpertMatrix):
            raise TypeError(f"spectral adapters wrap linear layers, Conv1D layers and expert matrices, got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.merged = False
        self.disabled = False

    @property
    def kind(self) -> str:
        return "expert" if isinstance(self.base_layer, ExpertMatrix) else layer_kind(self.base_layer)

    @property
    def weight(self) -> torch.Tensor:
        return base_weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_eff, A_eff)`` with ``dW = B_eff @ A_eff``, in fp32."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``dW``, relative to the original base weight."""
        B, A = self.delta_factors()
        return B @ A

    def live_delta_weight(self) -> torch.Tensor:
        """The part of ``dW`` the stored weight does not hold yet (all of it, unless a layer folds part of its update
        into the weight in place, as PALoRA folds its expert): what the forward and :meth:`merge` add."""
        return self.delta_weight()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``dW_live x`` for fp32 activations ``x`` (``... x n``)."""
        B, A = self.delta_factors()
        return (x @ A.T) @ B.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        return y + self.delta(x.to(torch.float32)).to(y.dtype)

    def bind_base(self, digest: str, stash: WeightStash) -> None:
        """Called once by the wrapper after construction, with ``W``'s content hash and a stash for weights the layer
        overwrites in place (a no-op unless the layer folds something into ``W``)."""

    def set_disabled(self, disabled: bool) -> None:
        """Switch the update off (the forward is the base layer's) or back on."""
        self.disabled = disabled

    def release(self) -> None:
        """Called when the adapter is removed without merging: leave ``W`` as it was before wrapping."""

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``W <- W + dW_live`` into the base layer."""
        if not self.merged:
            W = self.weight
            W.copy_((W.float() + self.live_delta_weight()).to(W.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            W = self.weight
            W.copy_((W.float() - self.live_delta_weight()).to(W.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, shape={self.shape}"
