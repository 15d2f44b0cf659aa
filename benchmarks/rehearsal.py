"""A rehearsal at Llama-3.1-8B's layer shapes: every stage from the command line, in bf16, with tiny data.

Builds a random-init Llama with 8B's layer shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads), ``--layers``
layers and the organism's tokenizer (``tests/helpers.py: save_llama8b_shaped``), saves it in bf16, then runs two
chains as separate ``spectral-peft`` processes, each with a handful of examples and steps on one organism skill:

- ``svf`` -> ``inject`` (PALoRA) -> ``eval``;
- ``finetune`` (HiP-LoRA) -> ``merge`` -> ``export``.

For each stage it records the exit status, the wall time and the peak RSS of the stage's process (``wait4``'s
``ru_maxrss``), prints a markdown table and writes it to ``OUT/rehearsal.json``. Targets are the MLP matrices, so a
spectral stage needs one fp32 SVD per 4096 x 14336 matrix (3 per layer); the stages share ``OUT/svd-cache``
(``SPECTRAL_PEFT_SVD_CACHE``), so each is computed once, by the first stage that needs it.

    python benchmarks/rehearsal.py --out /tmp/rehearsal            # 2 layers, CPU, bf16
    python benchmarks/rehearsal.py --out /tmp/rehearsal --stages finetune,merge,export
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see step_time.py: spin-waiting LAPACK threads on busy cores

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import save_llama8b_shaped  # noqa: E402

STAGES = ("svf", "inject", "eval", "finetune", "merge", "export")
SKILL = "sort"


def stage_commands(model: str, out: Path, threads: int, device: str = "auto") -> dict[str, list[str]]:
    """The ``spectral-peft`` arguments of every stage (tiny sizes: a few examples and optimiser steps each)."""
    common = ["--dtype", "bfloat16", "--device", device, "--threads", str(threads), "--progress", "false"]
    return {
        "svf": ["svf", "--model", model, "--skill", SKILL, "--train.targets", "mlp", "--train.n-train", "4",
                "--train.n-val", "2", "--train.epochs", "1", "--train.batch-size", "2", "--train.eval-every", "2",
                "--train.max-new-tokens", "4", "--out", str(out / "svf"), *common],
        "inject": ["inject", "--model", model, "--probe", str(out / "svf"), "--method", "palora", "--targets", "mlp",
                   "--skill", SKILL, "--n-facts", "2", "--split.n-candidates", "8", "--split.n-known", "2",
                   "--split.n-known-eval", "2", "--split.n-samples", "1", "--train.epochs", "1",
                   "--train.paraphrases", "1", "--eval.n-skill", "2", "--eval.n-ppl", "1",
                   "--eval.max-new-tokens", "4", "--out", str(out / "inject"), *common],
        "eval": ["eval", "--run-dir", str(out / "inject"), "--n-skill", "2", "--n-ppl", "1",
                 "--out", str(out / "eval"), *common],
        "finetune": ["finetune", "--model", model, "--method", "hiplora", "--targets", "mlp", "--task", SKILL,
                     "--train.n-train", "4", "--train.n-eval", "2", "--train.epochs", "1", "--train.batch-size", "2",
                     "--train.max-new-tokens", "4", "--out", str(out / "finetune"), *common],
        "merge": ["merge", "--adapters", str(out / "finetune" / "adapter"), "--model", model, "--dtype", "bfloat16",
                  "--device", device, "--out", str(out / "merge")],
        "export": ["export", "--adapter", str(out / "finetune" / "adapter"), "--model", model,
                   "--out", str(out / "export")],
    }


EXPECTED = {"svf": "probe", "inject": "adapter", "eval": "metrics.json", "finetune": "adapter",
            "merge": "model/config.json", "export": "adapter_config.json"}


def run_stage(argv: list[str], log: Path, svd_cache: Path) -> dict[str, float | int]:
    """Run ``spectral-peft argv`` as its own process, with the SVD cache ``svd_cache`` shared by every stage; exit
    status, wall seconds and peak RSS (MiB) of that process."""
    t0 = time.perf_counter()
    env = {**os.environ, "SPECTRAL_PEFT_SVD_CACHE": str(svd_cache)}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "spectral_peft.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "seconds": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a new directory for the model, the runs and the logs")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"a subset of {','.join(STAGES)}, in order")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "config.json").is_file():
        t0 = time.perf_counter()
        save_llama8b_shaped(model, num_layers=args.layers)
        print(f"built the 8B-shaped model ({args.layers} layers, bf16) in {time.perf_counter() - t0:.0f} s")
    commands = stage_commands(str(model), out, args.threads, args.device)
    rows = {}
    for name in args.stages.split(","):
        rows[name] = {**run_stage(commands[name], out / f"{name}.log", out / "svd-cache"),
                      "command": "spectral-peft " + " ".join(commands[name])}
        r = rows[name]
        print(f"{name}: rc {r['rc']}, {r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        (out / "rehearsal.json").write_text(json.dumps(rows, indent=1))
        if r["rc"] != 0:
            print(f"{name} failed; see {out / f'{name}.log'}")
            return 1
    print("\n| stage | wall (s) | peak RSS (MiB) |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
