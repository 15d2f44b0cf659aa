#!/usr/bin/env python
"""Memory of one training step of every method against PEFT LoRA, same targets ("mlp") and rank.

For each method it reports:

- ``retained``: the bytes a training step keeps alive beyond the frozen base, counted exactly from tensors after one
  forward + backward + ``AdamW.step``: the adapter's parameters, its buffers, its derived state (cached singular
  vectors, folded weights), the gradients and AdamW's moments, each storage counted once, minus the base model's own
  parameters and buffers;
- ``peak`` (the training step's): ``torch.cuda.max_memory_allocated`` on a GPU, otherwise the peak RSS of the
  process, both reset after wrapping (on Linux ``/proc/self/clear_refs`` resets the peak RSS), over forward,
  backward and ``AdamW.step``;
- ``wrap_peak``: the same peak while wrapping, which for the SVD methods holds one matrix's SVD in flight;
- all as ratios to LoRA's. Each method runs in a fresh process (one subprocess per method).

Models: ``organism`` (the shipped checkpoint) and ``llama8b-layer``, one decoder layer with Llama-3.1-8B's shapes
(hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary 256) in bf16 with random weights. SVF and PALoRA need full
SVDs (minutes each for a 4096 x 14336 matrix on two CPU cores); ``--quick`` scales the layer down 8x.

    python benchmarks/memory.py --quick
    python benchmarks/memory.py --models organism,llama8b-layer --out benchmarks/results/memory.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

METHODS = ("lora", "oplora", "hiplora", "palora", "svf", "svft", "milora")


def build_base(model: str, quick: bool, device: str):
    """The base model (eval mode, frozen weights) and a batch of token ids."""
    if model == "organism":
        from spectral_peft.loading import load_model

        base = load_model("organism")[0]
        dtype = torch.float32
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        scale = 8 if quick else 1
        cfg = LlamaConfig(vocab_size=256, hidden_size=4096 // scale, intermediate_size=14336 // scale,
                          num_hidden_layers=1, num_attention_heads=32 // scale, num_key_value_heads=8 // scale,
                          head_dim=128, max_position_embeddings=256)
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg)
        dtype = torch.bfloat16
    base = base.to(device=device, dtype=dtype).eval()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    return base, ids


def probe_for(base):
    """A probe over the MLP with scales ``1 + 0.1 N(0, 1)`` (a stand-in for a trained SVF expert; built without an
    SVD, so that it adds nothing to the measured peaks)."""
    from spectral_peft import Probe, method_config
    from spectral_peft.model import base_identity, find_targets

    names = find_targets(base, method_config("svf", target_modules="mlp"))
    base_ids = base_identity(base, names)
    g = torch.Generator().manual_seed(0)
    scales = {n: 1 + 0.1 * torch.randn(min(base_ids[n]["shape"]), generator=g) for n in names}
    return Probe(scales, base_ids)


def config(method: str, base, rank: int):
    from spectral_peft import method_config

    kw = {"oplora": dict(k=16), "hiplora": dict(k=16), "palora": dict(probe=probe_for(base)) if method == "palora"
          else {}}.get(method, {})
    return method_config(method, target_modules="mlp", **({"r": rank} if method not in ("svf", "svft") else {}), **kw)


def storages(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def reset_peak(device: str) -> None:
    """Start a new peak: CUDA's allocator statistics, or this process's peak RSS (``VmHWM``)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak(device: str) -> int:
    """Bytes at the peak since :func:`reset_peak`."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(model_name: str, method: str, quick: bool, device: str, rank: int) -> dict:
    """One method's retained bytes and peaks (this process's own: call it in a fresh process)."""
    from spectral_peft import get_peft_model
    from spectral_peft.adapters.derived import DerivedState

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base, ids = build_base(model_name, quick, device)
    base_bytes = storages([*base.parameters(), *base.buffers()])
    cfg = config(method, base, rank)
    reset_peak(device)
    t0 = time.perf_counter()
    wrapped = get_peft_model(base, cfg, progress=False)
    wrap_s = time.perf_counter() - t0
    wrap_peak = peak(device)
    reset_peak(device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    wrapped.train()
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    derived = [t for m in wrapped.modules() if isinstance(m, DerivedState) for t in m.derived_tensors().values()]
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    alive = storages([*wrapped.parameters(), *wrapped.buffers(), *derived, *(p.grad for p in params), *state])
    return {"retained_bytes": alive - base_bytes, "base_bytes": base_bytes, "peak_bytes": peak(device),
            "wrap_peak_bytes": wrap_peak, "wrap_s": wrap_s, "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="organism,llama8b-layer")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.quick, args.device, args.rank)))
        return
    results = {}
    for model_name in args.models.split(","):
        rows = {}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", model_name, method, "--rank", str(args.rank), "--device",
                   args.device] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        lora = rows.get("lora")
        print(f"\n{model_name} ({args.device}{', quick' if args.quick else ''}), rank {args.rank}, targets mlp")
        print(f"{'method':10s} {'retained MiB':>12s} {'x LoRA':>8s} {'x base':>8s} {'step peak MiB':>13s} "
              f"{'x LoRA':>8s} {'wrap peak MiB':>13s} {'x LoRA':>8s} {'wrap s':>8s}")
        for method, r in rows.items():
            if lora:
                r["retained_ratio"] = r["retained_bytes"] / lora["retained_bytes"]
                r["peak_ratio"] = r["peak_bytes"] / lora["peak_bytes"]
                r["wrap_peak_ratio"] = r["wrap_peak_bytes"] / lora["wrap_peak_bytes"]
            print(f"{method:10s} {r['retained_bytes'] / 2**20:12.2f} {r.get('retained_ratio', float('nan')):8.2f} "
                  f"{r['retained_bytes'] / r['base_bytes']:8.3f} {r['peak_bytes'] / 2**20:13.1f} "
                  f"{r.get('peak_ratio', float('nan')):8.3f} {r['wrap_peak_bytes'] / 2**20:13.1f} "
                  f"{r.get('wrap_peak_ratio', float('nan')):8.3f} {r['wrap_s']:8.1f}", flush=True)
        results[model_name] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "quick": args.quick, "rank": args.rank, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
