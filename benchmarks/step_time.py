#!/usr/bin/env python
"""Training-step time of every spectral-peft method against PEFT LoRA at the same rank, and top-k SVD time.

What it measures, top to bottom:

1. ``tiny_llama``: a few-million-parameter Llama (``LlamaConfig``: hidden 256, 4 layers, intermediate 688,
   vocab 512), batch 8 x 128 tokens. LoRA-family methods (LoRA, DoRA, PiSSA, MiLoRA, SVFT, OPLoRA, HiP-LoRA) target
   all linears but the LM head ("all-linear"); SVF and PALoRA target the MLP (gate/up/down_proj), so they are
   compared both with all-linear LoRA and with LoRA on the MLP only (``lora-mlp``).
2. ``svd``: ``svd_topk(W, 64, method="randomized")`` at a few (oversample, niter) settings against a full
   ``torch.linalg.svd`` of a 14336 x 4096 matrix (the weight of ``nn.Linear(4096, 14336)``) with a decaying
   spectrum; time ratio and the relative error of the top-64 singular values. The full SVD also seeds the adapters'
   SVD cache for step 3.
3. ``big_linear``: one ``nn.Linear(4096, 14336)`` (a Llama-3-8B ``gate_proj`` shape) wrapped in a small module, with
   a modest token batch, fewer repeats.

A training step is forward + backward + ``AdamW.step`` over the adapter's trainable parameters, fp32 (plus the
budget projection for HiP-LoRA, whose default ``budget_mode="constraint"`` runs it after every optimiser step).
Timings are paired and interleaved: each repeat visits every method once (rotated order) and times one step of it
right next to one step of its reference LoRA (LoRA on the same targets), so a slow patch of a shared machine hits
both alike. We report the median step time and the median over repeats of the paired ratio ``method / LoRA``, in
wall-clock time and, as a cross-check that other processes disturb less, in this process's CPU time.
PiSSA does exactly LoRA's computation after its init, so its ratio is an A/A check of the noise.

``--profile`` adds where the time goes: after the timed repeats, ``torch.profiler`` records a few steps of each method
(interleaved rounds) and the results get, per method and section, the aten ops per step and the ops with the most
self CPU time. On a small model the number of ops weighs as much as their FLOPs (docs/performance.md).

    python benchmarks/step_time.py                 # full run (10-20 minutes on 2 shared CPU cores)
    python benchmarks/step_time.py --quick         # tiny Llama only, few repeats
    python benchmarks/step_time.py --device cuda --out step_time.json
    python benchmarks/step_time.py --sections svd --threads 1   # the SVD timing alone, single-threaded
    python benchmarks/step_time.py --sections tiny,big --methods pissa,oplora,hiplora --profile   # a subset
"""

from __future__ import annotations

import os

# MKL/OpenMP threads that spin-wait make LAPACK (the full SVD) up to 30x slower when another process holds the
# cores (measured: 25 s vs 0.9 s for a 4096 x 1024 SVD on a busy 2-core machine). Must be set before torch loads.
# The price: every parallel op then wakes a sleeping thread (about 0.1 ms on the shared 2-core VM), which weighs on
# steps made of many small ops (docs/performance.md). OMP_WAIT_POLICY set but empty keeps OpenMP's own default
# (spin briefly, then sleep).
if os.environ.get("OMP_WAIT_POLICY") == "":
    del os.environ["OMP_WAIT_POLICY"]
else:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from spectral_peft import Probe, get_peft_model, method_config  # noqa: E402
from spectral_peft.adapters.base import MLP_MODULES  # noqa: E402
from spectral_peft.spectral import SVD, SVDCache, fix_signs, svd_full, svd_topk, weight_hash  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# Methods. ``targets``: "all" (all-linear) or "mlp"; each is timed against LoRA on the same targets (``reference``).
# Targets: OPLoRA, PALoRA and HiP-LoRA at <= 1.05 x LoRA, SVF at <= 1.3 x LoRA.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Method:
    label: str
    name: str
    kwargs: dict
    targets: str = "all"
    ranked: bool = True  # takes the LoRA rank ``r``
    target_ratio: float | None = None


METHODS = [
    Method("lora", "lora", {}),
    Method("lora-mlp", "lora", {}, targets="mlp"),
    Method("dora", "dora", {}),
    Method("pissa", "pissa", {}),
    Method("milora", "milora", {}),
    Method("svft", "svft", {"pattern": "plain"}, ranked=False),
    Method("oplora", "oplora", {"k": 16}, target_ratio=1.05),
    Method("hiplora", "hiplora", {"k": 16}, target_ratio=1.05),
    Method("palora", "palora", {"rho": 0.1}, targets="mlp", target_ratio=1.05),
    Method("svf-recompose", "svf", {"forward_mode": "recompose"}, targets="mlp", ranked=False, target_ratio=1.3),
    Method("svf-factorised", "svf", {"forward_mode": "factorised"}, targets="mlp", ranked=False, target_ratio=1.3),
]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)}" if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoSVDCache(SVDCache):
    """In-memory SVDs shared by every method: one full SVD per distinct weight; exact top-k is sliced from it.

    (The library's ``SVDCache`` keys files by ``k``, so an exact top-16 after a full SVD would redo the full SVD.)
    """

    def __init__(self):
        super().__init__(root=None)
        self.full: dict[str, SVD] = {}

    def get(self, weight, k=None, method="exact", digest=None):
        if method != "exact":
            return super().get(weight, k=k, method=method, digest=digest)
        digest = digest or weight_hash(weight)
        if digest not in self.full:
            self.full[digest] = svd_full(weight)
        svd = self.full[digest]
        return svd if k is None else svd.top(k)


@dataclass
class Run:
    """A wrapped model ready to train: ``step()`` runs one full training step."""

    model: nn.Module
    step: Callable[[], None]
    trainable: int


def build_run(method: Method, base: nn.Module, mlp_targets, all_targets, rank, probe, cache, loss_fn, device,
              peft_task, pissa_niter=None) -> Run:
    """Copy ``base``, wrap it with ``method`` and return its training step."""
    # PiSSA writes its residual into W and PALoRA folds its expert into W in place: they get their own copy
    model = copy.deepcopy(base) if method.name in ("pissa", "palora") else shallow_copy(base)
    kwargs = dict(method.kwargs)
    kwargs["target_modules"] = mlp_targets if method.targets == "mlp" else all_targets
    if method.ranked:
        kwargs["r"] = rank
    if method.name == "palora":
        kwargs["probe"] = probe
    if method.name == "pissa" and pissa_niter is not None:
        kwargs["pissa_niter"] = pissa_niter
    config = method_config(method.name, **kwargs)
    if method.name in ("lora", "dora", "pissa"):
        config.task_type = peft_task
        wrapped = get_peft_model(model, config)
    else:
        wrapped = get_peft_model(model, config, svd_cache=cache, progress=False)
    wrapped.to(device).train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    after = wrapped.project_budgets if method.name == "hiplora" else (lambda: None)

    def step() -> None:
        loss = loss_fn(wrapped)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after()

    return Run(wrapped, step, sum(p.numel() for p in params))


def shallow_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose parameters share storage with it (for the adapters that never write to ``W``)."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in base.parameters()}
    return copy.deepcopy(base, memo)


def make_probe(base: nn.Module, mlp_targets, cache, seed: int = 0) -> Probe:
    """An SVF expert with slightly perturbed ``z``, frozen into a probe (as PALoRA's stage 1 would leave it)."""
    svf = get_peft_model(shallow_copy(base), method_config("svf", target_modules=mlp_targets), svd_cache=cache,
                         progress=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in svf.named_parameters():
            if name.endswith("svf_param"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    probe = Probe.from_model(svf)
    svf.unload()
    return probe


def select(methods: list[Method], wanted: str | None) -> list[Method]:
    """The methods named in ``wanted`` (comma-separated labels; all when ``None``) plus the LoRA runs they are timed
    against."""
    if wanted is None:
        return methods
    names = set(wanted.split(","))
    unknown = names - {m.label for m in methods}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {[m.label for m in methods]}")
    if any(m.targets == "mlp" for m in methods if m.label in names):
        names.add("lora-mlp")
    return [m for m in methods if m.label in names | {"lora"}]


def reference(method: Method, labels) -> str:
    """The LoRA run a method is paired with: LoRA on the same targets (``lora-mlp`` for MLP methods)."""
    if method.label == "lora-mlp" or method.targets != "mlp" or "lora-mlp" not in labels:
        return "lora"
    return "lora-mlp"


def time_one(run: Run, steps: int, device) -> tuple[float, float]:
    """Seconds per step: wall clock, and this process's CPU time (less sensitive to other processes' load)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        run.step()
    sync(device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def time_methods(runs: dict[str, Run], methods: list[Method], repeats: int, slow_repeats: int, warmup: int,
                 device, desc: str) -> dict[str, list[dict]]:
    """Paired, interleaved timing of one step at a time.

    Each repeat visits every method (in a rotated order) and times it right next to its reference LoRA (reference
    first on even repeats, method first on odd ones), so both see the same load on a shared machine. A method whose
    warm-up step took over 2x LoRA's is "slow": its ratio is far from any target, so it is timed in the first
    ``slow_repeats`` repeats only. Returns ``label -> [{"wall": (method_s, ref_s), "cpu": (method_s, ref_s)}]``.
    """
    warm = {}
    for label in tqdm(runs, desc=f"{desc}: warm-up", leave=False):
        for _ in range(warmup):
            warm[label] = time_one(runs[label], 1, device)[0]
    others = [m for m in methods if m.label != "lora"]
    slow = {m.label for m in others if warm[m.label] > 2 * warm[reference(m, runs)]}
    pairs = {m.label: [] for m in others}
    for rep in tqdm(range(repeats), desc=f"{desc}: repeats"):
        for m in others[rep % len(others):] + others[: rep % len(others)]:
            if m.label in slow and rep >= slow_repeats:
                continue
            ref = reference(m, runs)
            if rep % 2 == 0:
                t_ref, t_m = time_one(runs[ref], 1, device), time_one(runs[m.label], 1, device)
            else:
                t_m, t_ref = time_one(runs[m.label], 1, device), time_one(runs[ref], 1, device)
            pairs[m.label].append({"wall": (t_m[0], t_ref[0]), "cpu": (t_m[1], t_ref[1])})
    return pairs


def summarise(pairs, methods: list[Method], runs: dict[str, Run]) -> dict:
    """Per method: median step time; median paired ratio to LoRA on the same targets; ratio to all-linear LoRA
    (paired for the all-linear methods, ratio of medians for the MLP ones). All wall clock."""
    med = statistics.median
    lora = [p for m in methods if m.label in pairs and reference(m, runs) == "lora" for p in pairs[m.label]]
    lora_s = [p["wall"][1] for p in lora]
    rows = {"lora": {"targets": "all", "trainable_params": runs["lora"].trainable, "step_s_median": med(lora_s),
                     "n_pairs": len(lora_s), "ratio_vs_lora_same_targets": 1.0, "ratio_vs_lora_all_linear": 1.0,
                     "reference": None, "target_ratio": None,
                     # CPU time / wall time of the LoRA steps: how many cores this process actually got
                     "cores_used": med(p["cpu"][1] / p["wall"][1] for p in lora)}}
    for m in methods:
        if m.label not in pairs:
            continue
        ref = reference(m, runs)
        paired = med(p["wall"][0] / p["wall"][1] for p in pairs[m.label])
        step_s = med(p["wall"][0] for p in pairs[m.label])
        rows[m.label] = {
            "targets": m.targets,
            "trainable_params": runs[m.label].trainable,
            "step_s_median": step_s,
            "n_pairs": len(pairs[m.label]),
            "ratio_vs_lora_same_targets": 1.0 if m.label == "lora-mlp" else paired,
            "ratio_vs_lora_all_linear": paired if ref == "lora" else step_s / med(lora_s),
            "reference": ref,
            "target_ratio": m.target_ratio,
            "pairs": pairs[m.label],
        }
    return rows


def print_table(title: str, rows: dict) -> None:
    print(f"\n== {title} ==")
    print(f"{'method':<19}{'targets':<8}{'trainable':>11}{'pairs':>6}{'step ms':>10}{'/LoRA(all)':>12}"
          f"{'/LoRA(same)':>13}  target")
    for label, r in rows.items():
        t = r["target_ratio"]
        verdict = "" if t is None else f"<= {t}: {'met' if r['ratio_vs_lora_same_targets'] <= t else 'MISSED'}"
        print(f"{label:<19}{r['targets']:<8}{r['trainable_params']:>11,d}{r['n_pairs']:>6}"
              f"{1e3 * r['step_s_median']:>10.1f}{r['ratio_vs_lora_all_linear']:>12.3f}"
              f"{r['ratio_vs_lora_same_targets']:>13.3f}  {verdict}")
    print("/LoRA(same): median paired ratio to LoRA on the same targets (targets are judged on it); /LoRA(all): to "
          "all-linear LoRA\n(ratio of medians for the MLP methods). pairs: timed (method, LoRA) step pairs. "
          f"Cores this process got (CPU/wall time of LoRA steps): {rows['lora']['cores_used']:.2f}")


def profile_steps(runs: dict[str, Run], device, rounds: int = 3, steps: int = 2, top: int = 12) -> dict:
    """Where a step's time goes, per method: ``rounds`` interleaved rounds of ``steps`` profiled steps each.

    Returns ``label -> {"aten_ops_per_step", "self_cpu_ms_per_step", "top": [{"op", "calls_per_step",
    "self_cpu_ms_per_step", "share"}]}``, ``top`` ordered by self CPU time; ``share`` is of the step's self CPU time.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    totals = {label: {} for label in runs}
    for rep in tqdm(range(rounds), desc="profile", leave=False):
        labels = list(runs)
        for label in labels[rep % len(labels):] + labels[: rep % len(labels)]:
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    runs[label].step()
                sync(device)
            for e in prof.key_averages():
                calls, self_us = totals[label].get(e.key, (0, 0.0))
                totals[label][e.key] = (calls + e.count, self_us + e.self_cpu_time_total)
    n = rounds * steps
    out = {}
    for label, ops in totals.items():
        total_us = sum(t for _, t in ops.values())
        ranked = sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]
        out[label] = {
            "aten_ops_per_step": sum(c for k, (c, _) in ops.items() if k.startswith("aten::")) / n,
            "self_cpu_ms_per_step": total_us / n / 1e3,
            "top": [{"op": k, "calls_per_step": c / n, "self_cpu_ms_per_step": t / n / 1e3, "share": t / total_us}
                    for k, (c, t) in ranked],
        }
    return out


def print_profile(title: str, prof: dict) -> None:
    print(f"\n== {title}: where a step's time goes (self CPU time, torch.profiler) ==")
    for label, p in prof.items():
        ops = ", ".join(f"{t['op'].removeprefix('aten::')[:24]} {100 * t['share']:.0f}% ({t['calls_per_step']:.0f})"
                        for t in p["top"][:5])
        print(f"{label:<19}{p['aten_ops_per_step']:>7.0f} aten ops/step {p['self_cpu_ms_per_step']:>8.1f} ms  {ops}")


def decaying_matrix(m: int, n: int, noise: float, seed: int, device) -> torch.Tensor:
    """``U diag(s) V^T + noise * G``: ``U``, ``V`` Haar-random orthonormal (QR of Gaussians), ``s_i = i^-0.5``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r0 = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r0, generator=g).to(device))
    V, _ = torch.linalg.qr(torch.randn(n, r0, generator=g).to(device))
    s = torch.arange(1, r0 + 1, dtype=torch.float32, device=device) ** -0.5
    return (U * s) @ V.T + noise * torch.randn(m, n, generator=g).to(device)


# --------------------------------------------------------------------------------------------------------------
# (a) tiny Llama, batch 8 x 128
# --------------------------------------------------------------------------------------------------------------


def run_tiny_llama(args, device, repeats: int) -> dict:
    """A few-million-parameter Llama: all-linear targets for the LoRA family, the MLP for SVF and PALoRA."""
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    llama = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in llama.parameters())
    batch = torch.randint(0, config.vocab_size, (8, 128), device=device)
    llama_loss = lambda model: model(input_ids=batch, labels=batch).loss  # noqa: E731
    print(f"\n(a) tiny Llama: {n_params / 1e6:.2f}M params, batch {tuple(batch.shape)}, {repeats} repeats")

    cache = MemoSVDCache()
    probe = make_probe(llama, list(MLP_MODULES), cache)
    methods = select(METHODS, args.methods)
    runs = {m.label: build_run(m, llama, list(MLP_MODULES), "all-linear", args.rank, probe, cache, llama_loss,
                               device, peft_task="CAUSAL_LM")
            for m in tqdm(methods, desc="tiny Llama: wrap")}
    pairs = time_methods(runs, methods, repeats, repeats, warmup=2, device=device, desc="tiny Llama")
    out = {"params": n_params, "batch": list(batch.shape), "repeats": repeats,
           "methods": summarise(pairs, methods, runs)}
    print_table("tiny Llama: step time and ratio to PEFT LoRA", out["methods"])
    if args.profile:
        out["profile"] = profile_steps(runs, device)
        print_profile("tiny Llama", out["profile"])
    return out


# --------------------------------------------------------------------------------------------------------------
# SVD: randomised top-64 vs full torch.linalg.svd, 14336 x 4096, decaying spectrum
# --------------------------------------------------------------------------------------------------------------

SVD_SHAPE, SVD_K = (14336, 4096), 64
SVD_SETTINGS = [(10, 4), (32, 4), (64, 4), (128, 4), (64, 8)]  # (oversample, niter); (10, 4) is svd_topk's default


def timed(fn: Callable, device):
    """``(fn(), wall seconds)``."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_svd(args, device, timed_section: bool) -> tuple[torch.Tensor, SVD, dict | None]:
    """Build the matrix; time its full SVD once and each randomised setting ``--svd-repeats`` times.

    The full SVD runs in the middle of the randomised rounds, so both see about the same machine load. Returns the
    matrix and its full SVD (signs fixed as ``svd_full`` fixes them), which the big-linear section reuses as its
    weight and as its adapters' SVD cache.
    """
    m, n = SVD_SHAPE
    k = SVD_K
    print(f"\nSVD: building a {m} x {n} matrix U diag(i^-0.5) V^T + 1e-4 N(0, 1)")
    W = decaying_matrix(m, n, noise=1e-4, seed=0, device=device)
    rounds = args.svd_repeats if timed_section else 0
    times = {setting: [] for setting in SVD_SETTINGS}
    tops = {}
    for rep in tqdm(range(max(rounds, 1)), desc="SVD rounds"):
        if rep == rounds // 2:
            (U, S, Vh), full_s = timed(lambda: torch.linalg.svd(W, full_matrices=False), device)
            print(f"full torch.linalg.svd: {full_s:.1f} s")
        for setting in SVD_SETTINGS if timed_section else []:
            oversample, niter = setting
            top, t = timed(lambda: svd_topk(W, k, method="randomized", oversample=oversample, niter=niter), device)
            times[setting].append(t)
            tops.setdefault(setting, []).append(top.S)
    U, V = fix_signs(U, Vh.T)
    svd = SVD(U.contiguous(), S, V.contiguous())
    if not timed_section:
        return W, svd, None

    rows = []
    for (oversample, niter), values in tops.items():
        rel = torch.stack([(s - S[:k]).abs() / S[:k] for s in values]).cpu()  # runs x k
        median_s = statistics.median(times[oversample, niter])
        rows.append({"oversample": oversample, "niter": niter, "time_s_median": median_s,
                     "time_s_all": times[oversample, niter], "time_ratio": median_s / full_s,
                     "max_rel_err_top_k": rel.max().item(), "rel_err_sigma_k_per_run": rel[:, -1].tolist()})
    out = {"shape": [m, n], "k": k, "matrix": "U diag(s) V^T + 1e-4 N(0,1), U and V Haar (QR of Gaussians), "
           "s_i = i^-0.5", "sigma": {str(i + 1): S[i].item() for i in (0, k - 1, k, n - 1)},
           "full_svd_s": full_s, "randomized": rows}
    print(f"\n== top-{k} randomised SVD vs full SVD ({m} x {n}); target: ratio <= 0.1, rel. err <= 1e-3 ==")
    print(f"{'oversample':>10}{'niter':>6}{'time s':>9}{'ratio':>8}{'max rel err':>13}  verdict")
    for r in rows:
        ok = r["time_ratio"] <= 0.1 and r["max_rel_err_top_k"] <= 1e-3
        print(f"{r['oversample']:>10}{r['niter']:>6}{r['time_s_median']:>9.2f}{r['time_ratio']:>8.3f}"
              f"{r['max_rel_err_top_k']:>13.2e}  {'met' if ok else 'MISSED'}")
    print("max rel err: max over the top-k singular values and over the runs of |s_rand - s_full| / s_full")
    return W, svd, out


# --------------------------------------------------------------------------------------------------------------
# (b) one nn.Linear(4096, 14336) with the matrix above as its weight
# --------------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """A single big linear under a name (``proj``) that target matching can find."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def run_big_linear(args, device, W: torch.Tensor, svd: SVD) -> dict:
    """Every method on one big linear; the full SVD from the SVD section seeds the cache (no second SVD)."""
    m, n = W.shape
    tokens = args.big_tokens or (8192 if device.type == "cuda" else 512)
    block = Block(W)
    cache = MemoSVDCache()
    cache.full[weight_hash(block.proj.weight)] = svd
    x = torch.randn(tokens, n, device=device)
    big_loss = lambda model: model(x).pow(2).mean()  # noqa: E731
    # one target: "mlp" and "all" are the same here
    methods = [mt for mt in select(METHODS, args.methods) if mt.label != "lora-mlp"]
    print(f"\n(b) nn.Linear({n}, {m}), {tokens} tokens per step, {args.big_repeats} repeats "
          f"({args.big_slow_repeats} for methods over 2x slower than LoRA; PiSSA init: pissa_niter=4)")
    probe = make_probe(block, ["proj"], cache)
    runs = {mt.label: build_run(mt, block, ["proj"], ["proj"], args.rank, probe, cache, big_loss, device,
                                peft_task=None, pissa_niter=4)
            for mt in tqdm(methods, desc="big linear: wrap")}
    pairs = time_methods(runs, methods, args.big_repeats, args.big_slow_repeats, warmup=1, device=device,
                         desc="big linear")
    out = {"shape": [m, n], "tokens": tokens, "repeats": args.big_repeats, "slow_repeats": args.big_slow_repeats,
           "methods": summarise(pairs, methods, runs)}
    for row in out["methods"].values():
        row["targets"] = "proj"
    print_table(f"nn.Linear({n}, {m}), {tokens} tokens: step time and ratio to PEFT LoRA", out["methods"])
    if args.profile:
        out["profile"] = profile_steps(runs, device, rounds=2, steps=1)
        print_profile(f"nn.Linear({n}, {m})", out["profile"])
    return out


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama only, few repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r of every ranked method")
    parser.add_argument("--repeats", type=int, default=None, help="tiny Llama repeats (default 11, --quick 3)")
    parser.add_argument("--big-repeats", type=int, default=10, help="repeats on the big linear")
    parser.add_argument("--big-slow-repeats", type=int, default=3,
                        help="repeats on the big linear for methods over 2x slower than LoRA")
    parser.add_argument("--big-tokens", type=int, default=None,
                        help="tokens per step on the big linear (default 512 on CPU, 8192 on CUDA)")
    parser.add_argument("--svd-repeats", type=int, default=3, help="repeats of each randomised SVD (full: 1)")
    parser.add_argument("--sections", default="tiny,svd,big", help="comma-separated subset of tiny,svd,big")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method labels to time (default: all); their LoRA references are added")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a few steps per method (aten ops per step, top ops by self CPU time)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    sections = {"tiny"} if args.quick else set(args.sections.split(","))
    select(METHODS, args.methods)  # refuse unknown labels before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 11)
    torch.manual_seed(0)
    results = {
        "command": " ".join(["python", "benchmarks/step_time.py", *sys.argv[1:]]),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "OpenMP default"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "rank": args.rank,
    }
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'OpenMP default')}")

    if "tiny" in sections:
        results["tiny_llama"] = run_tiny_llama(args, device, repeats)
    if sections & {"svd", "big"}:
        W, svd, results["svd"] = run_svd(args, device, timed_section="svd" in sections)
    if "big" in sections:
        results["big_linear"] = run_big_linear(args, device, W, svd)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
