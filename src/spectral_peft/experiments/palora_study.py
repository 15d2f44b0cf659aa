"""The PALoRA study behind ``docs/results-palora.md``: every injection method and the ablations, from the same
SVF expert, over several seeds, with means and 95% t-intervals over seeds.

Per seed: train the SVF expert (seeded), categorise facts on it, evaluate it, then inject with every method. Each
(seed, method) result is written as soon as it exists (``seeds/<seed>/<method>.json``), and a rerun skips what is
already there, so a long study survives interruptions. ``summary.json`` and the figures are rebuilt at the end.

Run: ``python -m spectral_peft.experiments.palora_study --out runs/palora-study --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import World
from .common import ModelSource, read_json, seed_everything, write_json
from .demo import _demo_split, _demo_svf
from .evaluate import EvalConfig, add_retention
from .inject import InjectTrainConfig, Prepared, inject_method, prepare
from .knowledge_split import KnowledgeSplit, SplitConfig
from .methods import ABLATIONS, INJECT_METHODS, MethodConfig, check_method
from .svf_expert import SVFExpertConfig, train_svf_expert

METRICS = ("recall", "paraphrase_recall", "highly_known_retention", "mean_skill_retention", "perplexity_increase")


@dataclass
class StudyConfig:
    """Seeds, methods and the shared sizes (the demo's by default)."""

    model: str | None = None
    skill: str = "math"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = INJECT_METHODS + ABLATIONS
    threads: int | None = 2
    svf: SVFExpertConfig = field(default_factory=_demo_svf)
    split: SplitConfig = field(default_factory=_demo_split)
    adapter: MethodConfig = field(default_factory=MethodConfig)
    training: InjectTrainConfig = field(default_factory=InjectTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    progress: bool = True


def run_seed(cfg: StudyConfig, seed: int, out: Path, source: ModelSource) -> dict[str, dict]:
    """One seed: expert, split, reference metrics, every method. Returns ``{model name: metrics}``."""
    seed_dir = out / "seeds" / str(seed)
    seed_everything(seed, cfg.threads)
    svf_cfg = SVFExpertConfig(**{**asdict(cfg.svf), "skill": cfg.skill, "model": cfg.model, "seed": seed,
                                 "threads": cfg.threads, "progress": cfg.progress})
    if not (seed_dir / "svf" / "probe" / "probe_config.json").exists():
        train_svf_expert(svf_cfg, seed_dir / "svf", source=source)
    from .inject import load_probe

    probe = load_probe(seed_dir / "svf")
    split_cfg = SplitConfig(**{**asdict(cfg.split), "seed": seed, "progress": cfg.progress})
    world = World()
    ref_path = seed_dir / "reference.json"
    if ref_path.exists():
        ref = read_json(ref_path)
        prep = Prepared(source, probe, world, KnowledgeSplit.from_dict(ref["split"]), ref["expert"], ref["base"])
    else:
        prep = prepare(source, probe, split_cfg, cfg.eval, world=world, with_base=True)
        write_json(ref_path, {"split": prep.split.to_dict(), "expert": prep.expert_metrics, "base": prep.base_metrics,
                              "svf": read_json(seed_dir / "svf" / "metrics.json")})
    results = {"base": add_retention(prep.base_metrics, prep.expert_metrics),
               "svf-expert": add_retention(prep.expert_metrics, prep.expert_metrics)}
    adapter = MethodConfig(**{**asdict(cfg.adapter), "seed": seed})
    for method in cfg.methods:
        path = seed_dir / f"{method}.json"
        if not path.exists():
            _, m = inject_method(method, prep, adapter, cfg.training, cfg.eval, seed=seed, skill=cfg.skill)
            write_json(path, m)
        results[method] = read_json(path)
    return results


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict:
    """Mean and 95% t-interval over seeds of every metric, per model; per-skill retention too."""
    from ..evaluation.stats import seed_ci

    names = list(next(iter(per_seed.values())))
    out: dict = {}
    for name in names:
        rows = [per_seed[s][name] for s in per_seed if name in per_seed[s]]
        entry: dict = {"n_seeds": len(rows), "trainable_parameters": rows[0].get("trainable_parameters")}
        keys = list(METRICS) + [f"skill:{k}" for k in rows[0]["skills"]] + [f"retention:{k}" for k in rows[0]["skills"]]
        for key in keys:
            if key.startswith("skill:"):
                vals = [r["skills"][key[6:]] for r in rows]
            elif key.startswith("retention:"):
                vals = [r["skill_retention"][key[10:]] for r in rows]
            else:
                vals = [r.get(key) for r in rows]
            vals = [v for v in vals if v is not None]
            if not vals:
                entry[key] = None
            elif len(vals) == 1:
                entry[key] = {"mean": vals[0], "low": None, "high": None, "values": vals}
            else:
                ci = seed_ci(vals)
                entry[key] = {"mean": ci.estimate, "low": ci.low, "high": ci.high, "values": vals}
        out[name] = entry
    return out


def run_study(cfg: StudyConfig, out: str | Path = "runs/palora-study") -> dict:
    """Run (or resume) the study; write ``summary.json`` and figures; return the summary."""
    from .. import report

    for m in cfg.methods:
        check_method(m)
    out = Path(out)
    t0 = time.perf_counter()
    source = ModelSource(cfg.model)
    write_json(out / "config.json", asdict(cfg))
    per_seed = {s: run_seed(cfg, s, out, source) for s in cfg.seeds}
    summary = {"config": asdict(cfg), "models": summarise(per_seed),
               "svf": {s: {k: v for k, v in read_json(out / "seeds" / str(s) / "svf" / "metrics.json").items()
                           if k not in ("losses", "validation", "probe_mean_abs_dz")} for s in cfg.seeds},
               "seconds": time.perf_counter() - t0}
    write_json(out / "summary.json", summary)
    report.study_figures(summary, out / "figures")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/palora-study")
    parser.add_argument("--model", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", default=",".join(INJECT_METHODS + ABLATIONS))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--n-facts", type=int, default=None)
    parser.add_argument("--n-skill", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--markdown", default=None, help="also write the results page here")
    args = parser.parse_args()
    cfg = StudyConfig(model=args.model, seeds=tuple(args.seeds), methods=tuple(args.methods.split(",")),
                      threads=args.threads, progress=not args.no_progress)
    if args.epochs:
        cfg.training.epochs = args.epochs
    if args.lr:
        cfg.training.lr = args.lr
    if args.n_facts:
        cfg.split.n_facts = args.n_facts
    if args.n_skill:
        cfg.eval.n_skill = args.n_skill
    summary = run_study(cfg, args.out)
    from .. import report

    text = report.study_markdown(summary, args.out)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
