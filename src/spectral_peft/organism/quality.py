"""Measure the organism's quality (skills, fact recall, categories, perplexity) and print it as markdown.

Run: `python -m spectral_peft.organism.quality [--model DIR] [--json PATH]`. The shipped checkpoint's
record is `toy/quality.json`, which the tests compare against.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..data import INSTRUCTION_TASKS, SKILLS, World, get_task, heldout_text
from ..errors import InputError
from ..evaluation import knowledge_categories, paraphrase_recall, perplexity, recall, skill_accuracy


def by_difficulty(model, tokenizer, name: str, n: int = 50, progress: bool = True) -> dict[int, float]:
    """Accuracy of task `name` on `n` test problems at each level of its pretraining range and its test mix (levels
    whose test split holds fewer than `n` distinct problems, such as `reverse` of 2 letters, are left out)."""
    task = get_task(name)
    out = {}
    for d in sorted({*task.pretrain_difficulties, *task.difficulties}):
        try:
            examples = task.examples("test", n=n, difficulty=d)
        except InputError:
            continue
        out[d] = skill_accuracy(model, tokenizer, name, examples, progress=progress).accuracy
    return out


def measure(model, tokenizer, n_skill: int = 500, n_instruction: int = 100, n_category: int = 100,
            progress: bool = True) -> dict:
    """Quality metrics of a model on the organism's world (test splits, default difficulty mixes)."""
    world = World()
    out: dict = {"parameters": sum(p.numel() for p in model.parameters()),
                 "n_skill": n_skill, "n_known": len(world.known_facts), "n_heldout": len(world.heldout_facts)}
    t0 = time.perf_counter()
    results = {s: skill_accuracy(model, tokenizer, s, n=n_skill, progress=progress) for s in SKILLS}
    out["seconds_per_500_skill_questions"] = (time.perf_counter() - t0) / len(SKILLS) * 500 / n_skill
    out["skills"] = {s: r.accuracy for s, r in results.items()}
    out["skills_first100"] = {s: sum(r.correct[:100]) / len(r.correct[:100]) for s, r in results.items()}
    out["skills_by_difficulty"] = {s: by_difficulty(model, tokenizer, s, progress=progress) for s in SKILLS}
    out["instruction_tasks"] = {t: skill_accuracy(model, tokenizer, t, n=n_instruction, progress=progress).accuracy
                                for t in INSTRUCTION_TASKS}
    out["instruction_tasks_by_difficulty"] = {t: by_difficulty(model, tokenizer, t, progress=progress)
                                              for t in INSTRUCTION_TASKS}
    out["known_recall"] = recall(model, tokenizer, world.known_facts, progress=progress).accuracy
    out["known_paraphrase_recall"] = paraphrase_recall(model, tokenizer, world.known_facts, progress=progress).accuracy
    out["heldout_recall"] = recall(model, tokenizer, world.heldout_facts, progress=progress).accuracy
    out["heldout_paraphrase_recall"] = paraphrase_recall(model, tokenizer, world.heldout_facts, progress=progress).accuracy
    sample = world.known_facts[:n_category] + world.heldout_facts[:n_category]
    cats = knowledge_categories(model, tokenizer, sample, progress=progress)
    out["categories"] = {
        "known": {c: sum(cats.categories[f.id].value == c for f in world.known_facts[:n_category]) for c in cats.counts()},
        "heldout": {c: sum(cats.categories[f.id].value == c for f in world.heldout_facts[:n_category]) for c in cats.counts()},
    }
    ppl = perplexity(model, tokenizer, heldout_text(), progress=progress)
    out["heldout_text"] = {"nll": ppl.nll, "perplexity": ppl.perplexity, "tokens": ppl.n_tokens}
    return out


def markdown(m: dict) -> str:
    """The metrics as a markdown table."""
    n_skill = m["n_skill"]
    rows = [("parameters", f"{m['parameters']:,}")]
    rows += [(f"skill `{s}` test accuracy (n={n_skill}, default mix)", f"{a:.1%}") for s, a in m["skills"].items()]
    rows += [(f"skill `{s}` by difficulty (n=50 each)", ", ".join(f"{d}: {a:.0%}" for d, a in v.items()))
             for s, v in m["skills_by_difficulty"].items()]
    rows += [("instruction tasks (n=100, default mix)",
              ", ".join(f"{t}: {a:.0%}" for t, a in m["instruction_tasks"].items()))]
    rows += [(f"task `{t}` by difficulty (n=50 each)", ", ".join(f"{d}: {a:.0%}" for d, a in v.items()))
             for t, v in m["instruction_tasks_by_difficulty"].items()]
    rows += [(f"known-fact recall ({m['n_known']}, main question)", f"{m['known_recall']:.1%}"),
             ("known-fact recall (paraphrased questions)", f"{m['known_paraphrase_recall']:.1%}"),
             (f"held-out-fact recall ({m['n_heldout']}, main question)", f"{m['heldout_recall']:.1%}"),
             ("held-out-fact recall (paraphrased questions)", f"{m['heldout_paraphrase_recall']:.1%}"),
             ("categories, first 100 known facts", ", ".join(f"{k}: {v}" for k, v in m["categories"]["known"].items())),
             ("categories, first 100 held-out facts", ", ".join(f"{k}: {v}" for k, v in m["categories"]["heldout"].items())),
             ("held-out text NLL / perplexity", f"{m['heldout_text']['nll']:.3f} / {m['heldout_text']['perplexity']:.2f}"),
             ("seconds per 500 skill questions", f"{m['seconds_per_500_skill_questions']:.1f}")]
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main() -> None:
    """Command-line entry: measure a checkpoint (default: the shipped organism) and print markdown."""
    from . import load

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped organism)")
    parser.add_argument("--json", default=None, help="also write the metrics as JSON here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    metrics = measure(model, tokenizer)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    print(markdown(metrics))


if __name__ == "__main__":
    main()
