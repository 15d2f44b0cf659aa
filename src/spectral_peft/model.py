"""Wrap a causal LM with a spectral adapter; save, load, merge and unload it.

``get_peft_model(model, config)`` gives every targeted matrix (a linear layer, a transformers ``Conv1D``, or one
expert of a 3-D MoE expert stack; :mod:`.adapters.matrices`) the config's layer and returns a
:class:`SpectralPeftModel` that trains with the transformers Trainer, TRL or a plain loop; it reports what it adapted
by kind (:meth:`SpectralPeftModel.adapted_summary`). PEFT configs (LoRA, DoRA, PiSSA, CorDA) are handed to PEFT,
with the rules ``mlp`` and ``all-linear`` resolved the same way (expert stacks as PEFT ``target_parameters``, which
PEFT supports for plain LoRA only). An adapter directory holds ``adapter_config.json`` (the config, plus the shape
and content hash of every matrix it adapts) and ``adapter_model.safetensors`` (trainable tensors and small method
state). Singular vectors are never saved: they are recomputed from the base weights or read from the SVD cache, and
the recorded hashes guarantee they are the same. A layer that overwrites its weight in place (PALoRA folds its expert)
stashes the original on disk (:mod:`.spectral.stash`, beside the SVD cache or in a private temporary directory), and
the config records the folded weight's hash too (``expert_hash``); ``unload`` puts the original back bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__, budget
from .adapters import CONFIG_CLASSES, AdapterConfig, SpectralLayer
from .adapters.base import TARGET_RULES
from .adapters.experts import ExpertMatrix, ExpertsLayer
from .adapters.matrices import KINDS, Matrix, find_matrices, matrix_weights
from .adapters.targets import Selection, listing, select
from .errors import InputError, MissingInputError
from .spectral import SVDCache, weight_hash
from .spectral.cache import save_tensors_atomically
from .spectral.stash import WeightStash

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def select_targets(model: nn.Module, config: AdapterConfig) -> Selection:
    """The matrices ``config`` adapts (:func:`.adapters.targets.select`, then the config's own
    :meth:`~.adapters.AdapterConfig.refusal`, e.g. PALoRA's ``uncovered="skip"``).

    Raises a one-line :class:`InputError` when nothing is left, naming why (e.g. every matrix is smaller than ``r``).
    """
    selection = select(model, config.target_modules, config.exclude_modules, config.rank_need())
    refused = {m.name: why for m in selection.matrices if (why := config.refusal(m.name)) is not None}
    selection.left_out.update(refused)
    selection.matrices = [m for m in selection.matrices if m.name not in refused]
    if not selection.matrices:
        if selection.left_out and isinstance(config.target_modules, str):
            raise InputError(f"no matrix fits {config.method}: {config.need_text()} is larger than min(m, n) of every "
                             f"matrix {config.target_modules!r} selects ({listing(list(selection.left_out))}); "
                             "lower it or name other targets")
        raise InputError("no matrix of the model matches the adapter's target_modules")
    return selection


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the matrices ``config`` adapts (see :func:`select_targets`)."""
    return select_targets(model, config).names


def base_identity(model: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    """Shape and content hash of each named matrix (its ``m x n`` view)."""
    return {n: {"shape": list(W.shape), "hash": weight_hash(W)} for n, W in matrix_weights(model, names).items()}


def check_identity(model: nn.Module, recorded: dict[str, dict[str, Any]]) -> None:
    """Refuse a model whose matrices differ from the recorded base (by shape or content hash)."""
    try:
        weights = matrix_weights(model, list(recorded))
    except KeyError as e:
        raise InputError(f"the adapter's base module(s) {listing(e.args[0])} are not in the model; load it onto the "
                         "model it was trained on") from None
    for name, ident in recorded.items():
        if list(weights[name].shape) != list(ident["shape"]):
            raise InputError(f"{name}: the adapter expects shape {ident['shape']}, the model has "
                             f"{list(weights[name].shape)}")
    for name, ident in recorded.items():
        if weight_hash(weights[name]) != ident["hash"]:
            raise InputError(f"{name}: the model's weights differ from the base the adapter was made on "
                             "(hash mismatch)")


TASK_TYPES = {  # PEFT's task types and transformers' lists of the model classes for each
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "FEATURE_EXTRACTION": "MODEL_MAPPING_NAMES",
}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type of a transformers model class (``CAUSAL_LM`` for ``LlamaForCausalLM`` and
    ``GPT2LMHeadModel``), or ``None`` when transformers lists the class under none of them."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, mapping in TASK_TYPES.items():
        for classes in getattr(modeling_auto, mapping).values():
            if name in ((classes,) if isinstance(classes, str) else classes):
                return task
    return None


class SpectralPeftModel(nn.Module):
    """A causal LM whose targeted matrices carry a spectral adapter. Unknown attributes fall through to the LM.

    The wrapper defines no name that transformers or TRL give a meaning to: ``base_model``, ``get_decoder``,
    ``get_output_embeddings``, ``config`` ... are the LM's own (``base_model`` is its backbone, as on any transformers
    model); :meth:`get_base_model` returns the LM. Each wrapped model's class is a subclass made for the LM's class
    (:func:`wrapper_class`) whose ``forward`` has the LM's signature, so the Trainer keeps the dataset columns the LM
    takes and finds ``labels`` (``eval_loss``). Method-specific training behaviour (HiP-LoRA's budget) is attached to
    the layers (:mod:`.budget`), not to names of the wrapper.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, base: dict[str, dict[str, Any]],
                 left_out: dict[str, str] | None = None):
        super().__init__()
        self.lm = model
        self.peft_config = config
        self.base_weights = base
        self.left_out = dict(left_out or {})
        self._hook_handles = budget.attach_penalty(config, list(self.spectral_layers().values()))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "lm":
                raise
            return getattr(self.lm, name)

    def get_base_model(self) -> nn.Module:
        """The LM, its targeted modules replaced by adapter layers (as PEFT's ``PeftModel.get_base_model``)."""
        return self.lm

    def hosts(self) -> dict[str, SpectralLayer | ExpertsLayer]:
        """``{module path: wrapper}``: the spectral layers that replaced linear/Conv1D modules, and the
        :class:`ExpertsLayer` hosts that replaced experts modules."""
        return {n: m for n, m in self.lm.named_modules()
                if isinstance(m, ExpertsLayer) or (isinstance(m, SpectralLayer) and m.kind != "expert")}

    def spectral_layers(self) -> dict[str, SpectralLayer]:
        """``{matrix name: layer}`` for every adapted matrix (an expert's name is ``module.param.e``)."""
        out = {}
        for name, host in self.hosts().items():
            out.update(host.named_layers(name) if isinstance(host, ExpertsLayer) else {name: host})
        return out

    def adapted_counts(self) -> dict[str, int]:
        """How many matrices of each kind (``linear``, ``conv1d``, ``expert``) carry the adapter."""
        kinds = [layer.kind for layer in self.spectral_layers().values()]
        return {k: kinds.count(k) for k in KINDS if k in kinds}

    def adapted_summary(self) -> str:
        """One line: e.g. ``svf adapted 24 linear, 12 conv1d, 96 expert matrices``, then what a target rule left out
        and why."""
        counts = ", ".join(f"{n} {kind}" for kind, n in self.adapted_counts().items())
        line = f"{self.peft_config.method} adapted {counts} matrices"
        reasons: dict[str, list[str]] = {}
        for name, why in self.left_out.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            line += f"; left out {len(names)} {'matrix' if len(names) == 1 else 'matrices'} ({why}): {listing(names)}"
        return line

    def print_adapted(self) -> None:
        """Print :meth:`adapted_summary` (as ``print_trainable_parameters`` prints the parameter counts)."""
        print(self.adapted_summary())

    def budget_use(self) -> dict[str, float]:
        """``R(phi) / eps`` for every HiP-LoRA layer."""
        return budget.budget_use(self.spectral_layers())

    def project_budgets(self) -> None:
        """Project every ``phi`` onto its budget ball (HiP-LoRA in constraint mode; a no-op otherwise)."""
        budget.project(self.peft_config, list(self.spectral_layers().values()))

    def forward(self, *args: Any, **kwargs: Any):
        """The LM's forward. In training mode the returned ``loss`` also holds the value (not the gradient) of the
        method's penalty (:mod:`.budget`: the gradient comes from hooks on the layers, once per optimiser step)."""
        out = self.lm(*args, **kwargs)
        if self.training and getattr(out, "loss", None) is not None:
            penalty = budget.penalty_value(self.peft_config, list(self.spectral_layers().values()))
            if penalty is not None:
                out.loss = out.loss + penalty.to(out.loss.device, out.loss.dtype)
        return out

    def generate(self, *args: Any, **kwargs: Any):
        return self.lm.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        layers = list(self.spectral_layers().values())
        for layer in layers:
            layer.set_disabled(True)
        try:
            yield
        finally:
            for layer in layers:
                layer.set_disabled(False)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, the adapter's included."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's saved tensors (trainable parameters and persistent method state), keyed by module, whole
        and on the CPU. A tensor FSDP2 (``fully_shard``) has sharded is a ``DTensor``; it is gathered with
        ``full_tensor()``, a collective: under FSDP2 every rank must call this, in the same order."""
        state = {}
        for name, layer in self.spectral_layers().items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    state[f"{name}.{key}"] = budget.whole(value).detach().contiguous().cpu()
        return state

    def save_pretrained(self, path: str | Path, is_main_process: bool | None = None, **_: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each atomically) into ``path``: the
        adapter only, never the LM's weights. Keywords the Trainer and accelerate pass (``state_dict``,
        ``safe_serialization``) are ignored.

        Under ``torchrun`` every rank calls this: the tensors are gathered first (:meth:`adapter_state_dict`, a
        collective when FSDP2 shards them), then only the main process writes. ``is_main_process``: whether this
        process writes; ``None`` means rank 0 when ``torch.distributed`` is initialised, else ``True``."""
        if is_main_process is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            is_main_process = not distributed or torch.distributed.get_rank() == 0
        state = self.adapter_state_dict()
        if not is_main_process:
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        name_or_path = getattr(getattr(self.lm, "config", None), "_name_or_path", None)
        config = {"spectral_peft_version": __version__, **self.peft_config.to_dict(),
                  "base_model_name_or_path": name_or_path, "base_weights": self.base_weights}
        save_tensors_atomically(state, None, path / ADAPTER_WEIGHTS)  # mode 0o666 less the umask, like the config
        tmp = path / (ADAPTER_CONFIG + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, default=str))
        os.replace(tmp, path / ADAPTER_CONFIG)

    def load_adapter_weights(self, path: str | Path, is_trainable: bool = True) -> None:
        """Load the tensors of a saved adapter of the same method and matrices into this model (in place), e.g. a
        Trainer checkpoint when resuming."""
        d = read_adapter_config(path)
        if d.get("method") != self.peft_config.method or sorted(d.get("base_weights", {})) != sorted(self.base_weights):
            raise InputError(f"{path}: the saved adapter ({d.get('method')!r}) is not this model's "
                             f"{self.peft_config.method!r} adapter on the same matrices; load it with load_adapter")
        load_layer_states(self, load_file(str(Path(path) / ADAPTER_WEIGHTS)), path, is_trainable)

    def _restore(self, merge: bool) -> nn.Module:
        for layer in self.spectral_layers().values():
            if merge:
                layer.merge()
            else:
                layer.release()
        for name, host in self.hosts().items():
            self.lm.set_submodule(name, host.base_layer)
        for handle in self._hook_handles:
            handle.remove()
        return self.lm

    def merge_and_unload(self) -> nn.Module:
        """Write ``W + dW`` into every adapted linear and return the plain model."""
        return self._restore(merge=True)

    def unload(self) -> nn.Module:
        """Drop the adapter and return the plain, unchanged model."""
        return self._restore(merge=False)


_CLASSES: dict[type, type] = {}


def wrapper_class(model: nn.Module) -> type:
    """The :class:`SpectralPeftModel` subclass for ``type(model)``: its ``forward`` carries the LM's signature (the
    Trainer reads the signature for the columns to keep and the label names), under the name ``SpectralPeft<LM>``."""
    lm_class = type(model)
    if lm_class not in _CLASSES:
        def forward(self, *args: Any, **kwargs: Any):
            return SpectralPeftModel.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(lm_class.forward)
        forward.__doc__ = SpectralPeftModel.forward.__doc__
        name = f"SpectralPeft{lm_class.__name__}"
        _CLASSES[lm_class] = type(name, (SpectralPeftModel,), {"forward": forward, "__module__": __name__,
                                                                "__qualname__": name})
    return _CLASSES[lm_class]


def load_layer_states(wrapped: SpectralPeftModel, state: dict[str, torch.Tensor], path: str | Path,
                      is_trainable: bool) -> None:
    """Copy a saved adapter's tensors into ``wrapped``'s layers; refuse missing or unexpected keys."""
    for name, layer in wrapped.spectral_layers().items():
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        missing, unexpected = layer.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.startswith("base_layer.")]
        if missing or unexpected:
            raise InputError(f"{path}: {name} is missing {missing} / has unexpected {unexpected}")
        for pname, p in layer.named_parameters():
            p.requires_grad_(is_trainable and not pname.startswith("base_layer."))


def _svd_cache(svd_cache: SVDCache | str | Path | None) -> SVDCache:
    return svd_cache if isinstance(svd_cache, SVDCache) else SVDCache(svd_cache)


def _wrap(model: nn.Module, config: AdapterConfig, matrices: list[Matrix], svd_cache: SVDCache, progress: bool,
          left_out: dict[str, str] | None = None) -> SpectralPeftModel:
    for m in matrices:
        config.check_shape(m.name, m.shape)
    config.check_model(model)
    names = [m.name for m in matrices]
    base = base_identity(model, names)
    weights = matrix_weights(model, names)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    stash = WeightStash(svd_cache.root)
    experts: dict[str, dict[str, dict[int, SpectralLayer]]] = {}
    for m in tqdm(matrices, desc=f"{config.method}: SVD", unit="matrix", disable=not progress):
        W = weights[m.name]
        svd = svd_cache.get(W, k=config.svd_rank(m.shape), method=getattr(config, "svd_method", "exact"),
                            digest=base[m.name]["hash"])
        base_layer = ExpertMatrix(modules[m.module], m.param, m.expert) if m.kind == "expert" else modules[m.name]
        layer = config.make_layer(m.name, base_layer, svd.to(W.device)).to(W.device)
        layer.bind_base(base[m.name]["hash"], stash)
        if layer.expert_digest is not None:  # the layer folded part of its update into W: record W's new identity
            base[m.name]["expert_hash"] = layer.expert_digest
        if m.kind == "expert":
            experts.setdefault(m.module, {}).setdefault(m.param, {})[m.expert] = layer
        else:
            model.set_submodule(m.name, layer)
    for path, layers in experts.items():
        model.set_submodule(path, ExpertsLayer(modules[path], layers))
    wrapped = wrapper_class(model)(model, config, base, left_out)
    if progress:
        wrapped.print_adapted()
    return wrapped


def resolve_peft_targets(model: nn.Module, config: PeftConfig) -> None:
    """Resolve a PEFT LoRA config's rule (``mlp`` or ``all-linear``) as the spectral methods do: linear and Conv1D
    modules become ``target_modules`` (``fan_in_fan_out`` set when all are Conv1D), expert stacks become
    ``target_parameters``. PEFT adapts expert stacks for plain LoRA only, whole stacks at a time: other methods, or a
    stack with some experts excluded, are refused naming the stacks."""
    rule = config.target_modules
    if not (isinstance(rule, str) and rule in TARGET_RULES):
        return
    exclude = config.exclude_modules or []
    selection = select(model, rule, [exclude] if isinstance(exclude, str) else list(exclude), config.r)
    if not selection.matrices:
        raise InputError(f"no matrix of the model fits LoRA rank r={config.r} under targets {rule!r}")
    layers = [m for m in selection.matrices if m.kind != "expert"]
    stacks = sorted({m.stack for m in selection.matrices if m.kind == "expert"})
    if stacks:
        method = "dora" if config.use_dora else str(config.init_lora_weights)
        if config.use_dora or config.init_lora_weights not in (True, "gaussian"):
            raise InputError(f"{method} cannot adapt the 3-D expert stacks {listing(stacks)} (PEFT adapts them for "
                             "plain LoRA only); use lora or a spectral method, or exclude_modules=['experts']")
        count = {s: sum(1 for m in selection.matrices if m.kind == "expert" and m.stack == s) for s in stacks}
        params = dict(model.named_parameters())
        partial = [s for s in stacks if count[s] != params[s].shape[0]]
        if partial:
            raise InputError(f"PEFT adapts whole expert stacks; {listing(partial)} would be adapted in part")
    config.target_modules = [m.name for m in layers]
    config.target_parameters = stacks or None
    config.fan_in_fan_out = bool(layers) and all(m.kind == "conv1d" for m in layers)
    config.exclude_modules = None


def get_peft_model(
    model: nn.Module,
    config: AdapterConfig | PeftConfig,
    svd_cache: SVDCache | str | Path | None = None,
    calibration: Callable[[], None] | None = None,
    progress: bool = True,
):
    """Wrap ``model`` with the adapter ``config`` describes.

    ``svd_cache``: an :class:`SVDCache` or a directory for one (``None``: the directory in the environment variable
    ``SPECTRAL_PEFT_SVD_CACHE``, else SVDs stay in memory). PALoRA stashes the weights it folds into beside it.
    ``calibration``: for CorDA, a callable that runs the model on calibration data (PEFT's ``run_model``).
    """
    if isinstance(config, PeftConfig):
        import peft

        resolve_peft_targets(model, config)
        config.task_type = task_type(model)
        if getattr(config, "init_lora_weights", None) == "corda":
            if calibration is None:
                raise InputError("CorDA needs calibration data: pass calibration=<callable running the model>")
            from peft.tuners.lora.corda import preprocess_corda

            preprocess_corda(model, config, run_model=calibration)
        return peft.get_peft_model(model, config)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a spectral_peft or PEFT config, got {type(config).__name__}")
    selection = select_targets(model, config)
    return _wrap(model, config, selection.matrices, _svd_cache(svd_cache), progress, selection.left_out)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise MissingInputError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
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
        raise InputError(f"{path}: unknown adapter method {method!r}")
    state = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    check_identity(model, d["base_weights"])
    config = CONFIG_CLASSES[method].from_saved(d, state, d["base_weights"])
    by_name = {m.name: m for m in find_matrices(model)[0]}
    wrapped = _wrap(model, config, [by_name[n] for n in d["base_weights"]], _svd_cache(svd_cache), progress)
    load_layer_states(wrapped, state, path, is_trainable)
    return wrapped
