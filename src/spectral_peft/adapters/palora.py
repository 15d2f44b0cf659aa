"""PALoRA: LoRA on top of a frozen SVF expert, kept orthogonal to the probe's skill-critical directions.

The expert weight is ``W_e = U diag(sigma * z) V^T`` (``z`` from the probe, same ``U``, ``V`` as ``W``). The knowledge
update is ``dW_k = s P_L B A P_R`` with ``P_L = I - U_S U_S^T``, ``P_R = I - V_S V_S^T`` and ``S`` chosen per matrix
from the probe scores ``d_i = |z_i - 1|`` ("projection-adaptive"), so ``U_S^T dW_k = 0`` and ``dW_k V_S = 0``: every
protected expert triplet is kept exactly. The soft variant uses ``P_L = I - U diag(w) U^T`` with
``w_i = d_i / max(d)`` over all indices. Relative to ``W`` the layer adds ``dW = dE + dW_k`` with
``dE = U diag(sigma (z - 1)) V^T``.

The expert is folded into the weight in place: when the wrapper binds the layer (:meth:`PALoRALayer.bind_base`),
``W`` is stashed on disk (:class:`~spectral_peft.spectral.stash.WeightStash`, addressed by its content hash, the base
identity the adapter records) and overwritten by ``W_e = round(W + dE)``, whose hash is recorded as the expert's
identity. The forward is then LoRA's, ``W_e x + dW_k x``, and the layer keeps only ``U_S``, ``V_S`` (no full ``U``,
``V``, no second weight). Unloading, disabling and unmerging put the stashed weights back bit for bit (hash-checked);
``dE`` for export is ``W_e - W`` read back from the stash. The soft variant needs every direction, so it keeps the
full ``U`` and ``V``. Experts of 3-D MoE stacks are folded into their slice of the stack the same way.
``place="inside"`` is an ablation: the update is forced *into* the protected subspace,
``dW_k = s U_S U_S^T B A V_S V_S^T``, so that PALoRA's placement can be compared with its opposite.
Matrices the probe does not cover are adapted by plain LoRA (``uncovered="unconstrained"``) or left alone
(``uncovered="skip"``); the choice is recorded in the adapter config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..probe import SELECTION_RULES, Probe
from ..spectral import SVD, weight_hash
from ..spectral.stash import WeightStash
from .base import SpectralLayer, base_weight
from .projected_lora import LowRankConfig, ProjectedLoRA, ProjectedLoRALayer
from .svf_fold import expert_delta, probe_weights

UNCOVERED = ("unconstrained", "skip")
PLACES = ("orthogonal", "inside")


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

    def refusal(self, name: str) -> str | None:
        return None if self.covers(name) or self.uncovered == "unconstrained" else "not in the probe, uncovered='skip'"

    def check_model(self, model: nn.Module) -> None:
        """The probe must have been trained on exactly this model's weights."""
        probe_weights(model, self.probe)

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
        return PALoRALayer(base_layer, svd, z, index, lora)


class PALoRALayer(SpectralLayer):
    """The SVF expert folded into ``W`` in place (``expert_scale`` = ``z``), plus a projected LoRA on the protected
    set ``S`` (``protected_index``).

    ``expert_scale`` and ``protected_index`` are saved state (buffers). Until :meth:`bind_base` folds the expert the
    layer holds the SVD; afterwards only the LoRA's ``U_S``, ``V_S`` (derived state) and the hashes of ``W``
    (``base_digest``) and ``W_e`` (``expert_digest``), with the stash that holds whichever is not live.
    """

    def __init__(self, base_layer: nn.Module, svd: SVD, z: torch.Tensor, index: torch.Tensor, lora: ProjectedLoRA):
        super().__init__(base_layer)
        self.lora = lora
        self.register_buffer("expert_scale", z.float().clone())
        self.register_buffer("protected_index", index.long().clone())
        self._svd: SVD | None = svd
        self.stash: WeightStash | None = None
        self.base_digest: str | None = None
        self.expert_digest: str | None = None

    @torch.no_grad()
    def bind_base(self, digest: str, stash: WeightStash) -> None:
        """Stash ``W`` (hash ``digest``) and overwrite it with ``W_e = round(W + dE)``; drop the SVD."""
        W = self.weight
        stash.put(W, digest)
        dE = expert_delta(self._svd, self.expert_scale).to(W.device)
        W.copy_((W.float() + dE).to(W.dtype))
        self.stash, self.base_digest, self.expert_digest, self._svd = stash, digest, weight_hash(W), None

    def _bound(self) -> WeightStash:
        if self.stash is None:
            raise RuntimeError("a PALoRA layer was used before get_peft_model bound it to its base weight")
        return self.stash

    @torch.no_grad()
    def set_disabled(self, disabled: bool) -> None:
        """Disabling puts ``W`` back (``W_e`` is stashed first); enabling puts ``W_e`` back. Both are exact."""
        if disabled != self.disabled and not self.merged:
            stash = self._bound()
            if disabled:
                stash.put(self.weight, self.expert_digest)
            stash.restore(self.expert_digest if not disabled else self.base_digest, self.weight)
        self.disabled = disabled

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- W_e + dW_k`` (enabled first; ``W_e`` is stashed, so :meth:`unmerge` is exact)."""
        if not self.merged:
            self.set_disabled(False)
            self._bound().put(self.weight, self.expert_digest)
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._bound().restore(self.expert_digest, self.weight)
            self.merged = False

    @torch.no_grad()
    def release(self) -> None:
        """Put the original ``W`` back (the adapter is being removed without merging)."""
        self._bound().restore(self.base_digest, self.weight)
        self.merged = self.disabled = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("expert_scale", "protected_index"):
            saved = state_dict.get(prefix + key)
            if saved is not None and not torch.equal(saved.to(getattr(self, key)), getattr(self, key)):
                raise InputError(f"the saved adapter's {key} differs from the expert folded into this model; load "
                                 "it onto the base model with spectral_peft.load_adapter")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def expert_delta_weight(self) -> torch.Tensor:
        """``dE = W_e - W`` in fp32, from the live weight and the stash."""
        stash = self._bound()
        W = torch.empty_like(self.weight)
        stash.restore(self.base_digest, W)
        if self.merged or self.disabled:
            W_e = torch.empty_like(W)
            stash.restore(self.expert_digest, W_e)
        else:
            W_e = self.weight
        return W_e.float() - W.float()

    def live_delta_weight(self) -> torch.Tensor:
        """``dW_k`` alone: the expert is already in the stored weight."""
        B, A = self.lora.factors()
        return B @ A

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[dE | s P_L B]`` and ``[I; A P_R]`` (or ``[I | s P_L B]`` and ``[dE; A P_R]`` for a wide matrix): rank
        ``min(m, n) + r``, product ``dE + dW_k``."""
        B, A = self.lora.factors()
        dE = self.expert_delta_weight()
        m, n = dE.shape
        if n <= m:
            return torch.cat([dE, B], 1), torch.cat([torch.eye(n, device=A.device), A], 0)
        return torch.cat([torch.eye(m, device=B.device), B], 1), torch.cat([dE, A], 0)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``dW_k x``: what the forward adds to ``W_e x``."""
        self._bound()
        B, A = self.lora.factors()
        return (x @ A.T) @ B.T
