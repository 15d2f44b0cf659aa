"""Training objectives: supervised fine-tuning on (prompt, target) pairs, and REINFORCE with a task's checker.

An objective turns a list of raw items into a batch (``collate``) and a batch into a scalar loss plus logs
(``loss``). The loop in :mod:`spectral_peft.training.loop` is agnostic to which one it runs.

- :class:`SFTObjective`: next-token cross-entropy on the target tokens only (prompt and padding are masked with
  ``-100``); the prompt is tokenised with the tokenizer's special tokens, the target without, so the boundary is
  exact. Batches are right-padded.
- :class:`ReinforceObjective` (Transformer-squared): ``samples`` rollouts of the current model per prompt (greedy
  at ``temperature = 0``, else sampled from ``p^(1/temperature)``), reward ``r = +1`` when the task's checker accepts
  the rollout and ``-1`` otherwise, advantage ``A = r`` (``baseline="none"``) or ``A_ij = r_ij - mean_j r_ij``
  (``baseline="group"``: the mean reward of the prompt's group of samples, so a group whose samples all score the
  same contributes no gradient), loss ``-(sum of rollout token log-probs) * A`` averaged over all rollouts, plus an
  optional ``kl_coef * KL(p_model || p_base)`` summed over rollout tokens and averaged over rollouts (the base is the
  model with its adapter disabled). The defaults (one greedy rollout, no baseline) are the original objective.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

IGNORE_INDEX = -100


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, prompt: str, target: str, max_length: int | None = None,
                append_eos: bool = False) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one pair: labels are ``-100`` on the prompt tokens, the target ids elsewhere.

    Truncation (to ``max_length``) drops tokens from the left of the prompt, so the target is kept whole.
    """
    p = tokenizer(prompt)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        t = t + [tokenizer.eos_token_id]
    ids, labels = p + t, [IGNORE_INDEX] * len(p) + t
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return ids, labels


def collate_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int | None = None,
                  append_eos: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt and padding)."""
    enc = [encode_pair(tokenizer, p, t, max_length, append_eos) for p, t in pairs]
    width = max(len(ids) for ids, _ in enc)
    ids = torch.full((len(enc), width), _pad_id(tokenizer), dtype=torch.long)
    labels = torch.full((len(enc), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for row, (i, lab) in enumerate(enc):
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(i)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def masked_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token NLL of ``labels`` under ``logits`` (shifted by one), ignoring ``-100``.

    ``reduction="mean"`` averages over all labelled tokens of the batch; ``"sum_per_row"`` returns one sum per row.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(labels.shape)
    if reduction == "sum_per_row":
        return nll.sum(1)
    n = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return nll.sum() / n


def _device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class SFTObjective:
    """Cross-entropy on the target tokens of ``(prompt, target)`` pairs."""

    tokenizer: Any
    max_length: int | None = 512
    append_eos: bool = False

    def collate(self, items: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        return collate_pairs(self.tokenizer, items, self.max_length, self.append_eos)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = masked_nll(out.logits, batch["labels"])
        return loss, {"nll": loss.item()}


@contextlib.contextmanager
def _adapter_disabled(model):
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:  # no adapter: the base is the model itself
        yield


BASELINES = ("none", "group")


def group_advantages(rewards: torch.Tensor, group_size: int, baseline: str = "group") -> torch.Tensor:
    """Advantages of rewards laid out as consecutive groups of ``group_size`` samples of one prompt:
    ``A_ij = r_ij - mean_j r_ij`` for ``baseline="group"``, ``A = r`` for ``"none"``."""
    if baseline not in BASELINES:
        raise InputError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
    if baseline == "none":
        return rewards
    groups = rewards.view(-1, group_size)
    return (groups - groups.mean(1, keepdim=True)).reshape(-1)


@dataclass
class ReinforceObjective:
    """REINFORCE on a task with a checker (items are the task's ``Example`` objects); see the module docstring.

    ``samples`` rollouts per prompt, at ``temperature`` (0: greedy), with advantage ``baseline`` "none" or "group".
    """

    tokenizer: Any
    task: Any
    kl_coef: float = 0.0
    max_new_tokens: int = 96
    max_length: int | None = 512
    samples: int = 1
    temperature: float = 0.0
    baseline: str = "none"

    def __post_init__(self) -> None:
        if self.samples < 1 or not self.temperature >= 0:
            raise InputError(f"reinforce needs samples >= 1 and temperature >= 0, got samples={self.samples}, "
                             f"temperature={self.temperature}")
        if self.baseline not in BASELINES:
            raise InputError(f"unknown baseline {self.baseline!r}; choose from {', '.join(BASELINES)}")

    def collate(self, items: Sequence[Any]) -> list[Any]:
        return list(items)

    @torch.no_grad()
    def rollouts(self, model, examples: Sequence[Any]) -> tuple[list[str], torch.Tensor]:
        """``samples`` completions per example (cut at the first newline), grouped by example (``samples``
        consecutive entries each), and their rewards (+1 correct, -1 otherwise). Sampling is seeded from the torch
        generator, so a run (and a resumed run) is deterministic."""
        from ..evaluation.generation import generate

        repeated = [e for e in examples for _ in range(self.samples)]
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": 1.0,
                    "seed": int(torch.randint(0, 2**31 - 1, (1,)))} if self.temperature > 0 else {}
        was_training = model.training
        model.eval()
        try:
            outputs = generate(model, self.tokenizer, [e.prompt for e in repeated], max_new_tokens=self.max_new_tokens,
                               batch_size=len(repeated), progress=False, **sampling)
        finally:
            model.train(was_training)
        rewards = torch.tensor([1.0 if self.task.check(o, e) else -1.0 for o, e in zip(outputs, repeated)])
        return outputs, rewards

    def loss(self, model, examples: Sequence[Any]) -> tuple[torch.Tensor, dict[str, float]]:
        outputs, rewards = self.rollouts(model, examples)
        advantages = group_advantages(rewards, self.samples, self.baseline)
        repeated = [e for e in examples for _ in range(self.samples)]
        # the rollout is scored as its text plus the stop newline that ended it
        pairs = [(e.prompt, o + "\n") for e, o in zip(repeated, outputs)]
        batch = collate_pairs(self.tokenizer, pairs, self.max_length)
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp_sum = -masked_nll(logits, batch["labels"], reduction="sum_per_row")
        loss = -(logp_sum * advantages.to(logp_sum.device)).mean()
        logs = {"reward": float(rewards.mean()), "accuracy": float((rewards > 0).float().mean())}
        if self.samples > 1:
            same = (rewards.view(-1, self.samples) == rewards.view(-1, self.samples)[:, :1]).all(1)
            logs["uniform_groups"] = float(same.float().mean())
        if self.kl_coef > 0:
            with torch.no_grad(), _adapter_disabled(model):
                base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
            logp = F.log_softmax(logits[:, :-1].float(), -1)
            logq = F.log_softmax(base_logits[:, :-1].float(), -1)
            kl = ((logp.exp() * (logp - logq)).sum(-1) * mask).sum(1).mean()
            loss = loss + self.kl_coef * kl
            logs["kl"] = float(kl.detach())
        return loss, logs
