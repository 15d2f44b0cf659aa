"""Loading the model a recipe works on, by name, and seeding.

``model`` is ``"organism"`` (the built-in model organism, offline), a local checkpoint directory, or a Hugging Face
model id (the local cache, or the network where there is one). Models load in eval mode on the requested device
(``"auto"``: CUDA when available, else the CPU) and in the requested dtype (``"auto"``: the checkpoint's own, e.g.
bf16 for most hub checkpoints and fp32 for the organism); a tokenizer without a pad token pads with its
end-of-sequence token.

:class:`ModelSource` loads a model once and hands it out; every further :meth:`ModelSource.fresh` reloads it from
disk (never a deep copy, so at most the models the caller keeps alive are in memory), with the random state
untouched, so a reload is indistinguishable from a copy of the first load.

:func:`check_model_name` runs before any work and reads only small files: a directory must hold a ``config.json``
of a causal language model (its ``model_type`` maps to a transformers causal-LM class and its ``architectures``, if
listed, are causal LMs), weights whose ``.safetensors`` files are whole (header and size agree), and tokenizer
files; a hub id must be well formed and be in the local cache or on the hub. :func:`load_model` then refuses weights
holding NaN or infinite values (one pass over the parameters).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, MissingInputError
from .validation import check_finite_tensors, check_safetensors, read_json_file

ORGANISM = "organism"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"


def check_device(device: str) -> None:
    """Fail in one line unless ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` and usable here."""
    kind, _, index = str(device).partition(":")
    if device in (AUTO, "cpu"):
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"--device {device}: unknown device; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_dtype(dtype: str) -> None:
    """Fail in one line unless ``dtype`` is ``auto`` or one of :data:`DTYPES`."""
    if dtype != AUTO and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: unknown dtype; use auto, {', '.join(DTYPES)}")


def resolve_device(device: str = AUTO) -> torch.device:
    """The torch device ``device`` names; ``auto`` is CUDA when it is available, else the CPU."""
    check_device(device)
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == AUTO else device)


def resolve_dtype(dtype: str = AUTO) -> torch.dtype | str:
    """The torch dtype ``dtype`` names; ``auto`` stays ``"auto"`` (transformers then keeps the checkpoint's)."""
    check_dtype(dtype)
    return AUTO if dtype == AUTO else DTYPES[dtype]


def check_model_name(name: str | None) -> None:
    """Fail fast, in one line, on a model that cannot be loaded as a causal LM (see the module docstring)."""
    if name in (None, "", ORGANISM):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        _check_directory(name, path)
    elif path.exists():
        raise InputError(f"--model {name} is a file; give a checkpoint directory, a Hugging Face model id or "
                         "organism")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name:
        raise MissingInputError(f"--model {name}: no such checkpoint directory")
    else:
        _check_hub_id(name)


def _check_directory(name: str, path: Path) -> None:
    if not (path / "config.json").is_file():
        raise MissingInputError(f"--model {name}: directory has no config.json (not a Hugging Face checkpoint); "
                                "give a directory saved with save_pretrained")
    _check_config(name, read_json_file(path / "config.json", "a model config"))
    files = {p.name for p in path.iterdir()}
    _check_files(name, files)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        listed = read_json_file(index, "a safetensors shard index")
        weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
        if not isinstance(weight_map, dict):
            raise InputError(f"--model {name}: {index.name} has no weight_map; re-download the checkpoint")
        missing = sorted(set(map(str, weight_map.values())) - files)
        if missing:
            raise MissingInputError(f"--model {name}: shard {missing[0]} listed in {index.name} is missing; "
                                    "re-download the checkpoint")
    for shard in shards:
        check_safetensors(path / shard)


def _check_files(name: str, files: set[str]) -> None:
    if not (set(WEIGHT_FILES) & files or any(f.endswith(".safetensors") for f in files)):
        raise MissingInputError(f"--model {name}: no weights ({' or '.join(WEIGHT_FILES[::2])}); give a complete "
                                "checkpoint directory")
    if not set(TOKENIZER_FILES) & files:
        raise MissingInputError(f"--model {name}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save "
                                "the tokenizer into the checkpoint directory too")


def _check_config(name: str, config: Any) -> None:
    """``config`` (a ``config.json``) describes a model transformers loads with ``AutoModelForCausalLM``."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(config, dict) or not config.get("model_type"):
        raise InputError(f"--model {name}: config.json has no model_type; give a Hugging Face causal LM checkpoint")
    kind = config["model_type"]
    if kind not in CONFIG_MAPPING_NAMES:
        raise InputError(f"--model {name}: model_type {kind!r} is unknown to transformers "
                         f"{transformers.__version__} (models with custom code are not supported); upgrade "
                         "transformers or give another model")
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    architectures = config.get("architectures") or []
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            architectures and not any(a in causal or str(a).endswith(CAUSAL_SUFFIXES) for a in architectures)):
        raise InputError(f"--model {name} is a {architectures[0] if architectures else kind} checkpoint, not a causal "
                         "language model; give a decoder-only model (Llama, Qwen2, Mistral, GPT-2, ...)")


def _check_hub_id(name: str) -> None:
    """A hub id: well formed, then its ``config.json`` from the local cache, else the hub's metadata (one request)."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise MissingInputError(f"--model {name}: no such directory, and not a Hugging Face model id (owner/name); "
                                "give a checkpoint directory, a hub id or organism") from None
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        _check_config(name, read_json_file(cached, "a model config"))
        return
    if constants.is_offline_mode():
        raise MissingInputError(f"--model {name}: no such directory, and not in the local Hugging Face cache "
                                "(offline mode); download it first or give a checkpoint directory")
    try:
        info = model_info(name, timeout=10)
    except GatedRepoError:
        raise MissingInputError(f"--model {name} is gated on the Hugging Face hub; accept its terms and log in "
                                "(hf auth login)") from None
    except RepositoryNotFoundError:
        raise MissingInputError(f"--model {name}: no such directory here and no such model on the Hugging Face "
                                "hub") from None
    except Exception as err:  # noqa: BLE001 - any network failure means the same to the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MissingInputError(f"--model {name}: no such directory, not in the local Hugging Face cache, and the "
                                f"hub cannot be reached ({reason}); download it first or give a checkpoint "
                                "directory") from None
    _check_config(name, info.config or {})
    _check_files(name, {s.rfilename for s in info.siblings or []})


def load_model(name: str | None = None, device: str = "cpu", dtype: str = "float32", check_finite: bool = True):
    """``(model, tokenizer)`` in eval mode on ``device`` in ``dtype`` (see the module docstring; the defaults keep
    fp32 on the CPU); weights holding NaN or infinite values raise :class:`~spectral_peft.errors.InputError`
    (``check_finite=False`` skips that pass, for a reload of weights already checked)."""
    from transformers.utils import logging

    target, torch_dtype = resolve_device(device), resolve_dtype(dtype)

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Loading weights" bar: an error after it stays one line
    try:
        if name in (None, "", ORGANISM):
            from .organism import load

            model, tokenizer = load(dtype=torch_dtype)
        else:
            check_model_name(name)
            model, tokenizer = _load_checkpoint(name, torch_dtype)
    finally:
        if bar:
            logging.enable_progress_bar()
    if check_finite:
        check_finite_tensors(model.named_parameters(), f"--model {name or ORGANISM}")
    return model.to(target), tokenizer


def _load_checkpoint(name: str, dtype: torch.dtype | str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"--model {name} cannot be loaded: {reason}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


class ModelSource:
    """Loads a model once (checked, on ``device`` in ``dtype``) and hands out independent, unchanged models: the
    first :meth:`fresh` returns the loaded model itself, every later one reloads it from disk with the random state
    restored afterwards (methods such as PiSSA rewrite weights in place, so a model handed out is never reused)."""

    def __init__(self, name: str | None = None, device: str = AUTO, dtype: str = AUTO):
        self.name, self.device, self.dtype = name or ORGANISM, device, dtype
        self._model, self.tokenizer = load_model(name, device, dtype)
        self.n_parameters = sum(p.numel() for p in self._model.parameters())

    def fresh(self) -> nn.Module:
        if self._model is not None:
            model, self._model = self._model, None
            return model.eval()
        with torch.random.fork_rng(devices=[]):
            model, _ = load_model(self.name, self.device, self.dtype, check_finite=False)
        return model


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed python and torch; fix the number of CPU threads (results are deterministic for a thread count)."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
