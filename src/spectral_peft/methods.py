"""One grammar for naming a method with its hyper-parameters, and building the model it trains.

A method spec is ``name[:key=value,...]``, e.g. ``lora``, ``lora:r=2``, ``hiplora:rho=0.5``,
``hiplora:mode=penalty,lam=1``, ``oplora:k=32``, ``palora:protect=random``, ``svft:lr=5e-2``. Its label (the
spec as written) names it in every table. Several specs are separated by commas before a method name:
``"lora,hiplora:rho=0.5,k=8,oplora"`` is three specs.

Keys (each recorded in :class:`MethodSpec`):

| key | field | meaning |
|---|---|---|
| r, alpha, targets | r, lora_alpha, targets | LoRA rank and alpha; ``mlp`` (per architecture) or ``all-linear`` |
| k | k | HiP-LoRA's principal-channel size; OPLoRA's protected size (default: PALoRA's largest ``|S|`` when a probe is given, else 16) |
| mode, rho, lam, p, eps | budget_* | HiP-LoRA's budget: ``constraint``/``penalty``/``none``, relative radius, penalty weight, power, absolute radius |
| fraction, select, tau, q, soft | palora_* | PALoRA's protected set: rule ``top_fraction`` (fraction), ``threshold`` (tau), ``mass`` (q); soft weights |
| protect | protect | PALoRA's ablations of *which* directions: ``probe`` (PALoRA), ``sigma`` (the top-``|S|`` by sigma), ``random`` (a random set of the same size) |
| place | place | ``orthogonal`` (PALoRA) or ``inside`` (the update forced into the protected subspace, an ablation) |
| pattern | svft_pattern | SVFT's sparsity pattern |
| lr | lr | a learning rate for this method only (e.g. SVFT's own 5e-2) |

Given a probe (an SVF expert), every method starts from the same function: PALoRA applies the expert inside its
layers; every other method is applied to the weights with the expert folded in
(:func:`spectral_peft.adapters.svf_fold.fold_expert`).

Matched budgets: HiP-LoRA(r, k) trains ``r (m + n) + k`` parameters per ``m x n`` matrix and LoRA(r') trains
``r' (m + n)``; :func:`match_budgets` gives each LoRA-family spec without an explicit ``r`` the rank whose count is
closest to the first HiP-LoRA spec's (:func:`expected_count` is the analytic count of every method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .adapters import method_config
from .adapters.targets import select
from .adapters.svf_fold import fold_expert
from .probe import Probe
from .errors import InputError

METHODS = ("lora", "dora", "pissa", "corda", "milora", "oplora", "svft", "hiplora", "palora")
# methods whose update is an additive dW on the untouched base weights (mergeable; no probe needed)
ADDITIVE_METHODS = ("lora", "dora", "oplora", "milora", "svft", "hiplora")
LORA_FAMILY = ("lora", "dora", "pissa", "corda", "milora", "oplora")
TARGETS = {"mlp": "mlp", "all-linear": "all-linear"}  # spec value -> target rule, resolved per model
PROTECT = ("probe", "sigma", "random")
PLACES = ("orthogonal", "inside")
BUDGET_MODES = ("constraint", "penalty", "none")
KEYS: dict[str, str] = {
    "r": "r", "alpha": "lora_alpha", "targets": "targets", "k": "k", "mode": "budget_mode", "rho": "budget_rho",
    "lam": "budget_lambda", "p": "budget_power", "eps": "budget_eps", "fraction": "palora_fraction",
    "select": "palora_selection", "tau": "palora_tau", "q": "palora_q", "soft": "palora_soft", "protect": "protect",
    "place": "place", "pattern": "svft_pattern", "lr": "lr",
}


@dataclass(frozen=True)
class MethodSpec:
    """One method and its hyper-parameters (see the module docstring); ``explicit`` names the fields the spec set."""

    method: str = "lora"
    label: str = "lora"
    r: int = 8
    lora_alpha: float = 16.0
    targets: str = "mlp"
    k: int | None = None
    budget_mode: str = "constraint"
    budget_rho: float = 0.1
    budget_lambda: float = 0.1
    budget_power: float = 1.0
    budget_eps: float | None = None
    palora_fraction: float = 0.1
    palora_selection: str = "top_fraction"
    palora_tau: float = 0.05
    palora_q: float = 0.5
    palora_soft: bool = False
    protect: str = "probe"
    place: str = "orthogonal"
    svft_pattern: str = "plain"
    lr: float | None = None
    explicit: tuple[str, ...] = ()

    @property
    def needs_probe(self) -> bool:
        return self.method == "palora"

    @property
    def hip_k(self) -> int:
        return self.k or 16

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def adapter_config(self, probe: Probe | None = None, seed: int = 0):
        """The adapter config this spec builds (``probe``: PALoRA's probe, and the default of OPLoRA's ``k``;
        ``seed``: the random protected set of ``protect=random``)."""
        common = dict(r=self.r, lora_alpha=self.lora_alpha, target_modules=TARGETS[self.targets])
        if self.method == "hiplora":
            return method_config("hiplora", k=self.hip_k, budget_mode=self.budget_mode, budget_rho=self.budget_rho,
                                 budget_lambda=self.budget_lambda, budget_power=self.budget_power,
                                 budget_eps=self.budget_eps, **common)
        if self.method == "oplora":
            k = self.k or (max(protected_sizes(probe, self).values()) if probe is not None else 16)
            return method_config("oplora", k=k, **common)
        if self.method == "svft":
            return method_config("svft", pattern=self.svft_pattern, target_modules=TARGETS[self.targets])
        if self.method == "palora":
            if probe is None:
                raise InputError(f"{self.label}: PALoRA needs a probe (an SVF expert run)")
            kw: dict[str, Any] = dict(selection=self.palora_selection, rho=self.palora_fraction, tau=self.palora_tau,
                                      q=self.palora_q, soft=self.palora_soft, place=self.place)
            if self.protect != "probe":
                kw.update(selection="explicit", soft=False, protected_indices=ablation_indices(probe, self, seed))
            return method_config("palora", probe=probe, **kw, **common)
        return method_config(self.method, **common)


def _cast(field_name: str, value: str) -> Any:
    kind = {f.name: f.type for f in fields(MethodSpec)}[field_name]
    if "bool" in str(kind):
        if value.lower() not in ("true", "false", "1", "0"):
            raise InputError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if "int" in str(kind):
        return int(value)
    if "float" in str(kind):
        return float(value)
    return value


def parse_method(spec: str, defaults: MethodSpec | None = None) -> MethodSpec:
    """``name[:key=value,...]`` -> :class:`MethodSpec` over ``defaults``; bad names, keys or values raise a one-line
    ``ValueError``."""
    text = spec.strip()
    name, _, opts = text.partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise InputError(f"unknown method {name!r} in {text!r}; choose from {', '.join(METHODS)}")
    values: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in KEYS:
            raise InputError(f"bad option {item!r} in method spec {text!r}; use key=value with keys {', '.join(KEYS)}")
        try:
            values[KEYS[key]] = _cast(KEYS[key], value.strip())
        except ValueError:
            raise InputError(f"bad value {value.strip()!r} for {key!r} in method spec {text!r}") from None
    out = replace(defaults or MethodSpec(), method=name, label=text, explicit=tuple(values), **values)
    _validate(out)
    return out


def _validate(s: MethodSpec) -> None:
    where = f"method spec {s.label!r}"
    if s.targets not in TARGETS:
        raise InputError(f"{where}: targets must be one of {', '.join(TARGETS)}, got {s.targets!r}")
    if s.budget_mode not in BUDGET_MODES:
        raise InputError(f"{where}: mode must be one of {', '.join(BUDGET_MODES)}, got {s.budget_mode!r}")
    if s.protect not in PROTECT or s.place not in PLACES:
        raise InputError(f"{where}: protect must be one of {PROTECT} and place one of {PLACES}")
    if s.method != "palora" and ({"protect", "place"} & set(s.explicit)):
        raise InputError(f"{where}: protect and place are options of palora only")
    for f in fields(s):
        value = getattr(s, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{where}: {f.name} must be a finite number, got {value}")
    if s.lr is not None and not (math.isfinite(s.lr) and s.lr > 0):
        raise InputError(f"{where}: lr must be a positive number, got {s.lr}")
    if s.r < 1 or (s.k is not None and s.k < 1):
        raise InputError(f"{where}: r and k must be >= 1")
    if s.method != "palora":
        s.adapter_config()  # the adapter's own range checks, with its message


def split_specs(text: str) -> list[str]:
    """``"lora,hiplora:rho=0.5,k=8,oplora"`` -> ``["lora", "hiplora:rho=0.5,k=8", "oplora"]``: after a comma, a
    ``key=value`` continues the previous spec's options and anything else starts a new spec."""
    out: list[str] = []
    for part in text.split(","):
        if out and "=" in part.split(":", 1)[0]:
            out[-1] += "," + part
        elif part.strip():
            out.append(part)
    return [p.strip() for p in out if p.strip()]


def parse_methods(specs: str | Sequence[str], defaults: MethodSpec | None = None,
                  allowed: Sequence[str] = METHODS) -> list[MethodSpec]:
    """Several specs (a comma-joined string or a list), each label once, each method in ``allowed``."""
    items = split_specs(specs) if isinstance(specs, str) else [s for s in specs if s.strip()]
    out = [parse_method(s, defaults) for s in items]
    bad = [s.label for s in out if s.method not in allowed]
    if bad:
        raise InputError(f"method(s) {', '.join(bad)} cannot be used here; choose from {', '.join(allowed)}")
    labels = [s.label for s in out]
    if not out or len(set(labels)) != len(labels):
        raise InputError(f"give at least one method, each once (got {labels})")
    return out


# --- protected sets of PALoRA's ablations ----------------------------------------------------------------------------

def protected_sizes(probe: Probe, spec: MethodSpec) -> dict[str, int]:
    """``|S|`` per probed matrix under the spec's PALoRA selection rule."""
    return {n: int(probe.select(n, spec.palora_selection, rho=spec.palora_fraction, tau=spec.palora_tau,
                                q=spec.palora_q).numel()) for n in probe.scales}


def ablation_indices(probe: Probe, spec: MethodSpec, seed: int = 0) -> dict[str, list[int]]:
    """Protected sets of the same sizes as the probe's: the top-``|S|`` by sigma (``protect=sigma``; indices are in
    decreasing-sigma order) or a seeded random set (``protect=random``)."""
    sizes = protected_sizes(probe, spec)
    gen = torch.Generator().manual_seed(seed)
    if spec.protect == "sigma":
        return {n: list(range(k)) for n, k in sizes.items()}
    return {n: sorted(torch.randperm(probe.scales[n].numel(), generator=gen)[:k].tolist()) for n, k in sizes.items()}


# --- building the model ------------------------------------------------------------------------------------------

def build_model(spec: MethodSpec, base: nn.Module, probe: Probe | None = None, seed: int = 0,
                calibration: Callable[[nn.Module], None] | None = None, progress: bool = False) -> nn.Module:
    """Wrap ``base`` (modified in place) with ``spec``'s adapter, initialised under ``seed``.

    With a ``probe``, PALoRA gets it and every other method gets the expert folded into the weights first.
    ``calibration(model)`` runs the model on data to preserve (CorDA's covariance; required for ``corda``).
    """
    from .model import get_peft_model

    if probe is not None and not spec.needs_probe:
        fold_expert(base, probe)
    config = spec.adapter_config(probe, seed)
    torch.manual_seed(seed)
    if spec.method == "corda":
        if calibration is None:
            raise InputError("CorDA needs calibration data")
        return get_peft_model(base, config, calibration=lambda: calibration(base))
    return get_peft_model(base, config, progress=progress)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- matched budgets ---------------------------------------------------------------------------------------------

def target_shapes(model: nn.Module, targets: str) -> dict[str, tuple[int, int]]:
    """``{matrix name: (m, n)}`` of every matrix ``targets`` selects (linear, Conv1D and expert matrices, as the
    ``out x in`` view; the rule's rank floor is not applied, so a method with a large ``r`` may leave some out)."""
    return {m.name: m.shape for m in select(model, TARGETS[targets], (), need=1).matrices}


def expected_count(spec: MethodSpec, shapes: dict[str, tuple[int, int]]) -> int:
    """Trainable parameters of ``spec`` on matrices of ``shapes`` (analytic)."""
    total = 0
    for m, n in shapes.values():
        lora = spec.r * (m + n)
        total += {"hiplora": lora + spec.hip_k, "dora": lora + m, "svft": min(m, n)}.get(spec.method, lora)
    return total


def matched_rank(hip: MethodSpec, shapes: dict[str, tuple[int, int]]) -> int:
    """The LoRA rank whose count is closest to HiP-LoRA(r, k)'s on the same matrices."""
    per_rank = sum(m + n for m, n in shapes.values())
    return max(1, round(expected_count(hip, shapes) / per_rank))


def hiplora_reference(specs: Sequence[MethodSpec], defaults: MethodSpec) -> MethodSpec:
    """The HiP-LoRA spec budgets are matched to: the first among ``specs``, else HiP-LoRA with ``defaults``' r, k and
    targets."""
    return next((s for s in specs if s.method == "hiplora"), replace(defaults, method="hiplora", label="hiplora"))


def match_budgets(specs: list[MethodSpec], model: nn.Module, defaults: MethodSpec) -> list[MethodSpec]:
    """Give every LoRA-family spec without an explicit ``r`` the rank matching :func:`hiplora_reference`'s count."""
    ref = hiplora_reference(specs, defaults)
    return [replace(s, r=matched_rank(ref, target_shapes(model, s.targets)))
            if s.method in LORA_FAMILY and "r" not in s.explicit else s for s in specs]


def budget_table(specs: Sequence[MethodSpec], model: nn.Module) -> list[dict[str, Any]]:
    """Side-by-side trainable-parameter counts, relative to the first HiP-LoRA spec (or the first spec)."""
    ref = next((s for s in specs if s.method == "hiplora"), specs[0])
    ref_n = expected_count(ref, target_shapes(model, ref.targets))
    rows = []
    for s in specs:
        n = expected_count(s, target_shapes(model, s.targets))
        rows.append({"method": s.label, "r": s.r, "k": s.hip_k if s.method in ("hiplora", "oplora") else None,
                     "trainable": n, "vs_reference": n / ref_n - 1})
    return rows
