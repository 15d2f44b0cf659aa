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


if __name__ == "__main__":
    app()
