"""One rank of tests/test_distributed.py: ``torchrun --nproc_per_node 2 distributed_worker.py OUT STRATEGY...``
(gloo, CPU).

Strategies: ``ddp`` (``DistributedDataParallel``), ``fsdp2`` (``fully_shard`` on each decoder layer and on the
wrapper) and ``zero3`` (DeepSpeed ZeRO-3, every parameter partitioned, after wrapping). Methods: ``palora`` with a
random probe, and ``hiplora`` in constraint mode with a budget small enough to bind (not under ``zero3``: there the
worker records the one-line error the budget projection raises instead). For each pair every rank builds the same
tiny random Llama and adapter init (seed 0), wraps it through the SVD cache ``OUT/<strategy>-<method>/cache`` (all
ranks at once, after a barrier), and trains ``STEPS`` AdamW steps on rank-dependent batches with
:func:`spectral_peft.attach_budget_projection`. Two more post-step hooks, registered before and after the
projection's, read the whole ``phi`` of every HiP-LoRA layer around it. Then every rank calls
``save_pretrained(OUT/<strategy>-<method>/adapter)`` (under ZeRO-3 inside ``GatheredParameters``) and writes, into
the same directory, what the test compares:

- ``rank<r>.safetensors``: the whole adapter state and the logits on a fixed input, as this rank sees them;
- ``rank<r>.json``: the SVD cache entries this rank computed; how many projections ran; ``R(phi)`` per layer before
  and after each projection and ``eps``; per step, the largest distance of the projected ``phi`` from the
  single-process projection of the whole pre-projection ``phi``; the buffers DDP broadcasts (``named_buffers`` of
  the DDP module) and the derived tensors (cached singular vectors, folded weights) of the adapter layers.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import tiny_model  # tests/ is sys.path[0] when this file runs as a script
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import spectral_peft.budget
import spectral_peft.spectral.cache as cache_module
from spectral_peft import attach_budget_projection, get_peft_model
from spectral_peft.adapters import method_config
from spectral_peft.adapters.derived import DerivedState
from spectral_peft.adapters.hiplora import weighted_ball_projection
from spectral_peft.errors import InputError
from spectral_peft.model import base_identity
from spectral_peft.probe import Probe
from spectral_peft.budget import hip_layers

STEPS = 3
EPS = 1e-4  # HiP-LoRA's budget: lr 1e-2 steps leave this ball, so the projection acts on every step


def random_probe(model: torch.nn.Module) -> Probe:
    """Random SVF scales ``z = 1 + 0.2 N(0, 1)`` on the MLP matrices (a stand-in expert, the same on every rank)."""
    gen = torch.Generator().manual_seed(0)
    mlp = {n: m.weight for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))}
    scales = {n: 1 + 0.2 * torch.randn(min(w.shape), generator=gen) for n, w in mlp.items()}
    return Probe(scales, base_identity(model, list(mlp)))


def config(method: str, model: torch.nn.Module):
    if method == "hiplora":
        return method_config("hiplora", r=4, k=4, budget_mode="constraint", budget_eps=EPS)
    return method_config("palora", r=4, rho=0.25, probe=random_probe(model))


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class Counter:
    """Calls of a module function, counted (and their arguments kept) while it stays replaced."""

    def __init__(self, module, name: str, keep=lambda *a: None):
        self.calls, self.module, self.name, self.original = [], module, name, getattr(module, name)
        setattr(module, name, lambda *a: self.calls.append(keep(*a)) or self.original(*a))

    def restore(self) -> list:
        setattr(self.module, self.name, self.original)
        return self.calls


def shard(strategy: str, model: torch.nn.Module):
    """``(module to call, optimiser, step(loss), context gathering the trainable parameters)`` for ``strategy``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if strategy == "zero3":
        import deepspeed

        ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
                     "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2),
                                                 config=ds_config)

        def engine_step(loss: torch.Tensor) -> None:
            engine.backward(loss)
            engine.step()

        return engine, opt, engine_step, lambda: deepspeed.zero.GatheredParameters(trainable)
    if strategy == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        for layer in model.lm.model.layers:
            fully_shard(layer)
        trained = fully_shard(model)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad()

    return trained, opt, step, contextlib.nullcontext


def run(strategy: str, method: str, out: Path) -> None:
    rank = dist.get_rank()
    computed = Counter(cache_module, "_compute", keep=lambda w, k, m: [list(w.shape), k, m])
    torch.manual_seed(0)  # the same base and adapter init on every rank
    base = tiny_model()
    dist.barrier()  # every rank asks the cache for the same entries at the same time
    model = get_peft_model(base, config(method, base), svd_cache=out / "cache", progress=False)
    computed = computed.restore()
    derived = [f"{path}.{name}" for path, m in model.named_modules() if isinstance(m, DerivedState)
               for name in m.derived_tensors()]
    model.train()
    trained, opt, step, gathered = shard(strategy, model)
    broadcast = [n.removeprefix("module.") for n, _ in trained.named_buffers()] if strategy == "ddp" else []
    if strategy == "zero3" and method == "hiplora":
        try:
            model.project_budgets()
            error = None
        except InputError as e:
            error = str(e)
        (out / f"rank{rank}.json").write_text(json.dumps({"error": error}))
        return
    hip = hip_layers(model.spectral_layers().values())
    record = {"before": [], "after": [], "deviation": [], "eps": [layer.budget_eps for layer in hip]}
    pre = []

    def read_before(*_):
        pre[:] = [whole(layer.hip_phi) for layer in hip]
        record["before"].append([float((layer.budget_w * p**2).sum()) for layer, p in zip(hip, pre)])

    def read_after(*_):
        post = [whole(layer.hip_phi) for layer in hip]
        record["after"].append([float((layer.budget_w * p**2).sum()) for layer, p in zip(hip, post)])
        want = [weighted_ball_projection(p, layer.budget_w, torch.tensor(layer.budget_eps))
                for layer, p in zip(hip, pre)]
        record["deviation"].append(max((float((a - b).abs().max()) for a, b in zip(post, want)), default=0.0))

    projections = Counter(spectral_peft.budget, "project")
    if hip:
        opt.register_step_post_hook(read_before)
        attach_budget_projection(opt, trained)
        opt.register_step_post_hook(read_after)
    for i in range(STEPS):
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1000 * rank + i))
        step(trained(input_ids=ids, labels=ids).loss)
    projections = projections.restore()
    with gathered():
        model.save_pretrained(out / "adapter")  # on every rank: the gather is a collective, rank 0 writes
        state = model.adapter_state_dict()
    trained.eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = trained(input_ids=ids).logits
    save_file({**state, "logits": logits.contiguous()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({**record, "computed": computed, "projections": len(projections),
                                                      "broadcast": broadcast, "derived": derived}))


def main(out: Path, strategies: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for strategy in strategies:
        for method in ("palora", "hiplora"):
            run(strategy, method, out / f"{strategy}-{method}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
