"""The `spectral-peft` command: a thin shell over the library's functions."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Spectrum-aware parameter-efficient fine-tuning (PALoRA, HiP-LoRA and baselines).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Spectrum-aware parameter-efficient fine-tuning (PALoRA, HiP-LoRA and baselines)."""


@app.command("pretrain-organism")
def pretrain_organism(
    out: str = typer.Option(None, help="Checkpoint directory (default: the package's toy/ directory)."),
    seed: int = typer.Option(0, help="Seed of the corpus, tokenizer, initialisation and batch order."),
    steps: int = typer.Option(1300, help="Optimizer steps."),
    run_dir: str = typer.Option("runs/organism", help="Where resumable training state is kept."),
    resume: bool = typer.Option(True, help="Resume from the state in --run-dir if there is one."),
    threads: int = typer.Option(2, help="Torch CPU threads (results are deterministic for a fixed value)."),
) -> None:
    """Pretrain the model organism on the generated world and save it as an HF checkpoint."""
    from .organism import CHECKPOINT_DIR, PretrainConfig, pretrain

    target = out or str(CHECKPOINT_DIR)
    pretrain(target, PretrainConfig(seed=seed, steps=steps, threads=threads), run_dir=run_dir, resume=resume)
    typer.echo(f"saved the organism to {target}")


# --- PALoRA: svf, inject, eval, demo (thin shells over spectral_peft.experiments) ---------------------------------

MODEL_HELP = "HF model id or checkpoint directory (default: the built-in organism)."


def _fail(err: Exception) -> None:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command("svf")
def svf_cmd(
    skill: str = typer.Option("math", help="Skill to train the expert on (math, code, science)."),
    objective: str = typer.Option("sft", help="sft (cross-entropy on worked solutions) or reinforce."),
    out: str = typer.Option("runs/svf", help="Run directory (probe/, adapter/, figures/, report.md)."),
    model: str = typer.Option(None, help=MODEL_HELP),
    n_train: int = typer.Option(1024, help="Training problems."),
    n_val: int = typer.Option(64, help="Validation problems (greedy accuracy, best checkpoint kept)."),
    epochs: int = typer.Option(1, help="Epochs."),
    lr: float = typer.Option(5e-3, help="AdamW learning rate for z."),
    batch_size: int = typer.Option(16, help="Batch size."),
    eval_every: int = typer.Option(16, help="Validate every this many steps."),
    kl_coef: float = typer.Option(0.0, help="REINFORCE: KL penalty to the base model."),
    seed: int = typer.Option(0, help="Seed."),
    threads: int = typer.Option(2, help="Torch CPU threads."),
) -> None:
    """Train an SVF expert on a skill and save its probe, with a figure of |z - 1| over the spectrum."""
    from .experiments import SVFExpertConfig, train_svf_expert

    try:
        cfg = SVFExpertConfig(skill=skill, objective=objective, model=model, n_train=n_train, n_val=n_val,
                              epochs=epochs, lr=lr, batch_size=batch_size, eval_every=eval_every, kl_coef=kl_coef,
                              seed=seed, threads=threads)
        cfg.validate()
        res = train_svf_expert(cfg, out)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        _fail(e)
    m = res.metrics
    typer.echo(f"val accuracy {m['base_val_accuracy']:.3f} (base) -> {m['expert_val_accuracy']:.3f} (expert); "
               f"overhead {100 * m['parameter_overhead']:.4f}%; probe in {res.probe_dir}; report {out}/report.md")


@app.command("inject")
def inject_cmd(
    method: str = typer.Option("palora", help="palora, lora, dora, pissa, milora, oplora, svft, corda, hiplora "
                                              "(or the ablations palora-sigma, palora-random, lora-in-probe)."),
    probe: str = typer.Option("runs/svf/probe", help="Probe directory (or SVF run directory) from `svf`."),
    out: str = typer.Option(None, help="Run directory (default: runs/inject-<method>)."),
    model: str = typer.Option(None, help=MODEL_HELP),
    n_facts: int = typer.Option(64, help="Unknown facts to inject."),
    mix_known: int = typer.Option(0, help="HighlyKnown facts mixed into training."),
    paraphrases: int = typer.Option(1, help="Question paraphrases per fact in training."),
    epochs: int = typer.Option(10, help="Epochs over the facts."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    batch_size: int = typer.Option(8, help="Batch size."),
    r: int = typer.Option(8, help="LoRA rank (the same for every method)."),
    lora_alpha: float = typer.Option(16.0, help="LoRA alpha."),
    targets: str = typer.Option("mlp", help="mlp or all-linear."),
    rho: float = typer.Option(0.1, help="PALoRA: fraction of each matrix's spectrum protected."),
    n_skill: int = typer.Option(100, help="Test problems per skill in the evaluation."),
    seed: int = typer.Option(0, help="Seed."),
    threads: int = typer.Option(2, help="Torch CPU threads."),
) -> None:
    """Inject Unknown facts into the SVF expert with one method, then evaluate recall and retention."""
    from .experiments import EvalConfig, InjectConfig, InjectTrainConfig, MethodConfig, SplitConfig, inject
    from .experiments.methods import check_method

    try:
        method = check_method(method)
        cfg = InjectConfig(method=method, probe=probe, model=model, seed=seed, threads=threads,
                           split=SplitConfig(n_facts=n_facts, mix_known=mix_known),
                           adapter=MethodConfig(r=r, lora_alpha=lora_alpha, targets=targets, rho=rho, seed=seed),
                           training=InjectTrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, paraphrases=paraphrases),
                           eval=EvalConfig(n_skill=n_skill))
        out = out or f"runs/inject-{method}"
        res = inject(cfg, out)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        _fail(e)
    from .report import fmt

    m = res["injected"]
    typer.echo(f"{method}: recall {fmt(m['recall'])}%, skill retention {fmt(m['mean_skill_retention'])}%; "
               f"report {out}/report.md")


@app.command("eval")
def eval_cmd(
    run: str = typer.Argument(..., help="An injection run directory (from `inject`)."),
    model: str = typer.Option(None, help=MODEL_HELP + " Default: the run's."),
    n_skill: int = typer.Option(100, help="Test problems per skill."),
    n_ppl: int = typer.Option(50, help="Held-out documents for perplexity."),
    json_out: str = typer.Option(None, "--json", help="Also write the metrics here."),
) -> None:
    """Evaluate an injection run: recall (and paraphrases), HighlyKnown and skill retention, perplexity, overhead."""
    from . import report
    from .experiments import EvalConfig, evaluate_run
    from .experiments.common import write_json

    try:
        res = evaluate_run(run, EvalConfig(n_skill=n_skill, n_ppl=n_ppl), model_name=model)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        _fail(e)
    if json_out:
        write_json(json_out, res)
    from .experiments import add_retention

    m = res["injected"]
    rows = [report.metric_row("SVF expert", add_retention(res["expert"], res["expert"])),
            report.metric_row(res["method"], m)]
    typer.echo(report.table(rows, report.METRIC_COLUMNS))
    typer.echo(f"parameter overhead (z entries / base parameters): {100 * m['probe_overhead']:.4f}%")


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("runs/demo", help="Run directory."),
    model: str = typer.Option(None, help=MODEL_HELP),
    skill: str = typer.Option("math", help="Skill of the SVF expert."),
    methods: str = typer.Option("lora,oplora,palora,hiplora", help="Comma-separated injection methods."),
    n_facts: int = typer.Option(64, help="Unknown facts to inject."),
    epochs: int = typer.Option(10, help="Injection epochs."),
    lr: float = typer.Option(1e-3, help="Injection learning rate."),
    n_skill: int = typer.Option(100, help="Test problems per skill."),
    seed: int = typer.Option(0, help="Seed (the run is deterministic for a seed and a thread count)."),
    threads: int = typer.Option(2, help="Torch CPU threads."),
) -> None:
    """The main job: SVF expert, then LoRA / OPLoRA / PALoRA / HiP-LoRA injection; table, report.md, figures."""
    from .experiments.demo import DemoConfig, run_demo
    from .experiments.methods import check_method

    try:
        cfg = DemoConfig(model=model, skill=skill, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                         seed=seed, threads=threads)
        cfg.svf.skill = skill
        cfg.svf.validate()
        for m in cfg.methods:
            check_method(m)
        cfg.split.n_facts, cfg.training.epochs, cfg.training.lr, cfg.eval.n_skill = n_facts, epochs, lr, n_skill
        res = run_demo(cfg, out)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        _fail(e)
    typer.echo(res.table)
    typer.echo(f"wrote {out}/report.md, {out}/metrics.json and {out}/figures/ in {res.seconds:.0f} s")


if __name__ == "__main__":
    app()
