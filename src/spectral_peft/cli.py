"""The ``spectral-peft`` command, generated from the recipes' config dataclasses.

Why jsonargparse: it builds each command's options from a dataclass's type hints and docstring, so every default
lives once, in the recipe's ``Config``; it reads and writes YAML configs (``--config run.yaml``) that nest like the
dataclasses; and it is what litgpt uses for the same job. (typer and click would need every option declared again.)

Every recipe command takes ``--config FILE``, ``--out DIR`` (default ``runs/NAME``), ``--quick`` (the recipe's
named small preset), ``--overwrite`` / ``--resume`` (an existing run is otherwise refused) and ``--debug``; the
remaining options are the fields of the recipe's ``Config`` (``--chat-template`` and ``--chat_template`` are the same
option). A list option takes ``0,1,2`` or ``[0, 1, 2]``. The
resolved config that actually ran is written to ``DIR/config.yaml``, which ``--config`` reads back.
Only the chosen recipe is imported, so ``--help`` stays fast.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import fields, is_dataclass

from . import __version__
from .recipes import RECIPES, execute, recipe

TOOLS = {
    "export": "export an adapter as a standard PEFT LoRA that vanilla peft loads",
    "pretrain-organism": "pretrain the model organism on the generated world",
}
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)


def usage() -> str:
    width = max(map(len, [*RECIPES, *TOOLS]))
    lines = [f"spectral-peft {__version__}: spectrum-aware parameter-efficient fine-tuning (PALoRA, HiP-LoRA and "
             "baselines)", "", "usage: spectral-peft COMMAND [--help] [options]", "", "recipes:"]
    lines += [f"  {n:<{width}}  {h}" for n, h in RECIPES.items()]
    lines += ["", "tools:"] + [f"  {n:<{width}}  {h}" for n, h in TOOLS.items()]
    lines += ["", "spectral-peft COMMAND --help lists a command's options; --version prints the version."]
    return "\n".join(lines)


def _typed_flags(cls: type, prefix: str = "") -> tuple[set[str], set[str]]:
    """The flags of ``cls``'s fields whose type is a tuple or list (they take ``a,b,c``) and those that are booleans
    (a bare flag means true)."""
    lists: set[str] = set()
    bools: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            sub_lists, sub_bools = _typed_flags(kind, f"{prefix}{f.name}.")
            lists, bools = lists | sub_lists, bools | sub_bools
        elif typing.get_origin(kind) in (tuple, list):
            lists.add(f"--{prefix}{f.name}")
        elif kind is bool:
            bools.add(f"--{prefix}{f.name}")
    return lists, bools


def _normalise(argv: list[str], cls: type | None = None) -> list[str]:
    """Rewrite the command line into jsonargparse's terms: ``--chat-template x`` -> ``--chat_template x`` (fields
    are Python names), ``--seeds 0,1,2`` -> ``--seeds [0,1,2]`` (lists in YAML's flow syntax) and a bare boolean
    flag ``--allow-code-execution`` -> ``--allow_code_execution=true``."""
    lists, bools = _typed_flags(cls) if cls is not None else (set(), set())
    argv = [a.partition("=")[0].replace("-", "_").replace("__", "--", 1) + a[len(a.partition("=")[0]):]
            if a.startswith("--") else a for a in argv]
    out: list[str] = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        if eq and flag in lists and not value.startswith("["):
            arg = f"{flag}=[{value}]"
        elif i and argv[i - 1] in lists and not arg.startswith(("[", "--")):
            arg = f"[{arg}]"
        elif not eq and arg in bools and following.lower() not in ("true", "false"):
            arg = f"{arg}=true"
        out.append(arg)
    return out


def _help_formatter():
    from jsonargparse import DefaultHelpFormatter

    class DashedHelp(DefaultHelpFormatter):
        """Shows ``--chat-template`` for the field ``chat_template``."""

        def _format_action_invocation(self, action):
            return super()._format_action_invocation(action).replace("_", "-")

        def _format_usage(self, *args, **kwargs):
            return super()._format_usage(*args, **kwargs).replace("_", "-")

    return DashedHelp


def _parser(name: str, module):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"spectral-peft {name}", description=(module.__doc__ or "").strip(),
                            exit_on_error=False, default_env=False, formatter_class=_help_formatter())
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config (e.g. a run's config.yaml).")
    parser.add_argument("--out", type=str, default=f"runs/{name}", help="The run directory.")
    preset = ", ".join(f"{k}={v}" for k, v in module.QUICK.items()) or "none (this recipe has no sizes)"
    parser.add_argument("--quick", action="store_true", help=f"The recipe's small preset: {preset}.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing run directory of ours.")
    parser.add_argument("--resume", action="store_true", help="Continue an interrupted run (done units are kept).")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an unexpected error.")
    parser.add_class_arguments(module.Config, nested_key=None, as_group=False)
    return parser


def run_recipe(name: str, argv: list[str]) -> int:
    module = recipe(name)
    debug = "--debug" in argv
    try:
        parser = _parser(name, module)
        if "--quick" in argv:
            parser.set_defaults(module.QUICK)
        ns = parser.parse_args(_normalise(argv, module.Config))
        if ns.overwrite and ns.resume:
            raise ValueError("give --overwrite or --resume, not both")
        options = ns.clone()
        for key in ("config", "out", "quick", "overwrite", "resume", "debug", "__path__"):
            options.pop(key, None)
        cfg = parser.instantiate(options) if hasattr(parser, "instantiate") else options
        cfg = module.Config(**{f.name: getattr(cfg, f.name) for f in fields(module.Config)})
        _, summary = execute(name, cfg, ns.out, "overwrite" if ns.overwrite else "resume" if ns.resume else "new")
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - every error becomes one line (with --debug, the traceback too)
        return _report(err, debug)
    print(summary)
    print(f"wrote {ns.out}")
    return 0


def _report(err: Exception, debug: bool) -> int:
    from jsonargparse import ArgumentError

    if debug:
        import traceback

        traceback.print_exception(err)
    if isinstance(err, ArgumentError):
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print("error: " + " ".join(lines[:2]), file=sys.stderr)
        return 2
    if isinstance(err, USER_ERRORS):
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {str(msg).splitlines()[0] if str(msg) else type(err).__name__}", file=sys.stderr)
        return 2
    print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
          "(rerun with --debug for the traceback)", file=sys.stderr)
    return 1


def export(adapter: str, out: str, model: str = "organism", max_rank: int | None = None) -> None:
    """Export an adapter as a standard PEFT LoRA that vanilla peft loads (exact unless max_rank truncates).

    Args:
        adapter: a spectral-peft adapter directory.
        out: where to write the PEFT LoRA directory (must not exist).
        model: the base model the adapter was trained on ("organism", a checkpoint directory or a hub id).
        max_rank: truncate each update to this rank (the error is reported).
    """
    from pathlib import Path

    from .export import export_lora
    from .loading import check_model_name, load_model
    from .model import load_adapter, read_adapter_config

    if Path(out).exists():
        raise FileExistsError(f"{out} exists; choose a new directory for the export")
    read_adapter_config(adapter)  # fail in one line before the model loads
    check_model_name(model)
    base, _ = load_model(model)
    errors = export_lora(load_adapter(base, adapter, progress=False), out, max_rank=max_rank)
    print(f"wrote {out}: {len(errors)} modules, largest relative error {max(errors.values()):.2e}")


def pretrain_organism(out: str = "runs/organism/checkpoint", seed: int = 0, steps: int = 1300,
                      run_dir: str = "runs/organism", resume: bool = True, threads: int = 2) -> None:
    """Pretrain the model organism on the generated world and save it as a Hugging Face checkpoint.

    Args:
        out: checkpoint directory (copy it over the package's toy/ to replace the shipped organism).
        seed: seed of the corpus, tokenizer, initialisation and batch order.
        steps: optimizer steps.
        run_dir: where resumable training state is kept.
        resume: resume from the state in run_dir if there is one.
        threads: torch CPU threads (results are deterministic for a fixed value).
    """
    from .organism import PretrainConfig, pretrain

    if steps < 1 or threads < 1:
        raise ValueError("steps and threads must be >= 1")
    pretrain(out, PretrainConfig(seed=seed, steps=steps, threads=threads), run_dir=run_dir, resume=resume)
    print(f"saved the organism to {out}")


def run_tool(name: str, argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    fn = export if name == "export" else pretrain_organism
    debug = "--debug" in argv
    try:
        parser = ArgumentParser(prog=f"spectral-peft {name}", description=fn.__doc__.split("\n\n")[0],
                                exit_on_error=False, formatter_class=_help_formatter())
        parser.add_argument("--debug", action="store_true", help="Show the traceback of an unexpected error.")
        parser.add_function_arguments(fn, as_group=False)
        ns = parser.parse_args(_normalise(argv))
        ns.pop("debug", None)
        fn(**ns.as_dict())
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001
        return _report(err, debug)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"spectral-peft {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name in RECIPES:
        return run_recipe(name, rest)
    if name in TOOLS:
        return run_tool(name, rest)
    print(f"error: unknown command {name!r}; run `spectral-peft --help` for the list", file=sys.stderr)
    return 2


def app() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    app()
