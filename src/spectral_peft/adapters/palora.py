"""PALoRA: LoRA on top of a frozen SVF expert, kept orthogonal to the probe's skill-critical directions.

The expert weight is ``W_e = U diag(sigma * z) V^T`` (``z`` from the probe, same ``U``, ``V`` as ``W``). The knowledge
update is ``dW_k = s P_L B A P_R`` with ``P_L = I - U_S U_S^T``, ``P_R = I - V_S V_S^T`` and ``S`` chosen per matrix
from the probe scores ``d_i = |z_i - 1|`` ("projection-adaptive"), so ``U_S^T dW_k = 0`` and ``dW_k V_S = 0``: every
protected expert triplet is kept exactly. The soft variant uses ``P_L = I - U diag(w) U^T`` with
``w_i = d_i / max(d)`` over all indices. Relative to ``W`` the layer adds ``dW = U diag(sigma (z - 1)) V^T + dW_k``.

``expert_mode="fold"`` keeps ``W_e`` as a frozen buffer (the speed of LoRA, one extra copy of each target weight);
``"factorised"`` computes ``W x + U (sigma (z - 1) * V^T x)`` (no copy, about one more matmul per token). An expert
of a 3-D MoE stack keeps no folded copy: its :class:`~.experts.ExpertsLayer` adds the whole ``dW`` to the stack.
Memory: both modes keep the full ``U``, ``S``, ``V`` (fp32) as derived state, because unload, merge and export
need ``U diag(sigma (z - 1)) V^T`` exactly against the original base. Folding in place instead of into a copy
would need the original ``W`` back bit-exactly, and ``round(W_e - dE)`` recovers it only with the exact ``dE``
(hence the full ``U``, ``V``, or the SVD cache on disk) plus a fix-up of the entries whose rounding crossed a
binade; from ``W_e`` alone about one bit per entry is lost.
``place="inside"`` is an ablation: the update is forced *into* the protected subspace,
``dW_k = s U_S U_S^T B A V_S V_S^T``, so that PALoRA's placement can be compared with its opposite.
Matrices the probe does not cover are adapted by plain LoRA (``uncovered="unconstrained"``) or left alone
(``uncovered="skip"``); the choice is recorded in the adapter config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..probe import SELECTION_RULES, Probe
from ..spectral import SVD
from .base import SpectralLayer, base_weight
from .projected_lora import LowRankConfig, ProjectedLoRA, ProjectedLoRALayer

UNCOVERED = ("unconstrained", "skip")
PLACES = ("orthogonal", "inside")
EXPERT_MODES = ("fold", "factorised")


@dataclass
class PALoRAConfig(LowRankConfig):
    """PALoRA.

    ``probe``: a probe directory or :class:`Probe`. ``selection``: ``top_fraction`` (``rho``), ``threshold``
    (``tau``), ``mass`` (``q``), or ``explicit`` (``protected_indices``: module name -> indices). ``soft``: scale
    each direction by ``d_i / max(d)`` instead of removing ``S``. ``uncovered``: what to do with target matrices the
    probe does not cover. ``expert_mode``: ``fold`` or ``factorised``. ``place``: ``orthogonal`` (PALoRA) or
    ``inside`` (the ablation that puts the update in the protected subspace).
    """

    method: ClassVar[str] = "palora"
    default_targets: ClassVar[str] = "mlp"

    probe: Any = None
    selection: str = "top_fraction"
    rho: float = 0.1
    tau: float = 0.05
    q: float = 0.5
    soft: bool = False
    protected_indices: dict[str, list[int]] | None = field(default=None, repr=False)
    uncovered: str = "unconstrained"
    expert_mode: str = "fold"
    place: str = "orthogonal"

    def validate(self) -> None:
        super().validate()
        if self.selection not in (*SELECTION_RULES, "explicit"):
            raise InputError(f"selection must be one of {(*SELECTION_RULES, 'explicit')}, got {self.selection!r}")
        if self.selection == "explicit" and self.protected_indices is None:
            raise InputError("selection='explicit' needs protected_indices")
        if not 0 <= self.rho <= 1 or not 0 <= self.q <= 1 or self.tau < 0:
            raise InputError(f"need 0 <= rho <= 1, 0 <= q <= 1 and tau >= 0 (got {self.rho}, {self.q}, {self.tau})")
        if self.uncovered not in UNCOVERED:
            raise InputError(f"uncovered must be one of {UNCOVERED}, got {self.uncovered!r}")
        if self.expert_mode not in EXPERT_MODES:
            raise InputError(f"expert_mode must be one of {EXPERT_MODES}, got {self.expert_mode!r}")
        if self.place not in PLACES:
            raise InputError(f"place must be one of {PLACES}, got {self.place!r}")
        if self.probe is None:
            raise InputError("PALoRA needs a probe (a probe directory or a Probe)")
        if not isinstance(self.probe, Probe):
            self.probe = Probe.load(self.probe)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["probe"] = self.probe.source
        d["protected_indices"] = None
        return d

    @classmethod
    def from_saved(cls, d: dict[str, Any], state: dict[str, torch.Tensor], base: dict[str, Any]) -> "PALoRAConfig":
        """The saved expert scales and protected sets stand in for the probe directory."""
        suffix = ".expert_scale"
        names = [k[: -len(suffix)] for k in state if k.endswith(suffix)]
        probe = Probe({n: state[n + suffix] for n in names}, {n: base[n] for n in names}, source=d.get("probe"))
        indices = {n: state[n + ".protected_index"].tolist() for n in names}
        return cls.from_dict({**d, "probe": probe, "selection": "explicit", "protected_indices": indices})

    def covers(self, name: str) -> bool:
        return name in self.probe.scales

    def accepts(self, name: str) -> bool:
        """Whether a matched target is adapted at all."""
        return self.covers(name) or self.uncovered == "unconstrained"

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        super().check_shape(name, shape)
        if self.covers(name) and self.probe.scales[name].numel() != min(shape):
            raise InputError(f"{name}: the probe has {self.probe.scales[name].numel()} scales, the matrix has "
                             f"min(m, n)={min(shape)}; use the probe trained on this model")

    def protected(self, name: str) -> torch.Tensor:
        if self.selection == "explicit":
            return torch.as_tensor(self.protected_indices.get(name, []), dtype=torch.long)
        return self.probe.select(name, self.selection, rho=self.rho, tau=self.tau, q=self.q)

    def make_layer(self, name: str, base_layer: nn.Module, svd: SVD) -> SpectralLayer:
        shape = tuple(base_weight(base_layer).shape)
        scaling = self.scaling
        if not self.covers(name):
            empty = svd.U[:, :0]
            return ProjectedLoRALayer(base_layer, ProjectedLoRA(shape, self.r, scaling, empty, svd.V[:, :0]))
        z = self.probe.scales[name].float()
        if self.soft:
            d = (z - 1).abs()
            weights = d / d.max() if d.max() > 0 else torch.zeros_like(d)
            index = torch.arange(svd.rank)
            lora = ProjectedLoRA(shape, self.r, scaling, svd.U, svd.V, weights, inside=self.place == "inside")
        else:
            index = self.protected(name)
            lora = ProjectedLoRA(shape, self.r, scaling, svd.U[:, index], svd.V[:, index],
                                 inside=self.place == "inside")
        return PALoRALayer(base_layer, svd, z, index, lora, self.expert_mode)


class PALoRALayer(SpectralLayer):
    """Frozen SVF expert (``expert_scale``) plus a projected LoRA; ``protected_index`` is the set ``S``.

    ``expert_scale`` and ``protected_index`` are saved state (buffers); the full ``U``, ``S``, ``V`` and the folded
    ``expert_weight`` are derived state (:mod:`.derived`), recomputed from the base and the probe, never broadcast.
    """

    derived = ("U", "S", "V", "expert_weight")

    def __init__(
        self, base_layer: nn.Module, svd: SVD, z: torch.Tensor, index: torch.Tensor, lora: ProjectedLoRA, mode: str
    ):
        super().__init__(base_layer)
        self.expert_mode = mode
        self.lora = lora
        self.register_buffer("expert_scale", z.float().clone())
        self.register_buffer("protected_index", index.long().clone())
        self.U = svd.U.float().contiguous()
        self.S = svd.S.float().contiguous()
        self.V = svd.V.float().contiguous()
        W_e = None
        if mode == "fold" and self.kind != "expert":  # an expert matrix is applied by its ExpertsLayer, never here
            W = self.weight
            W_e = (W.float() + self.expert_delta_weight()).to(W.dtype)
        self.expert_weight = W_e

    def expert_delta_weight(self) -> torch.Tensor:
        """``U diag(sigma (z - 1)) V^T``."""
        return (self.U * (self.S * (self.expert_scale - 1.0))) @ self.V.T

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, A = self.lora.factors()
        return torch.cat([self.U * (self.S * (self.expert_scale - 1.0)), B], 1), torch.cat([self.V.T, A], 0)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``dW_k x`` (the knowledge update alone)."""
        B, A = self.lora.factors()
        return (x @ A.T) @ B.T

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen expert path and the LoRA path apart, so no gradient is formed for the frozen factors."""
        return ((x @ self.V) * (self.S * (self.expert_scale - 1.0))) @ self.U.T + self.lora_delta(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or self.expert_mode == "factorised":
            return super().forward(x)
        y = F.linear(x, self.expert_weight, self.base_layer.bias)
        return y + self.lora_delta(x.to(torch.float32)).to(y.dtype)
