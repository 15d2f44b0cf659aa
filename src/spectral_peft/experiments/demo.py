"""``spectral-peft demo``, the main job: on the built-in organism, train an SVF expert on a skill, inject a set of
Unknown facts with LoRA, OPLoRA, PALoRA and HiP-LoRA, and report recall and retention.

Writes ``runs/demo/`` atomically: ``svf/`` (the expert run and its probe), ``adapters/<method>/``,
``facts.json``, ``config.json``, ``metrics.json``, ``figures/*.png`` and ``report.md``. Deterministic for a seed
and a thread count. The default sizes fit in 10 minutes on 2 CPU cores (see docs/results-palora.md).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import World
from .common import ModelSource, atomic_run_dir, seed_everything, write_json
from .evaluate import EvalConfig, add_retention
from .inject import RELOADABLE, InjectTrainConfig, inject_method, prepare
from .knowledge_split import SplitConfig
from .methods import MethodConfig, check_method, probe_overhead
from .svf_expert import SVFExpertConfig, train_svf_expert

DEMO_METHODS = ("lora", "oplora", "palora", "hiplora")


def _demo_svf() -> SVFExpertConfig:
    return SVFExpertConfig(n_train=1024, n_val=64, epochs=1, lr=5e-3, batch_size=16, eval_every=16)


def _demo_split() -> SplitConfig:
    return SplitConfig(n_facts=64, n_known=100, n_known_eval=80, n_windows=10, n_samples=4)


@dataclass
class DemoConfig:
    """The demo's sizes (every field has a CLI option)."""

    model: str | None = None
    skill: str = "math"
    methods: tuple[str, ...] = DEMO_METHODS
    seed: int = 0
    threads: int | None = 2
    svf: SVFExpertConfig = field(default_factory=_demo_svf)
    split: SplitConfig = field(default_factory=_demo_split)
    adapter: MethodConfig = field(default_factory=MethodConfig)
    training: InjectTrainConfig = field(default_factory=InjectTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    progress: bool = True


@dataclass
class DemoResult:
    """The run directory, the per-model metrics (``base``, ``expert``, then each method) and the wall time."""

    run_dir: Path
    metrics: dict
    table: str
    seconds: float


def _sync(cfg: DemoConfig) -> None:
    for sub in (cfg.svf, cfg.split, cfg.adapter):
        sub.seed = cfg.seed
    cfg.svf.skill, cfg.svf.model, cfg.svf.threads = cfg.skill, cfg.model, cfg.threads
    for sub in (cfg.svf, cfg.split, cfg.training, cfg.eval):
        sub.progress = cfg.progress


def run_demo(cfg: DemoConfig | None = None, out: str | Path = "runs/demo") -> DemoResult:
    """Run the demo into ``out``; return its metrics and printed table."""
    from .. import report

    cfg = cfg or DemoConfig()
    methods = [check_method(m) for m in cfg.methods]
    _sync(cfg)
    t0 = time.perf_counter()
    seed_everything(cfg.seed, cfg.threads)
    out = Path(out)
    source = ModelSource(cfg.model)
    world = World()
    with atomic_run_dir(out) as tmp:
        expert = train_svf_expert(cfg.svf, tmp / "svf", source=source)
        probe = expert.probe
        probe.source = str(out / "svf" / "probe")
        prep = prepare(source, probe, cfg.split, cfg.eval, world=world, with_base=True)
        ref = prep.expert_metrics
        models = {"base": add_retention(prep.base_metrics, ref), "svf-expert": add_retention(ref, ref)}
        models["base"]["trainable_parameters"] = 0
        models["svf-expert"]["trainable_parameters"] = probe.num_parameters()
        for method in methods:
            model, m = inject_method(method, prep, cfg.adapter, cfg.training, cfg.eval, seed=cfg.seed, skill=cfg.skill)
            if method in RELOADABLE:
                model.save_pretrained(tmp / "adapters" / method)
            models[method] = m
        n_base = source.n_parameters
        metrics = {
            "model": source.name, "skill": cfg.skill, "seed": cfg.seed, "methods": methods,
            "svf": {k: v for k, v in expert.metrics.items() if k not in ("losses",)},
            "probe_overhead": probe_overhead(probe, n_base), "n_z": probe.num_parameters(), "n_base_parameters": n_base,
            "probe_spread": report.probe_spread(probe, rho=cfg.adapter.rho),
            "facts": {"n_inject": len(prep.split.inject), "n_mix": len(prep.split.mix),
                      "n_retain": len(prep.split.retain), "categories": prep.split.counts},
            "models": models,
        }
        rows = [report.metric_row(name, m, m.get("trainable_parameters")) for name, m in models.items()]
        table = report.table(rows, report.METRIC_COLUMNS)
        figs = tmp / "figures"
        figs.mkdir(parents=True, exist_ok=True)
        for f in sorted((tmp / "svf" / "figures").glob("*.png")):
            shutil.copy(f, figs / f.name)
        points = [{"method": n, "recall": m["recall"], "retention": m["mean_skill_retention"]}
                  for n, m in models.items() if n != "base"]
        report.plot_tradeoff(points, figs / "tradeoff.png",
                             title=f"{len(prep.split.inject)} Unknown facts into the {cfg.skill} expert (seed {cfg.seed})")
        report.plot_skill_bars([{"method": n, "skills": m["skills"]} for n, m in models.items()], figs / "skills.png")
        metrics["seconds"] = time.perf_counter() - t0
        write_json(tmp / "facts.json", prep.split.to_dict())
        write_json(tmp / "config.json", asdict(cfg))
        write_json(tmp / "metrics.json", metrics)
        (tmp / "report.md").write_text(report.demo_report(metrics, table, cfg))
    return DemoResult(out, metrics, table, time.perf_counter() - t0)
