"""The model organism: a tiny Llama pretrained on the generated world, shipped in `spectral_peft/toy/`.

:func:`load` reads the shipped checkpoint (or another directory). :func:`pretrain` writes a new one into its own run
directory, never into the package; :func:`install` is the separate, explicit step that replaces the shipped
checkpoint with a validated one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from ..errors import InputError, MissingInputError, OutputExistsError
from .config import organism_config, tiny_random_model
from .pretrain import PretrainConfig, pretrain
from .tokenizer import build_tokenizer

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "toy"


def load(path: str | Path | None = None, dtype=None):
    """`(model, tokenizer)` from the shipped checkpoint (or `path`), offline, in eval mode (safetensors only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else CHECKPOINT_DIR
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                 dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def check_checkpoint(path: str | Path) -> None:
    """Raise a one-line error unless `path` loads as a causal LM (safetensors, no missing or unexpected weights)
    with its tokenizer, every weight is finite, and the tokenizer's ids fit the embedding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"{path} is not a directory; pass the checkpoint pretrain-organism wrote "
                                "(RUN/checkpoint)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                           dtype=torch.float32, output_loading_info=True)
    except Exception as err:  # transformers raises many kinds; each means "not a checkpoint"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path} does not load as a causal LM with its tokenizer ({first})") from err
    broken = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if broken:
        kind, names = next(iter(broken.items()))
        raise InputError(f"{path}: the weights do not match the config ({kind.replace('_', ' ')}: "
                         f"{min(map(str, names))}, ...)")
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise InputError(f"{path} has non-finite weights in {bad[0]} ({len(bad)} tensors); retrain it")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise InputError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                         f"{model.get_input_embeddings().num_embeddings}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or
    file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def install(checkpoint: str | Path, target: str | Path = CHECKPOINT_DIR, force: bool = False) -> Path:
    """Replace the checkpoint in `target` (default: the shipped organism) with a copy of `checkpoint`.

    `checkpoint` is validated first (:func:`check_checkpoint`); an existing `target` is replaced only with
    `force`. The top-level files of `checkpoint` are copied to ``.<target>.new`` beside `target`, and the two
    directories are swapped in one atomic rename where the system has one (Linux); elsewhere `target` is first
    moved to ``.<target>.old``, so the old checkpoint is never deleted before the new one is in place. The old
    one is removed last. Leftovers of an interrupted install are ours and are cleared first (an old checkpoint
    found aside while `target` is missing is moved back).
    """
    checkpoint, target = Path(checkpoint).absolute(), Path(target).absolute()
    if checkpoint.resolve() == target.resolve() or target.resolve() in checkpoint.resolve().parents:
        raise InputError(f"{checkpoint} is the installed checkpoint itself; pass the directory pretrain-organism "
                         "wrote (RUN/checkpoint)")
    check_checkpoint(checkpoint)
    new, old = target.with_name(f".{target.name}.new"), target.with_name(f".{target.name}.old")
    if not os.access(target.parent, os.W_OK):
        raise InputError(f"cannot write to {target.parent}; run as a user who may modify it")
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    if target.exists() and not force:
        raise OutputExistsError(f"{checkpoint} is a valid checkpoint; pass --force to replace {target} with it")
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    new.mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            shutil.copy2(f, new / f.name)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)
    else:
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    return target


__all__ = ["CHECKPOINT_DIR", "PretrainConfig", "build_tokenizer", "check_checkpoint", "install", "load",
           "organism_config", "pretrain", "tiny_random_model"]
