"""Which matrices of a model an adapter config selects: named suffixes, or the rules ``all-linear`` and ``mlp``.

- A named target (a module-name suffix such as ``q_proj`` or ``mlp.c_proj``) selects every linear or Conv1D module
  it names and every expert matrix of a stack it names (by the experts module, ``module.param``, or one expert's
  ``module.param.e``). A target that names nothing, or names a module holding no adaptable matrix (a router, a
  container, a 3-D stack of unknown layout), is refused with one line naming the modules; nothing is dropped.
- ``all-linear``: every linear, Conv1D and expert matrix except the output head.
- ``mlp``: every adaptable matrix whose module, or stack, ends with one of :data:`MLP_SUFFIXES` (the table in
  docs/architectures.md). Attention's ``c_proj`` in GPT-2 is not ``mlp.c_proj``, so it is not selected.

Both rules refuse a 3-D stack of unknown layout they would select (never skipped silently) and leave out, by a stated
rule, the matrices whose ``min(m, n)`` is below the config's need (``r``; ``k + r`` for OPLoRA and HiP-LoRA; one
triplet for SVF); the wrapped model reports what was left out. ``exclude_modules`` is applied last, to every kind of
selection, with the same matching as named targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import InputError
from .matrices import Matrix, Unadaptable, find_matrices, layer_kind, stack_layout, stack_names, unwrap

# The MLP projections of the architectures in docs/architectures.md: Llama-likes, Gemma, Qwen and MoE shared experts
# (gate/up/down_proj); Phi-3 (fused gate_up_proj); GPT-NeoX, Falcon, BLOOM (dense_h_to_4h, dense_4h_to_h); OPT and
# Phi-1/2 (fc1, fc2); GPT-J, CodeGen (fc_in, fc_out); GPT-2, GPT-BigCode (mlp.c_fc, mlp.c_proj); MoE expert stacks
# (gate_up_proj, down_proj, up_proj).
MLP_SUFFIXES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2",
                "fc_in", "fc_out", "mlp.c_fc", "mlp.c_proj")
SHOWN = 4  # module names shown in one-line errors before "and N more"


def matches(key: str, suffix: str) -> bool:
    """``key`` is ``suffix`` or ends with ``"." + suffix``."""
    return key == suffix or key.endswith("." + suffix)


def listing(names: list) -> str:
    """The first few names, then how many more."""
    shown = ", ".join(str(n) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


@dataclass
class Selection:
    """The matrices selected (in model order) and those a rule left out, with the reason."""

    matrices: list[Matrix]
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.matrices]


def output_head(model: nn.Module) -> str | None:
    """The module path of the output head (``get_output_embeddings``), if the model has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def unadaptable_named(model: nn.Module, target: str) -> list[Unadaptable]:
    """Modules named by ``target`` that hold no adaptable matrix."""
    out = []
    for path, module in model.named_modules():
        if not matches(path, target) or layer_kind(unwrap(module)) is not None:
            continue
        stacks = stack_names(module)
        if stacks and stack_layout(module) is not None:
            continue
        reason = (f"{type(module).__name__}: 3-D parameters {stacks} of unknown layout" if stacks else
                  f"{type(module).__name__}, not a linear layer, a Conv1D or an expert stack")
        out.append(Unadaptable(path, reason))
    return out


def select(model: nn.Module, targets: list[str] | str, exclude: list[str] | tuple[str, ...], need: int) -> Selection:
    """The matrices ``targets`` selects (see the module docstring); ``need`` is the smallest ``min(m, n)`` the
    rules keep. Raises :class:`InputError` naming the modules for a target that cannot be honoured."""
    matrices, unknown = find_matrices(model)
    available = sorted({m.path.rsplit(".", 1)[-1] for m in matrices})
    if isinstance(targets, str):
        head = output_head(model)
        if targets == "all-linear":
            chosen = [m for m in matrices if m.name != head]
            blocked = unknown
        elif targets == "mlp":
            chosen = [m for m in matrices if m.name != head and any(matches(m.path, s) for s in MLP_SUFFIXES)]
            blocked = [u for u in unknown if any(matches(f"{u.name}.{p}", s) for p in u.stacks for s in MLP_SUFFIXES)]
            if not chosen and not blocked:
                raise InputError(f"targets 'mlp' found no MLP matrix in this {type(model).__name__} (its matrices "
                                 f"end with {available}); name the targets or use 'all-linear'")
        else:
            raise InputError(f"unknown target rule {targets!r}; use 'all-linear', 'mlp' or a list of module names")
        blocked = [u for u in blocked if not any(matches(u.name, e) for e in exclude)]
        if blocked:
            raise InputError(f"targets {targets!r} select modules that cannot be adapted: {listing(blocked)}; "
                             f"leave them out with exclude_modules")
    else:
        bad = [u for t in targets for u in unadaptable_named(model, t)]
        if bad:
            raise InputError(f"target module(s) {list(targets)} name modules that cannot be adapted: "
                             f"{listing(bad)}; name their linear layers instead")
        missing = [t for t in targets if not any(matches(k, t) for m in matrices for k in m.keys())]
        if missing:
            raise InputError(f"target module(s) {missing} match no linear, Conv1D or expert matrix of the model "
                             f"(its matrices end with {available})")
        chosen = [m for m in matrices if any(matches(k, t) for k in m.keys() for t in targets)]
    chosen = [m for m in chosen if not any(matches(k, e) for k in m.keys() for e in exclude)]
    left_out = {}
    if isinstance(targets, str):
        left_out = {m.name: f"min(m, n) < {need}" for m in chosen if min(m.shape) < need}
        chosen = [m for m in chosen if m.name not in left_out]
    return Selection(chosen, left_out)
