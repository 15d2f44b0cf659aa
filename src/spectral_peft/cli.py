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


@app.command("export")
def export_cmd(
    adapter: str = typer.Argument(..., help="A spectral-peft adapter directory."),
    out: str = typer.Argument(..., help="Where to write the standard PEFT LoRA directory."),
    model: str = typer.Option(None, help=MODEL_HELP + " Must hold the weights the adapter was trained on."),
    max_rank: int = typer.Option(None, help="Truncate each update to this rank (the error is reported)."),
) -> None:
    """Export an adapter as a standard PEFT LoRA that vanilla `peft` loads (exact unless --max-rank truncates)."""
    from .experiments.common import load_model
    from .export import export_lora
    from .model import load_adapter

    try:
        base, _ = load_model(model)
        errors = export_lora(load_adapter(base, adapter, progress=False), out, max_rank=max_rank)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(f"wrote {out}: {len(errors)} modules, largest relative error {max(errors.values()):.2e}")


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
    epochs: int = typer.Option(20, help="Epochs over the facts."),
    lr: float = typer.Option(3e-3, help="Learning rate."),
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
    epochs: int = typer.Option(20, help="Injection epochs."),
    lr: float = typer.Option(3e-3, help="Injection learning rate."),
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


# --- HiP-LoRA protocols: finetune, merge, drift, mergefail, continual, edit, sanity ----------------------------------

METHODS_HELP = ("Comma-separated method specs name[:key=value,...], e.g. 'lora,hiplora,hiplora:rho=0.5,"
                "hiplora:mode=penalty,oplora' (keys: r, k, alpha, mode, rho, lam, p, eps, targets).")
QUICK_HELP = "Small sizes that finish in a few minutes (smoke tests, CI); the full mode gives the published numbers."
PROTOCOL_ERRORS = (ValueError, KeyError, FileNotFoundError, OSError)


def _settings(default, n_train=None, n_eval=None, epochs=None, lr=None, batch_size=None):
    """The protocol's TrainSettings with the options that were given."""
    from dataclasses import replace

    given = dict(n_train=n_train, n_eval=n_eval, epochs=epochs, lr=lr, batch_size=batch_size)
    return replace(default, **{k: v for k, v in given.items() if v is not None})


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@app.command("finetune")
def finetune_cmd(
    method: str = typer.Option("hiplora", help="Method spec, e.g. hiplora, hiplora:mode=penalty, lora, oplora."),
    task: str = typer.Option("max", help="Organism task name (e.g. max, sort, reverse@3, math) or a JSONL file "
                                         "with prompt/response rows."),
    out: str = typer.Option(None, help="Run directory (default: runs/finetune-<method>)."),
    model: str = typer.Option(None, help=MODEL_HELP),
    r: int = typer.Option(8, help="LoRA rank (HiP-LoRA's residual rank)."),
    k: int = typer.Option(16, help="HiP-LoRA principal-channel size (OPLoRA: protected directions)."),
    budget_mode: str = typer.Option("constraint", help="HiP-LoRA budget mode: constraint, penalty or none."),
    budget_rho: float = typer.Option(0.1, help="HiP-LoRA relative budget rho (eps = rho^2 sum w sigma^2)."),
    budget_lambda: float = typer.Option(0.1, help="HiP-LoRA penalty strength (penalty mode)."),
    targets: str = typer.Option("all-linear", help="mlp or all-linear."),
    match_budget: bool = typer.Option(True, help="Non-HiP methods get the rank matching HiP-LoRA(r, k)'s count."),
    n_train: int = typer.Option(None, help="Training pairs (default 512; quick 256)."),
    n_eval: int = typer.Option(None, help="Evaluation examples (default 64; quick 32)."),
    epochs: int = typer.Option(None, help="Epochs (default 3; quick 2)."),
    lr: float = typer.Option(None, help="Learning rate (default 5e-3)."),
    batch_size: int = typer.Option(None, help="Batch size (default 16)."),
    seed: int = typer.Option(0, help="Seed."),
    threads: int = typer.Option(1, help="Torch CPU threads."),
    quick: bool = typer.Option(False, "--quick", help=QUICK_HELP),
) -> None:
    """Train one adapter on a task (HiP-LoRA in either budget mode, or a baseline at a matched budget)."""
    from .experiments.finetune import FinetuneConfig, finetune

    try:
        cfg = FinetuneConfig(method=method, task=task, model=model, r=r, k=k, targets=targets, budget_mode=budget_mode,
                             budget_rho=budget_rho, budget_lambda=budget_lambda, match_budget=match_budget,
                             seed=seed, threads=threads, quick=quick)
        cfg.train = _settings(cfg.train, n_train, n_eval, epochs, lr, batch_size)
        out = out or f"runs/finetune-{method.split(':')[0]}"
        res = finetune(cfg, out)
    except PROTOCOL_ERRORS as e:
        _fail(e)
    m = res.metrics
    use = "" if m["budget_use_max"] is None else f", budget use {m['budget_use_max']:.3f}"
    typer.echo(f"{m['method']} on {m['task']}: accuracy {100 * m['base_accuracy']:.1f}% -> {100 * m['accuracy']:.1f}%, "
               f"{m['trainable_parameters']:,} trainable{use}; adapter in {out}/adapter, report {out}/report.md")


@app.command("merge")
def merge_cmd(
    adapters: list[str] = typer.Argument(..., help="Adapter directories trained from the same base."),
    out: str = typer.Option(..., help="Directory for the merged model (HF checkpoint)."),
    model: str = typer.Option(None, help=MODEL_HELP),
    how: str = typer.Option("sum", help="sum (task arithmetic on dW) or ties (TIES on dW)."),
    weights: str = typer.Option(None, help="Comma-separated weight per adapter (default 1 each)."),
    density: float = typer.Option(0.2, help="TIES: fraction of each dW kept."),
) -> None:
    """Merge adapters on their weight updates dW and save the merged model."""
    from .experiments.common import atomic_run_dir, load_model, write_json
    from .merging import MERGE_OPERATORS, adapter_deltas, apply_deltas, merge_deltas

    try:
        if how not in MERGE_OPERATORS:
            raise ValueError(f"unknown merge operator {how!r}; use one of {', '.join(MERGE_OPERATORS)}")
        w = [float(x) for x in weights.split(",")] if weights else None
        base, tokenizer = load_model(model)
        import copy

        deltas = [adapter_deltas(a, copy.deepcopy(base)) for a in adapters]
        merged = apply_deltas(base, merge_deltas(deltas, w, how, density), inplace=True)
        with atomic_run_dir(out) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "merge.json", {"adapters": list(adapters), "how": how, "weights": w, "density": density,
                                            "model": model or "organism"})
    except PROTOCOL_ERRORS as e:
        _fail(e)
    typer.echo(f"merged {len(adapters)} adapter(s) with {how} into {out}")


@app.command("drift")
def drift_cmd(
    methods: str = typer.Option("lora,hiplora:rho=0.02,hiplora,hiplora:rho=0.5,hiplora:mode=penalty,oplora",
                                help=METHODS_HELP + " The first is the reference."),
    task: str = typer.Option("max", help="Fine-tuning task (organism name, name@difficulty, or JSONL file)."),
    out: str = typer.Option("runs/drift", help="Run directory."),
    model: str = typer.Option(None, help=MODEL_HELP),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
    r: int = typer.Option(8, help="Rank r."),
    k: int = typer.Option(16, help="HiP-LoRA k (also the k of the interference metrics)."),
    n_train: int = typer.Option(None, help="Training pairs."),
    epochs: int = typer.Option(None, help="Epochs."),
    lr: float = typer.Option(None, help="Learning rate."),
    n_ppl: int = typer.Option(100, help="Held-out documents for the NLL."),
    n_skill: int = typer.Option(64, help="Test problems per skill."),
    n_facts: int = typer.Option(100, help="Known facts."),
    threads: int = typer.Option(1, help="Torch CPU threads."),
    quick: bool = typer.Option(False, "--quick", help=QUICK_HELP),
) -> None:
    """Spectral interference per adapted matrix and pretraining degradation, per method."""
    from .experiments.drift import DriftConfig, run_drift

    try:
        cfg = DriftConfig(methods=methods, task=task, model=model, seeds=_ints(seeds), r=r, k=k, n_ppl=n_ppl,
                          n_skill=n_skill, n_facts=n_facts, threads=threads, quick=quick)
        cfg.train = _settings(cfg.train, n_train=n_train, epochs=epochs, lr=lr)
        res = run_drift(cfg, out)
    except PROTOCOL_ERRORS as e:
        _fail(e)
    for label, pm in res.metrics["methods"].items():
        d = pm["degradation"]
        typer.echo(f"{label}: delta NLL {d['delta_nll']['estimate']:+.4f}, "
                   + ", ".join(f"{n} {v['estimate']:+.1f} pp" for n, v in d["points"].items()))
    typer.echo(f"report {out}/report.md")


@app.command("mergefail")
def mergefail_cmd(
    methods: str = typer.Option("lora,hiplora,hiplora:mode=penalty", help=METHODS_HELP),
    tasks: str = typer.Option("count,max,reverse@3,sort", help="Comma-separated tasks (T >= 2); name@d fixes the "
                                                                 "difficulty."),
    out: str = typer.Option("runs/mergefail", help="Run directory."),
    model: str = typer.Option(None, help=MODEL_HELP),
    seeds: str = typer.Option("42,100,2024", help="Comma-separated seeds."),
    n_merge: int = typer.Option(20, help="Instances per seed and merge size."),
    tau: float = typer.Option(0.9, help="Fail threshold (fraction of the single-adapter score)."),
    operators: str = typer.Option("sum,ties", help="Merge operators."),
    r: int = typer.Option(8, help="Rank r."),
    k: int = typer.Option(16, help="HiP-LoRA k."),
    n_train: int = typer.Option(None, help="Training pairs per task."),
    n_eval: int = typer.Option(None, help="Test examples per task."),
    epochs: int = typer.Option(None, help="Epochs."),
    lr: float = typer.Option(None, help="Learning rate."),
    threads: int = typer.Option(1, help="Torch CPU threads."),
    quick: bool = typer.Option(False, "--quick", help=QUICK_HELP),
) -> None:
    """MergeFail: how often merging single-task adapters (sum / TIES) breaks one of the tasks."""
    from .experiments.merge_protocol import MergeFailConfig, run_mergefail

    try:
        cfg = MergeFailConfig(methods=methods, tasks=_names(tasks), model=model, seeds=_ints(seeds), n_merge=n_merge,
                              tau=tau, operators=_names(operators), r=r, k=k, threads=threads, quick=quick)
        cfg.train = _settings(cfg.train, n_train, n_eval, epochs, lr)
        res = run_mergefail(cfg, out)
    except PROTOCOL_ERRORS as e:
        _fail(e)
    for key, v in res.metrics["pooled"].items():
        typer.echo(f"{key}: fail rate {100 * v['estimate']:.1f}% [{100 * v['low']:.1f}, {100 * v['high']:.1f}] (n={v['n']})")
    typer.echo(f"report {out}/report.md")


@app.command("continual")
def continual_cmd(
    methods: str = typer.Option("lora,hiplora,hiplora:mode=penalty", help=METHODS_HELP),
    tasks: str = typer.Option("count,max,reverse@3,sort", help="Comma-separated tasks, in training order."),
    out: str = typer.Option("runs/continual", help="Run directory."),
    model: str = typer.Option(None, help=MODEL_HELP),
    seeds: str = typer.Option("0,1", help="Comma-separated seeds."),
    r: int = typer.Option(8, help="Rank r."),
    k: int = typer.Option(16, help="HiP-LoRA k."),
    n_train: int = typer.Option(None, help="Training pairs per task."),
    n_eval: int = typer.Option(None, help="Test examples per task."),
    epochs: int = typer.Option(None, help="Epochs per stage."),
    lr: float = typer.Option(None, help="Learning rate."),
    threads: int = typer.Option(1, help="Torch CPU threads."),
    quick: bool = typer.Option(False, "--quick", help=QUICK_HELP),
) -> None:
    """Continual tuning over tasks in sequence: final average accuracy and backward transfer."""
    from .experiments.continual_protocol import ContinualConfig, run_continual_protocol

    try:
        cfg = ContinualConfig(methods=methods, tasks=_names(tasks), model=model, seeds=_ints(seeds), r=r, k=k,
                              threads=threads, quick=quick)
        cfg.train = _settings(cfg.train, n_train, n_eval, epochs, lr)
        res = run_continual_protocol(cfg, out)
    except PROTOCOL_ERRORS as e:
        _fail(e)
    for label, pm in res.metrics["methods"].items():
        typer.echo(f"{label}: ACC {100 * pm['final_average_accuracy']['estimate']:.1f}%, "
                   f"BWT {100 * pm['backward_transfer']['estimate']:+.1f} pp")
    typer.echo(f"report {out}/report.md")


@app.command("edit")
def edit_cmd(
    methods: str = typer.Option("lora,hiplora,hiplora:mode=penalty", help=METHODS_HELP),
    out: str = typer.Option("runs/edit", help="Run directory."),
    model: str = typer.Option(None, help=MODEL_HELP),
    n_edits: int = typer.Option(50, help="Counterfactual edits."),
    n_local: int = typer.Option(200, help="Unrelated known facts for locality."),
    n_skill: int = typer.Option(48, help="Test problems per skill."),
    seeds: str = typer.Option("0,1", help="Comma-separated seeds."),
    r: int = typer.Option(8, help="Rank r."),
    k: int = typer.Option(16, help="HiP-LoRA k."),
    epochs: int = typer.Option(None, help="Epochs over the edits (default 15)."),
    lr: float = typer.Option(None, help="Learning rate."),
    threads: int = typer.Option(1, help="Torch CPU threads."),
    quick: bool = typer.Option(False, "--quick", help=QUICK_HELP),
) -> None:
    """Knowledge editing: edit success, paraphrase generalisation, locality, skill preservation."""
    from .experiments.editing_protocol import EditingConfig, run_editing

    try:
        cfg = EditingConfig(methods=methods, model=model, n_edits=n_edits, n_local=n_local, n_skill=n_skill,
                            seeds=_ints(seeds), r=r, k=k, threads=threads, quick=quick)
        cfg.train = _settings(cfg.train, epochs=epochs, lr=lr)
        res = run_editing(cfg, out)
    except PROTOCOL_ERRORS as e:
        _fail(e)
    for label, pm in res.metrics["methods"].items():
        ci = pm["ci"]
        typer.echo(f"{label}: edit success {100 * ci['edit_success']['estimate']:.1f}%, paraphrase "
                   f"{100 * ci['paraphrase_generalisation']['estimate']:.1f}%, locality {100 * ci['locality']['estimate']:.1f}%")
    typer.echo(f"report {out}/report.md")


@app.command("sanity")
def sanity_cmd(
    out: str = typer.Option("runs/sanity", help="Run directory."),
    model: str = typer.Option(None, help=MODEL_HELP),
    targets: str = typer.Option("all-linear", help="mlp or all-linear."),
    n_indices: int = typer.Option(24, help="Singular indices per matrix (spread over the spectrum)."),
    n_docs: int = typer.Option(32, help="Held-out documents in the loss batch."),
    perturbations: str = typer.Option("flip,noise,zero", help="Comma-separated perturbations."),
    noise: float = typer.Option(0.1, help="Relative noise on the singular vectors."),
    seed: int = typer.Option(0, help="Seed."),
    threads: int = typer.Option(1, help="Torch CPU threads."),
    quick: bool = typer.Option(False, "--quick", help=QUICK_HELP),
) -> None:
    """Spectral sanity check: loss change from perturbing single singular directions, correlated with sigma."""
    from .experiments.sanity_protocol import SanityConfig, run_sanity

    try:
        cfg = SanityConfig(model=model, targets=targets, n_indices=n_indices, n_docs=n_docs, noise=noise,
                           perturbations=_names(perturbations), seed=seed, threads=threads, quick=quick)
        res = run_sanity(cfg, out)
    except PROTOCOL_ERRORS as e:
        _fail(e)
    for kind, v in res.metrics["perturbations"].items():
        c = v["correlation"]
        typer.echo(f"{kind}: Pearson {c['pearson_r']:.3f} (p={c['pearson_p']:.2g}), "
                   f"Spearman {c['spearman_rho']:.3f} (p={c['spearman_p']:.2g})")
    typer.echo(f"report {out}/report.md")


if __name__ == "__main__":
    app()
