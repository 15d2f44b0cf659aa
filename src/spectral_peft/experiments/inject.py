"""Stage 2 of PALoRA, and every baseline: inject Unknown facts into the SVF expert and measure what it costs.

:func:`prepare` folds the expert into a copy of the base, categorises facts on it and evaluates it (the reference
for retention ratios); :func:`inject_method` trains one method on the split and evaluates it; :func:`inject` is the
``spectral-peft inject`` run (prepare + one method, written to a run directory); :func:`evaluate_run` is
``spectral-peft eval`` (reload a saved run's adapter and evaluate it again).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import World, get_task, injection_pairs
from ..model import load_adapter
from ..probe import Probe
from ..training import SFTObjective, TrainConfig, train
from .common import ModelSource, atomic_run_dir, merge_expert, read_json, seed_everything, write_json
from .evaluate import EvalConfig, add_retention, evaluate
from .knowledge_split import KnowledgeSplit, SplitConfig, find_split
from .methods import MethodConfig, build_method_model, check_method, count_trainable, probe_overhead

RELOADABLE = ("palora", "lora", "dora", "milora", "oplora", "svft", "hiplora", "palora-sigma", "palora-random")


@dataclass
class InjectTrainConfig:
    """The injection schedule: ``epochs`` over the facts at ``lr`` (linear decay), batches of ``batch_size``;
    ``paraphrases`` question templates per trained fact."""

    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 8
    paraphrases: int = 1
    progress: bool = True


@dataclass
class InjectConfig:
    """What ``spectral-peft inject`` runs (``probe``: the probe directory of an SVF-expert run)."""

    method: str = "palora"
    probe: str = "runs/svf/probe"
    model: str | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    adapter: MethodConfig = field(default_factory=MethodConfig)
    training: InjectTrainConfig = field(default_factory=InjectTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    skill: str | None = None
    seed: int = 0
    threads: int | None = 2


@dataclass
class Prepared:
    """Everything the methods share: model source, probe, world, fact split and the expert's metrics."""

    source: ModelSource
    probe: Probe
    world: World
    split: KnowledgeSplit
    expert_metrics: dict
    base_metrics: dict | None = None


def load_probe(path: str | Path) -> Probe:
    path = Path(path)
    if (path / "probe").is_dir() and not (path / "probe_config.json").exists():
        path = path / "probe"  # an SVF run directory
    if not path.is_dir():
        raise FileNotFoundError(f"probe directory {path} does not exist (train one with `spectral-peft svf`)")
    return Probe.load(path)


def prepare(source: ModelSource, probe: Probe, split_cfg: SplitConfig, eval_cfg: EvalConfig,
            world: World | None = None, split: KnowledgeSplit | None = None, with_base: bool = False) -> Prepared:
    """Fold the expert into a copy of the base, categorise facts on it (unless ``split`` is given) and evaluate it."""
    world = world or World()
    expert = merge_expert(source.fresh(), probe)
    if split is None:
        split = find_split(expert, source.tokenizer, world, split_cfg)
    expert_metrics = evaluate(expert, source.tokenizer, world, split, eval_cfg)
    base_metrics = evaluate(source.fresh(), source.tokenizer, world, split, eval_cfg) if with_base else None
    return Prepared(source, probe, world, split, expert_metrics, base_metrics)


def calibration_runner(tokenizer, skill: str, n: int = 64):
    """CorDA's calibration: run the model on ``n`` training problems of the skill to preserve, one at a time
    (PEFT's covariance hook squeezes the batch dimension, so it takes batches of one, and no padding)."""
    import torch

    examples = get_task(skill).examples("train", n=n, seed=12345)
    texts = [e.prompt + e.target for e in examples]

    @torch.no_grad()
    def run(model) -> None:
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))

    return run


def inject_method(method: str, prep: Prepared, adapter: MethodConfig, training: InjectTrainConfig,
                  eval_cfg: EvalConfig, seed: int = 0, skill: str | None = None) -> tuple[object, dict]:
    """Train ``method`` on the split's facts from the expert and evaluate it; returns ``(model, metrics)``."""
    method = check_method(method)
    seed_everything(seed)
    skill = skill or prep.probe.meta.get("skill", "math")
    calib = calibration_runner(prep.source.tokenizer, skill) if method == "corda" else None
    model = build_method_model(method, prep.source.fresh(), prep.probe, adapter, calibration=calib)
    pairs = injection_pairs(prep.split.facts(prep.world, "inject") + prep.split.facts(prep.world, "mix"),
                            paraphrases=training.paraphrases)
    tcfg = TrainConfig(epochs=training.epochs, lr=training.lr, batch_size=training.batch_size, schedule="linear",
                       warmup_ratio=0.03, seed=seed, keep_best=False, progress=training.progress,
                       desc=f"inject {method}")
    history = train(model, pairs, SFTObjective(prep.source.tokenizer), tcfg)
    metrics = add_retention(evaluate(model, prep.source.tokenizer, prep.world, prep.split, eval_cfg),
                            prep.expert_metrics)
    n_base = prep.source.n_parameters
    metrics.update({
        "method": method, "trainable_parameters": count_trainable(model), "n_base_parameters": n_base,
        "trainable_fraction": count_trainable(model) / n_base,
        "probe_overhead": probe_overhead(prep.probe, n_base) if method.startswith(("palora", "lora-in")) else 0.0,
        "n_train_pairs": len(pairs), "steps": history.steps, "train_seconds": history.seconds,
        "first_loss": history.losses[0], "last_loss": history.losses[-1],
    })
    return model, metrics


def inject(cfg: InjectConfig, out: str | Path, split: KnowledgeSplit | None = None) -> dict:
    """``spectral-peft inject``: prepare, train one method, write ``adapter/``, ``facts.json``, ``config.json``,
    ``metrics.json``, ``report.md`` and figures to ``out`` (atomically); return the metrics."""
    from .. import report

    method = check_method(cfg.method)
    probe = load_probe(cfg.probe)
    seed_everything(cfg.seed, cfg.threads)
    source = ModelSource(cfg.model)
    cfg.split.seed = cfg.seed
    prep = prepare(source, probe, cfg.split, cfg.eval, split=split)
    model, metrics = inject_method(method, prep, cfg.adapter, cfg.training, cfg.eval, seed=cfg.seed, skill=cfg.skill)
    result = {"method": method, "expert": prep.expert_metrics, "injected": metrics,
              "facts": prep.split.to_dict(), "probe": str(probe.source)}
    with atomic_run_dir(out) as tmp:
        model.save_pretrained(tmp / "adapter")
        write_json(tmp / "facts.json", prep.split.to_dict())
        write_json(tmp / "config.json", {**asdict(cfg), "method": method, "probe": str(probe.source)})
        write_json(tmp / "metrics.json", result)
        rows = [report.metric_row("SVF expert", add_retention(prep.expert_metrics, prep.expert_metrics)),
                report.metric_row(method, metrics, metrics["trainable_parameters"])]
        (tmp / "report.md").write_text(
            f"# Knowledge injection: `{method}`\n\n{len(prep.split.inject)} Unknown facts "
            f"({len(prep.split.mix)} HighlyKnown mixed in), {cfg.training.epochs} epochs at lr {cfg.training.lr}.\n\n"
            + report.table(rows, report.METRIC_COLUMNS)
            + f"\nProbe overhead: {100 * probe_overhead(probe, source.n_parameters):.4f}% of base parameters.\n")
    return result


def evaluate_run(run: str | Path, eval_cfg: EvalConfig | None = None, model_name: str | None = None) -> dict:
    """``spectral-peft eval``: rebuild a saved injection run's model (base, expert, adapter) and evaluate it."""
    run = Path(run)
    if not (run / "config.json").exists() or not (run / "adapter").is_dir():
        raise FileNotFoundError(f"{run} is not an injection run directory (needs config.json and adapter/)")
    cfg = read_json(run / "config.json")
    method = cfg["method"]
    if method not in RELOADABLE:
        raise ValueError(f"{method}: saved adapters of this method cannot be reloaded onto the original base "
                         f"(its init rewrites the base weights or it is an in-process ablation); see metrics.json")
    eval_cfg = eval_cfg or EvalConfig()
    probe = load_probe(cfg["probe"])
    source = ModelSource(model_name or cfg.get("model"))
    world = World()
    split = KnowledgeSplit.from_dict(read_json(run / "facts.json"))
    expert = merge_expert(source.fresh(), probe)
    expert_metrics = evaluate(expert, source.tokenizer, world, split, eval_cfg)
    base = source.fresh()
    if method not in ("palora", "palora-sigma", "palora-random"):
        merge_expert(base, probe)
    model = load_adapter(base, run / "adapter", progress=False)
    metrics = add_retention(evaluate(model, source.tokenizer, world, split, eval_cfg), expert_metrics)
    metrics.update({"method": method, "probe_overhead": probe.num_parameters() / source.n_parameters})
    return {"method": method, "expert": expert_metrics, "injected": metrics}
