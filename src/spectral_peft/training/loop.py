"""A small, seeded training loop for adapters: AdamW, warm-up + linear/cosine schedule, periodic validation and
best-state keeping, a progress bar, HiP-LoRA's budget projection after each optimiser step, and resumable
checkpoints.

Why not ``transformers.Trainer``: the wrapped models do train under ``Trainer`` (with :class:`BudgetCallback`; see
``tests/test_model.py``), but the experiments here train a 2M-parameter organism for a few hundred steps, where
``Trainer``'s per-step overhead (accelerate wrapping, logging, callbacks) is comparable to the step itself, and
REINFORCE needs rollouts inside the step, which ``Trainer`` does not model. The loop is deterministic for a seed and
a thread count, and works identically for :class:`SpectralPeftModel` and PEFT models: it only calls ``model(...)``,
the objective's loss, and ``model.project_budgets()`` when the model has it.

Checkpoints (``TrainConfig.checkpoint_dir``): every ``checkpoint_every`` steps the loop writes ``step-NNNNNNNN/``
into a hidden ``.tmp-step-NNNNNNNN/`` first and renames it into place (``os.replace``), then removes the older one,
so a kill at any instant leaves one complete checkpoint. A checkpoint holds, with no pickle anywhere:

- ``trainable.safetensors``: the parameters that require gradients;
- ``optimizer.safetensors``: AdamW's per-parameter tensors (``exp_avg``, ``exp_avg_sq``, ``step``), keyed
  ``<param index>.<name>``;
- ``rng.safetensors``: the torch CPU generator (and each CUDA device's, when CUDA is in use) as uint8 tensors;
- ``best.safetensors`` (with ``keep_best``, once a validation has scored): the best trainable state so far;
- ``state.json``: the position (``step``, ``epoch``, ``batch`` = batches of that epoch done), the optimiser's
  param groups and non-tensor state, the scheduler's state, Python's ``random.getstate()``, the losses, logs,
  validation records, best step and score, the seconds trained so far, and a fingerprint of the run (data size,
  step count, hyper-parameters, trainable parameter shapes).

The batch order needs no saved generator: epoch ``e`` is shuffled by a generator seeded with ``(seed, e)``. On
start, a checkpoint whose fingerprint matches is restored (one line on stderr says so) and training continues at the
next batch; the result (parameters, losses, logs, validation) is bitwise that of an uninterrupted run on the CPU. A
checkpoint of another run is refused. When training completes the checkpoints are removed (and the directory, if the
loop left it empty).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import InputError

SCHEDULES = ("linear", "cosine", "constant")
CHECKPOINT_EVERY = 25


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    ``epochs``: passes over the data (``max_steps`` caps the number of optimiser steps when set).
    ``schedule``: ``linear`` or ``cosine`` decay to ``min_lr_ratio * lr`` after ``warmup_ratio`` of the steps, or
    ``constant``. ``eval_every``: validate every so many steps (and always at the end) when a validator is given.
    ``keep_best``: restore the trainable parameters of the best validation score at the end.
    ``stop_score``: end training at the first validation whose score is ``>= stop_score`` (early stopping at a
    target; needs ``eval_every``). ``epochs``/``max_steps`` are then the cap, and the learning-rate schedule is the one
    over the cap (a run that stops early has not decayed to its end). ``None``: train to the cap.
    ``checkpoint_dir``: where resumable checkpoints go (``None``: none); ``checkpoint_every``: steps between them.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    keep_best: bool = True
    stop_score: float | None = None
    progress: bool = True
    desc: str = "train"
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = CHECKPOINT_EVERY

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InputError("epochs and batch_size must be >= 1 and lr > 0")
        if self.checkpoint_every < 1:
            raise InputError(f"checkpoint_every must be >= 1 step, got {self.checkpoint_every}")
        if self.stop_score is not None and not (math.isfinite(self.stop_score) and (self.eval_every or 0) >= 1):
            raise InputError(f"stop_score must be a finite number and needs eval_every >= 1 (validations that can stop "
                             f"training), got stop_score={self.stop_score}, eval_every={self.eval_every}")


@dataclass
class TrainResult:
    """What happened: per-step losses and logs, the validation history, and the kept step. ``reached_stop_score``
    (with ``TrainConfig.stop_score``, else ``None``): whether a validation reached it, ending training there; ``False``
    means the cap was reached first."""

    steps: int
    losses: list[float]
    logs: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_score: float | None = None
    reached_stop_score: bool | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``total``."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    shape = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters that require gradients."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, v in state.items():
        params[n].copy_(v)


def _batches(n: int, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).tolist()
    return [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]


# --- checkpoints ----------------------------------------------------------------------------------------------------

def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The optimiser's state dict as JSON (param groups, non-tensor state) and tensors (``<index>.<name>``)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return {"param_groups": sd["param_groups"], "state": scalars}, tensors


def _join_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in saved["state"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in group.items()}
              for group, current in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _restore_rng(python_state: list, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _plain(value: Any) -> Any:
    """JSON for a numpy or torch number (a log value) that the json module does not know."""
    return value.tolist() if hasattr(value, "tolist") else float(value)


class Checkpoints:
    """The checkpoints of one training run in ``directory`` (module docstring); ``fingerprint`` identifies the run."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]):
        self.directory = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))

    def _ours(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted([*self.directory.glob("step-*"), *self.directory.glob(".tmp-step-*")])

    def latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint's ``state.json`` and tensors (``None`` when there is none); a temporary
        directory a killed run left behind is removed."""
        for tmp in [p for p in self._ours() if p.name.startswith(".tmp-")]:
            shutil.rmtree(tmp)
        done = [p for p in self._ours() if (p / "state.json").is_file()]
        if not done:
            return None
        path = done[-1]
        state = json.loads((path / "state.json").read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(f"the checkpoint in {path} belongs to another training run (other data, settings or "
                             "model); remove it, or rerun with --overwrite, to start over")
        state["tensors"] = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors")}
        return state

    def save(self, step: int, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
        """Write ``state.json`` and one ``<name>.safetensors`` per tensor group, atomically, as ``step-<step>``."""
        name = f"step-{step:08d}"
        tmp, final = self.directory / f".tmp-{name}", self.directory / name
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for group, values in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, str(tmp / f"{group}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"format": 1, "fingerprint": self.fingerprint, **state},
                                                   default=_plain))
        os.replace(tmp, final)
        for old in self._ours():
            if old != final:
                shutil.rmtree(old)
        return final

    def remove(self) -> None:
        """Remove every checkpoint, and the directory when nothing else is in it."""
        for path in self._ours():
            shutil.rmtree(path)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()


def _fingerprint(model: torch.nn.Module, n_data: int, total: int, cfg: TrainConfig) -> dict[str, Any]:
    """The run's identity in its checkpoints. ``stop_score`` counts only when set, so a checkpoint written before the
    field existed still resumes."""
    skip = {"progress", "desc", "checkpoint_dir", "checkpoint_every"}
    if cfg.stop_score is None:
        skip.add("stop_score")
    return {"n_data": n_data, "total": total, "config": {k: v for k, v in asdict(cfg).items() if k not in skip},
            "parameters": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}}


# --- the loop -------------------------------------------------------------------------------------------------------

def train(model, data: Sequence[Any], objective, cfg: TrainConfig | None = None,
          validate: Callable[[Any], float | dict[str, Any]] | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require gradients on ``data`` with ``objective``.

    ``objective`` has ``collate(items) -> batch`` and ``loss(model, batch) -> (loss, logs)`` (see
    :mod:`.objectives`). ``validate(model)`` returns a score (higher is better) or a dict with a ``"score"`` key
    (its other entries are numbers, or lists of per-item numbers, recorded as given); it runs every ``eval_every``
    steps and at the end, in eval mode. With ``keep_best`` the best-scoring trainable state is restored at the end.
    With ``cfg.stop_score``, training ends right after the first validation scoring ``>= stop_score`` (no further
    validation; the model is the one at that step unless ``keep_best`` restores an earlier state).
    With ``cfg.checkpoint_dir``, training resumes from a checkpoint found there (module docstring). The model is
    left in eval mode.
    """
    cfg = cfg or TrainConfig()
    if not data:
        raise InputError("no training data")
    if cfg.stop_score is not None and validate is None:
        raise InputError("stop_score needs a validator (validate=...) whose score is compared with it")
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))
    project = getattr(model, "project_budgets", None)
    result = TrainResult(steps=0, losses=[])
    best_state: dict[str, torch.Tensor] | None = None
    step, start_epoch, start_batch, seconds_before = 0, 0, 0, 0.0
    checkpoints = None if cfg.checkpoint_dir is None else \
        Checkpoints(cfg.checkpoint_dir, _fingerprint(model, len(data), total, cfg))
    saved = checkpoints.latest() if checkpoints is not None else None
    if saved is not None:
        tensors = saved["tensors"]
        load_trainable_state(model, tensors["trainable"])
        _join_optimizer(optimizer, saved["optimizer"], tensors["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _restore_rng(saved["python_random"], tensors["rng"])
        best_state = tensors.get("best")
        step, start_epoch, start_batch = saved["step"], saved["epoch"], saved["batch"]
        tqdm.write(f"{cfg.desc}: resuming at step {step} of {total} from the checkpoint in {checkpoints.directory}",
                   file=sys.stderr)
        seconds_before = saved["seconds"]
        result = TrainResult(steps=step, losses=saved["losses"], logs=saved["logs"], validation=saved["validation"],
                             best_step=saved["best_step"], best_score=saved["best_score"])

    def run_validation(step: int) -> bool:
        """Validate at ``step``; whether the score reached ``cfg.stop_score``."""
        nonlocal best_state
        model.eval()
        with torch.no_grad():
            out = validate(model)
        model.train()
        out = {"score": out} if not isinstance(out, dict) else out
        out = {k: [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v) for k, v in out.items()}
        result.validation.append({"step": step, **out})
        if step > 0 and (result.best_score is None or out["score"] > result.best_score):
            result.best_score, result.best_step = out["score"], step
            if cfg.keep_best:
                best_state = trainable_state(model)
        return cfg.stop_score is not None and out["score"] >= cfg.stop_score

    def save_checkpoint(epoch: int, batch: int) -> None:
        opt_json, opt_tensors = _split_optimizer(optimizer)
        state = {"step": step, "epoch": epoch, "batch": batch, "optimizer": opt_json,
                 "scheduler": scheduler.state_dict(), "python_random": random.getstate(), "losses": result.losses,
                 "logs": result.logs, "validation": result.validation, "best_step": result.best_step,
                 "best_score": result.best_score, "seconds": seconds_before + time.perf_counter() - t0}
        tensors = {"trainable": trainable_state(model), "optimizer": opt_tensors, "rng": _rng_tensors()}
        if best_state is not None:
            tensors["best"] = best_state
        checkpoints.save(step, state, tensors)

    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=total, initial=step, desc=cfg.desc, disable=not cfg.progress, unit="step")
    stopped = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_batch if epoch == start_epoch else 0
            for batch, idx in enumerate(_batches(len(data), cfg, epoch)[skip:], start=skip):
                if step >= total:
                    break
                loss, logs = objective.loss(model, objective.collate([data[i] for i in idx]))
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if project is not None:
                    project()
                step += 1
                loss_value = loss.item()
                result.losses.append(loss_value)
                result.logs.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], **logs})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", epoch=epoch + 1)
                if validate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    stopped = run_validation(step)
                    if stopped:
                        break
                if checkpoints is not None and step % cfg.checkpoint_every == 0 and step < total:
                    save_checkpoint(epoch, batch + 1)
            if stopped:
                break
        if validate is not None and not stopped:
            stopped = run_validation(step)
    finally:
        bar.close()
    if cfg.keep_best and best_state is not None and result.best_step != step:
        load_trainable_state(model, best_state)
    if checkpoints is not None:
        checkpoints.remove()
    result.steps = step
    result.reached_stop_score = stopped if cfg.stop_score is not None else None
    result.seconds = seconds_before + time.perf_counter() - t0
    model.eval()
    return result
