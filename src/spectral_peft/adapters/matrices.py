"""The matrices an adapter can attach to, and the one ``out x in`` view every method reads.

A weight matrix ``W`` (``m x n``, ``y = W x``) is stored in one of three layouts (kinds):

- ``linear``: ``nn.Linear`` and subclasses (e.g. Falcon's ``FalconLinear``) store ``weight = W``;
- ``conv1d``: transformers' ``Conv1D`` (the GPT-2 family) stores ``weight = W^T`` (``n x m``);
- ``expert``: a transformers MoE experts module stores its experts as a 3-D parameter ``P``, ``[E, m, n]`` with
  ``W = P[e]``, or ``[E, n, m]`` with ``W = P[e]^T`` when the module's ``is_transposed`` is true.

:func:`weight_view` returns ``W`` as a *view* of the stored tensor, so the SVD, the content hashes, in-place merges
and exports all see the same ``m x n`` matrix whatever the layout. A linear or Conv1D matrix is named by its module
path; expert ``e`` of parameter ``p`` of the experts module ``path`` is named ``path.p.e``. The layout of 3-D
parameters is known only for experts modules that state it (transformers' ``use_experts_implementation`` sets
``is_transposed``); other 3-D parameters are reported as unadaptable, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

KINDS = ("linear", "conv1d", "expert")


@dataclass(frozen=True)
class Matrix:
    """One adaptable ``m x n`` matrix: its ``name``, ``kind``, the ``module`` path holding it, the parameter name
    (``weight`` unless an expert stack) and the expert index (``None`` unless ``kind == "expert"``)."""

    name: str
    kind: str
    module: str
    param: str
    expert: int | None
    shape: tuple[int, int]

    @property
    def stack(self) -> str:
        """The parameter's path, ``module.param`` (an expert stack's name)."""
        return f"{self.module}.{self.param}"

    @property
    def path(self) -> str:
        """The module path of a linear or Conv1D matrix; the stack of an expert (what the rules match)."""
        return self.stack if self.kind == "expert" else self.module

    def keys(self) -> tuple[str, ...]:
        """The paths a target suffix may match: the module, and for an expert also its stack and its own name."""
        return (self.module,) if self.kind != "expert" else (self.module, self.stack, self.name)


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of an adapter wrapper (ours or PEFT's); the module itself when unwrapped."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"conv1d"`` for a 2-D layer, else ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    return None


def stack_names(module: nn.Module) -> list[str]:
    """The module's own 3-D parameters (in registration order), unless it is a convolution (whose 3-D weight is
    ``out x in x kernel``, not a stack of matrices)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return []
    return [n for n, p in module._parameters.items() if p is not None and p.dim() == 3]


def stack_layout(module: nn.Module) -> bool | None:
    """Whether an experts module stores its stacks as ``[E, n, m]`` (``True``) or ``[E, m, n]`` (``False``);
    ``None`` when the module does not say (its stacks cannot be adapted)."""
    transposed = getattr(module, "is_transposed", None)
    return transposed if isinstance(transposed, bool) else None


def stack_view(module: nn.Module, param: str, expert: int) -> torch.Tensor:
    """Expert ``expert`` of the 3-D parameter ``param`` as an ``m x n`` view."""
    P = module._parameters[param]
    return P[expert].T if stack_layout(module) else P[expert]


def weight_view(module: nn.Module) -> torch.Tensor:
    """``W`` (``m x n``) of a linear or Conv1D layer, as a view of its stored weight."""
    kind = layer_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a linear layer or a Conv1D")
    return module.weight.T if kind == "conv1d" else module.weight


@dataclass(frozen=True)
class Unadaptable:
    """A module a target selects that holds no adaptable matrix, and why."""

    name: str
    reason: str
    stacks: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def find_matrices(model: nn.Module) -> tuple[list[Matrix], list[Unadaptable]]:
    """Every adaptable matrix of an unwrapped model, and every 3-D parameter stack whose layout is unknown."""
    found, unknown = [], []
    for path, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None:
            found.append(Matrix(path, kind, path, "weight", None, tuple(weight_view(module).shape)))
            continue
        stacks = stack_names(module)
        if not stacks:
            continue
        if stack_layout(module) is None:
            unknown.append(Unadaptable(path, f"{type(module).__name__}: 3-D parameters {stacks} of unknown layout",
                                       tuple(stacks)))
            continue
        for param in stacks:
            for e in range(module._parameters[param].shape[0]):
                shape = tuple(stack_view(module, param, e).shape)
                found.append(Matrix(f"{path}.{param}.{e}", "expert", path, param, e, shape))
    return found, unknown


def _resolve(modules: dict[str, nn.Module], name: str) -> torch.Tensor | None:
    module = modules.get(name)
    if module is not None and layer_kind(unwrap(module)) is not None:
        return weight_view(unwrap(module))
    path, _, index = name.rpartition(".")
    path, _, param = path.rpartition(".")
    holder = unwrap(modules[path]) if path in modules else None
    if holder is None or param not in stack_names(holder) or stack_layout(holder) is None or not index.isdigit() \
            or int(index) >= holder._parameters[param].shape[0]:
        return None
    return stack_view(holder, param, int(index))


def matrix_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: W}`` (``m x n`` views) for matrix names of a plain or adapter-wrapped model.

    Raises ``KeyError`` whose argument lists the names that are not adaptable matrices of the model.
    """
    modules = dict(model.named_modules())
    out = {name: _resolve(modules, name) for name in names}
    missing = [name for name, W in out.items() if W is None]
    if missing:
        raise KeyError(missing)
    return out
