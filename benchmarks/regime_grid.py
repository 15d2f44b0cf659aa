"""The lab's update-regime grid (docs/lab.md, criterion (c)): LoRA alone, one calibration fine-tune per setting.

Each setting is ``FACTS:TARGETS:R:LR`` (e.g. ``16:all-linear:1:5e-5``); every run injects that many of the organism's
Unknown facts from the base at batch 8, stops at ``--recall-target`` (checked every 8 steps) or after ``--max-steps``,
and reports ``||dW||_F / ||W||_F`` (p10, median, p90 over the adapted matrices) and the median ``||dW||_2 / sigma_1``.

    python benchmarks/regime_grid.py 16:all-linear:1:5e-5 64:mlp:1:1e-3 --json runs/regime_grid.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spectral_peft.lab.regime import RegimeSettings, measure_regime, spread
from spectral_peft.loading import ModelSource, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="FACTS:TARGETS:R:LR")
    parser.add_argument("--model", default="organism")
    parser.add_argument("--recall-target", type=float, default=0.8)
    parser.add_argument("--max-steps", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    source = ModelSource(args.model)
    rows = []
    for text in args.settings:
        facts, targets, r, lr = text.split(":")
        settings = RegimeSettings(n_train=int(facts), targets=targets, r=int(r), lr=float(lr),
                                  epochs=args.max_steps * 8 // int(facts), recall_target=args.recall_target)
        settings.validate()
        seed_everything(args.seed, 1)
        m = measure_regime(source.fresh(), source.tokenizer, settings, args.seed, progress=False)
        fro, spectral = spread(m.fro_ratio), spread(m.spectral_ratio)
        row = {"facts": int(facts), "targets": targets, "r": int(r), "lr": float(lr),
               "recall_target": args.recall_target, "steps": m.steps, "reached": m.reached_target,
               "recall": sum(m.learned_after) / len(m.learned_after), "fro_p10": fro["p10"],
               "fro_median": fro["median"], "fro_p90": fro["p90"], "spectral_median": spectral["median"]}
        rows.append(row)
        print(f"{text}: {m.steps} steps, recall {row['recall']:.0%} (target reached: {m.reached_target}); "
              f"||dW||_F/||W||_F p10 {fro['p10']:.2%}, median {fro['median']:.2%}, p90 {fro['p90']:.2%}; "
              f"||dW||_2/sigma_1 median {spectral['median']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
