"""Pretraining the organism on the world corpus: deterministic for a seed, resumable, with a progress bar.

The token stream is a pure function of the seed (documents joined by EOS, cut into blocks), and the block
order is a seeded permutation, so a resumed run sees exactly the batches an uninterrupted one would.

Everything lives in one directory, ``run_dir``:

- ``state.safetensors``, written atomically every ``save_every`` steps (temporary file, then rename): the model's
  parameters and buffers (``model.<name>``), the AdamW moments and step counts (``optimizer.<index>.<key>``) and the
  torch CPU generator state as a uint8 tensor (``rng.torch``). The file's header metadata holds one JSON document
  (key ``state``): the step, the data position (blocks consumed, ``step * batch_size``), the config, the optimizer's
  param groups, the scheduler's state and Python's ``random`` state. Nothing is pickled, so a crafted state file
  cannot run code; it can only fail to load.
- ``checkpoint/``, the finished Hugging Face checkpoint (config.json, generation_config.json, model.safetensors and
  the tokenizer files), written once the last step is done. Installing it as the shipped organism is a separate,
  explicit step (:func:`spectral_peft.organism.install`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data import documents
from ..errors import InputError
from .config import organism_config
from .tokenizer import SPECIAL_TOKENS, build_tokenizer

STATE = "state.safetensors"
CHECKPOINT = "checkpoint"
MAX_POSITIONS = 512  # organism_config's position limit: a block may not be longer


@dataclass
class PretrainConfig:
    """Hyper-parameters of the organism's pretraining (defaults reproduce the shipped checkpoint)."""

    seed: int = 0
    steps: int = 1600
    batch_size: int = 16
    block_size: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 6
    num_heads: int = 4
    tokenizer_docs: int = 5000
    threads: int = 2
    save_every: int = 50

    def validate(self) -> None:
        """Raise a one-line :class:`InputError` on a value that cannot train (cheap; call before any work)."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = int if f.type in (int, "int") else float
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise InputError(f"{f.name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
            if not math.isfinite(value):
                raise InputError(f"{f.name} must be a finite number, got {value}")
        minimum = {"seed": 0, "steps": 1, "batch_size": 1, "block_size": 2, "warmup": 0, "hidden_size": 2,
                   "intermediate_size": 1, "num_layers": 1, "num_heads": 1, "tokenizer_docs": 1, "threads": 1,
                   "save_every": 1, "weight_decay": 0.0,
                   "vocab_size": 256 + len(SPECIAL_TOKENS)}  # the byte alphabet and the special tokens
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise InputError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.block_size > MAX_POSITIONS:
            raise InputError(f"block_size must be <= {MAX_POSITIONS} (the organism's positions), got {self.block_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise InputError(f"hidden_size ({self.hidden_size}) must split into num_heads ({self.num_heads}) heads "
                             "of even width (RoPE rotates pairs)")


def token_stream(tokenizer: PreTrainedTokenizerFast, seed: int, n_tokens: int) -> torch.Tensor:
    """The first `n_tokens` tokens of the seeded corpus, documents separated by EOS."""
    out: list[int] = []
    docs = documents(seed=seed)
    while len(out) < n_tokens:
        batch = list(itertools.islice(docs, 512))
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            out.extend(ids)
            out.append(tokenizer.eos_token_id)
    return torch.tensor(out[:n_tokens], dtype=torch.long)


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each tensor once (the tied output embedding is the input embedding)."""
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def save_state(path: Path, model, optimizer, scheduler, step: int, cfg: PretrainConfig) -> None:
    """Write the training state after `step` steps to `path` atomically (see the module docstring for the layout)."""
    optim = optimizer.state_dict()
    tensors = {f"model.{name}": t.detach().contiguous() for name, t in _model_tensors(model).items()}
    for index, slots in optim["state"].items():
        for key, value in slots.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{key} is not a tensor; only tensor state is saved")
            tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    version, internal, gauss = random.getstate()
    meta = {"step": step, "data_position": step * cfg.batch_size, "config": asdict(cfg),
            "optimizer_param_groups": optim["param_groups"], "optimizer_slots": {str(i): sorted(s)
                                                                                 for i, s in optim["state"].items()},
            "scheduler": scheduler.state_dict(), "python_rng": [version, list(internal), gauss]}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"state": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: Path, model, optimizer, scheduler, cfg: PretrainConfig) -> int:
    """Restore model, optimizer, scheduler and RNG states from `path` in place; return the step to continue from.

    Raises :class:`InputError` when the file is unreadable or incomplete, was written with another config, or
    does not match the model.
    """
    redo = "start over in another run directory (pretrain-organism: --overwrite or another --out)"
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if meta["config"] != asdict(cfg):
            raise InputError(f"{path} was written with another config; {redo}")
        if meta["data_position"] != meta["step"] * cfg.batch_size or not 0 <= meta["step"] <= cfg.steps:
            raise InputError(f"{path} has an inconsistent step ({meta['step']}) and data position; {redo}")
        live = _model_tensors(model)
        saved = {key[len("model."):]: t for key, t in tensors.items() if key.startswith("model.")}
        if saved.keys() != live.keys() or any(saved[k].shape != live[k].shape for k in live):
            raise InputError(f"{path} holds another model's tensors; {redo}")
        with torch.no_grad():
            for name, tensor in live.items():
                tensor.copy_(saved[name])
        optimizer.load_state_dict({
            "state": {int(i): {key: tensors[f"optimizer.{i}.{key}"] for key in keys}
                      for i, keys in meta["optimizer_slots"].items()},
            "param_groups": meta["optimizer_param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
        if isinstance(err, InputError):
            raise
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise InputError(f"{path} is not a readable pretraining state ({reason}); {redo}") from err
    return meta["step"]


def _save_checkpoint(model, tokenizer, run_dir: Path) -> Path:
    """Write the Hugging Face checkpoint to ``run_dir/checkpoint`` through a temporary directory.

    A checkpoint already there (a resumed run that had finished) is regenerable from the state beside it, so it is
    replaced by the new, identical one.
    """
    target, tmp = run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def pretrain(run_dir: str | Path, cfg: PretrainConfig | None = None, progress: bool = True,
             stop_after: int | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast] | None:
    """Train the tokenizer and the organism from scratch, or resume from ``run_dir/state.safetensors``, and save
    the finished checkpoint to ``run_dir/checkpoint``.

    Returns the trained ``(model, tokenizer)``, or None when ``stop_after`` (a step count) interrupts the run
    early: the state is then saved and a later call with the same ``run_dir`` and config resumes it, ending
    bit-identical to an uninterrupted run.
    """
    cfg = cfg or PretrainConfig()
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(itertools.islice(documents(seed=cfg.seed + 1), cfg.tokenizer_docs), cfg.vocab_size)
    n_blocks = cfg.steps * cfg.batch_size
    stream = token_stream(tokenizer, cfg.seed, n_blocks * cfg.block_size)
    blocks = stream.view(n_blocks, cfg.block_size)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.seed))

    model = LlamaForCausalLM(organism_config(tokenizer, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
                                             cfg.num_heads, MAX_POSITIONS))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    state_path = run_dir / STATE
    start = load_state(state_path, model, optimizer, scheduler, cfg) if state_path.exists() else 0

    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain", disable=not progress)
    for step in bar:
        batch = blocks[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        interrupted = stop_after is not None and stop_after <= step + 1 < cfg.steps
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or interrupted:
            save_state(state_path, model, optimizer, scheduler, step + 1, cfg)
        if interrupted:
            bar.close()
            return None

    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    _save_checkpoint(model, tokenizer, run_dir)
    return model, tokenizer
