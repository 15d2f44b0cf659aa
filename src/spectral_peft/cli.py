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


if __name__ == "__main__":
    app()
