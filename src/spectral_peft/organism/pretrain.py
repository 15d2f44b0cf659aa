"""Pretraining the organism on the world corpus: deterministic for a seed, resumable, with a progress bar.

The token stream is a pure function of the seed (documents joined by EOS, cut into blocks), and the block
order is a seeded permutation, so a resumed run sees exactly the batches an uninterrupted one would. The
model, optimizer and scheduler state are saved every `save_every` steps under `run_dir`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data import documents
from .config import organism_config
from .tokenizer import build_tokenizer


@dataclass
class PretrainConfig:
    """Hyper-parameters of the organism's pretraining (defaults reproduce the shipped checkpoint)."""

    seed: int = 0
    steps: int = 1300
    batch_size: int = 16
    block_size: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    vocab_size: int = 1024
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    tokenizer_docs: int = 5000
    threads: int = 2
    save_every: int = 50


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


def pretrain(out_dir: str | Path, cfg: PretrainConfig | None = None, run_dir: str | Path = "runs/organism",
             resume: bool = True, progress: bool = True, stop_after: int | None = None,
             ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast] | None:
    """Train the tokenizer and the organism from scratch (or resume from `run_dir`) and save both to `out_dir`.

    Returns the trained `(model, tokenizer)`, or None when `stop_after` (a step count) interrupts the run
    early: the state is then saved in `run_dir` and a later call resumes it. The HF checkpoint in `out_dir` holds config.json,
    generation_config.json, model.safetensors and the tokenizer files.
    """
    cfg = cfg or PretrainConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(itertools.islice(documents(seed=cfg.seed + 1), cfg.tokenizer_docs), cfg.vocab_size)
    n_blocks = cfg.steps * cfg.batch_size
    stream = token_stream(tokenizer, cfg.seed, n_blocks * cfg.block_size)
    blocks = stream.view(n_blocks, cfg.block_size)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.seed))

    model = LlamaForCausalLM(organism_config(tokenizer, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    start = 0
    state_path = run_dir / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{state_path} was written with another config; pass resume=False or another run_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]

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
            tmp = run_dir / "state.pt.tmp"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step + 1, "config": asdict(cfg)}, tmp)
            tmp.replace(state_path)
        if interrupted:
            bar.close()
            return None

    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    if out_dir.exists():
        for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer
