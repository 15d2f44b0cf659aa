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

Errors: every input is checked before any work starts (the recipe's ``Config.validate()``, then the run directory).
A bad input (any :class:`~spectral_peft.errors.SpectralPeftError`, a ``ValueError``, ``KeyError``,
``FileNotFoundError``, ``FileExistsError`` or ``NotADirectoryError``, or a bad option) prints one line, ``error:
WHAT IS WRONG; WHAT TO DO``, and exits with status 2. Any other exception is a bug: one line ending "rerun with
--debug for the traceback", exit status 1 (``--debug`` prints the traceback too). Ctrl-C exits with status 130.
"""

from __future__ import annotations

import re
import sys
import typing
from dataclasses import fields, is_dataclass

from . import __version__
from .errors import InputError, OutputExistsError, SpectralPeftError
from .recipes import RECIPES, execute, recipe

TOOLS = {
    "export": "export an adapter as a standard PEFT LoRA that vanilla peft loads",
    "pretrain-organism": "pretrain the model organism on the generated world",
    "install-organism": "replace the shipped organism with a validated pretrained checkpoint",
}
USER_ERRORS = (SpectralPeftError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)


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
    are Python names), ``--seeds 0,1,2`` -> ``--seeds [0,1,2]`` (lists in YAML's flow syntax; empty items are
    dropped, so ``--seeds ,`` is the empty list the recipe refuses) and a bare boolean flag
    ``--allow-code-execution`` -> ``--allow_code_execution=true``."""
    lists, bools = _typed_flags(cls) if cls is not None else (set(), set())
    argv = [a.partition("=")[0].replace("-", "_").replace("__", "--", 1) + a[len(a.partition("=")[0]):]
            if a.startswith("--") else a for a in argv]
    out: list[str] = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        if eq and flag in lists and not value.startswith("["):
            arg = f"{flag}={_flow(value)}"
        elif i and argv[i - 1] in lists and not arg.startswith(("[", "--")):
            arg = _flow(arg)
        elif not eq and arg in bools and following.lower() not in ("true", "false"):
            arg = f"{arg}=true"
        out.append(arg)
    return out


def _flow(items: str) -> str:
    return "[" + ",".join(p for p in items.split(",") if p.strip()) + "]"


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
            raise InputError("give --overwrite or --resume, not both")
        options = ns.clone()
        for key in ("config", "out", "quick", "overwrite", "resume", "debug", "__path__"):
            options.pop(key, None)
        cfg = parser.instantiate(options) if hasattr(parser, "instantiate") else options
        cfg = module.Config(**{f.name: getattr(cfg, f.name) for f in fields(module.Config)})
        _, summary = execute(name, cfg, ns.out, "overwrite" if ns.overwrite else "resume" if ns.resume else "new")
    except SystemExit:
        raise
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every error becomes one line
        return _report(err, debug, name)
    print(summary)
    print(f"wrote {ns.out}")
    return 0


def _report(err: BaseException, debug: bool, command: str | None = None) -> int:
    """Print ``err`` as one line on stderr (the traceback first with ``debug``) and return the exit status: 2 for
    a bad input or option, 130 for Ctrl-C, 1 for anything else (a bug)."""
    from jsonargparse import ArgumentError

    if debug:
        import traceback

        traceback.print_exception(err)
    if isinstance(err, KeyboardInterrupt):
        print("error: interrupted (a run that saved units or checkpoints continues with --resume)", file=sys.stderr)
        return 130
    if isinstance(err, ArgumentError):
        print(f"error: {_option_message(str(err), command)}", file=sys.stderr)
        return 2
    if isinstance(err, USER_ERRORS):
        msg = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
        print(f"error: {msg.splitlines()[0] if msg else type(err).__name__}", file=sys.stderr)
        return 2
    msg = str(err).strip()
    print(f"error: {type(err).__name__}: {msg.splitlines()[0] if msg else 'no message'} (rerun with --debug for the "
          "traceback)", file=sys.stderr)
    return 1


def _option_message(text: str, command: str | None) -> str:
    """jsonargparse's message about a bad option, as one line in the command line's terms:
    ``Parser key "train.lr": Expected a <class 'float'>. Got value: abc`` -> ``--train.lr: expected float, got
    abc``, with a pointer to the command's ``--help``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    msg = " ".join(lines[:2]) or "bad options"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', msg)
    if key:
        msg = f"--{key.group(1).replace('_', '-')}: {key.group(2)}"
    msg = re.sub(r"Expected a <class '(\w+)'>\. Got value:", r"expected \1, got", msg)
    return f"{msg}; see spectral-peft {command} --help" if command else msg


def export(adapter: str, out: str, model: str = "organism", max_rank: int | None = None, device: str = "auto",
           dtype: str = "auto", split_expert: bool = False) -> None:
    """Export an adapter as a standard PEFT LoRA that vanilla peft loads (exact unless max_rank truncates).

    The adapter's weights must be whole and finite, and the export is written beside ``out`` and published only
    when complete (as a run directory: it carries the manifest ``run.json``).

    Args:
        adapter: a spectral-peft adapter directory.
        out: where to write the PEFT LoRA directory (must not exist).
        model: the base model the adapter was trained on ("organism", a checkpoint directory or a hub id).
        max_rank: truncate each update to this rank (the error is reported).
        device: where the base model is loaded: auto (CUDA when available), cpu, cuda or cuda:N.
        dtype: the base model's dtype: auto (the checkpoint's own), float32, bfloat16 or float16.
        split_expert: for PALoRA and SVF, the vLLM-ready split: OUT/base, a Hugging Face checkpoint (tokenizer
            included) with the SVF expert folded in, and OUT/lora, a rank-r PEFT LoRA of PALoRA's knowledge update
            against it (SVF writes no LoRA).
    """
    from pathlib import Path

    from .export import SPLIT_METHODS, export_lora
    from .loading import check_device, check_dtype, check_model_name, load_model
    from .model import load_adapter
    from .runs import RunDir
    from .validation import check_adapter, check_at_least

    if Path(out).expanduser().exists() or Path(out).expanduser().is_symlink():
        raise OutputExistsError(f"{out} exists; choose a new directory for the export")
    if max_rank is not None:
        check_at_least(1, max_rank=max_rank)
    config = check_adapter(adapter)  # whole and finite: fail in one line before the model loads
    if "peft_type" in config:
        raise InputError(f"{adapter} is already a PEFT adapter ({config['peft_type']}); vanilla peft loads it as is")
    if split_expert and config.get("method") not in SPLIT_METHODS:
        raise InputError(f"--split-expert needs an adapter with an SVF expert ({', '.join(SPLIT_METHODS)}), "
                         f"{adapter} is {config.get('method')!r}; export it without --split-expert")
    check_model_name(model)
    check_device(device)
    check_dtype(dtype)
    run = RunDir(out, "export")
    try:
        base, tokenizer = load_model(model, device=device, dtype=dtype)
        result = export_lora(load_adapter(base, Path(adapter).expanduser(), progress=False), run.path,
                             max_rank=max_rank, split_expert=split_expert, tokenizer=tokenizer)
    except BaseException:
        run.abandon(keep_work=False)  # nothing to resume
        raise
    run.finish()
    if not split_expert:
        print(f"wrote {out}: {len(result)} modules, largest relative error {max(result.values(), default=0.0):.2e}")
    elif result.lora is None:
        print(f"wrote {out}/base: the base with the SVF expert folded in (no LoRA: the expert is the whole update)")
    else:
        print(f"wrote {out}/base (the base with the expert folded in) and {out}/lora: {len(result.errors)} modules, "
              f"largest relative error {max(result.errors.values(), default=0.0):.2e}")


def pretrain_organism(out: str = "runs/organism", seed: int = 0, steps: int = 1600, threads: int = 2,
                      overwrite: bool = False, resume: bool = False) -> None:
    """Pretrain the model organism on the generated world into a run directory (the package is not touched).

    The run directory holds the resumable state (state.safetensors, saved every 50 steps) and, when training is
    done, the Hugging Face checkpoint OUT/checkpoint; install-organism makes that the shipped organism.

    Args:
        out: the run directory.
        seed: seed of the corpus, tokenizer, initialisation and batch order.
        steps: optimizer steps.
        threads: torch CPU threads (results are deterministic for a fixed value).
        overwrite: replace an existing run directory of ours.
        resume: continue an interrupted run from its last saved state.
    """
    from .errors import InputError
    from .organism import PretrainConfig, pretrain
    from .runs import RunDir

    if overwrite and resume:
        raise InputError("give --overwrite or --resume, not both")
    cfg = PretrainConfig(seed=seed, steps=steps, threads=threads)
    cfg.validate()
    run = RunDir(out, "pretrain-organism", "overwrite" if overwrite else "resume" if resume else "new")
    run.write_config(cfg)
    pretrain(run.path, cfg)
    run.finish()
    print(f"wrote {out}; make it the shipped organism with: spectral-peft install-organism --checkpoint "
          f"{out}/checkpoint --force")


def install_organism(checkpoint: str, force: bool = False) -> None:
    """Replace the shipped organism (the package's toy/) with a pretrained checkpoint, after validating it.

    The checkpoint must load as a causal LM with its tokenizer and have finite weights. The new checkpoint is
    swapped in atomically; the old one is removed only after. Without --force nothing is replaced.

    Args:
        checkpoint: the checkpoint directory (pretrain-organism writes RUN/checkpoint).
        force: replace the shipped checkpoint.
    """
    from pathlib import Path

    from .organism import install

    target = install(checkpoint, force=force)
    print(f"installed {checkpoint} as the organism in {target}")
    if not (Path(target) / "quality.json").exists():
        print("note: it has no quality.json, so the quality test has nothing to compare against; record one with "
              f"python -m spectral_peft.organism.quality --json {target}/quality.json")


def run_tool(name: str, argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    fn = {"export": export, "pretrain-organism": pretrain_organism, "install-organism": install_organism}[name]
    argv = _normalise(argv)  # --split-expert -> --split_expert
    bare = {f"--{k}" for k, v in typing.get_type_hints(fn).items() if v is bool}  # a bare boolean flag means true
    argv = [f"{a}=true" if a in bare and argv[i + 1:i + 2] not in (["true"], ["false"]) else a
            for i, a in enumerate(argv)]
    debug = "--debug" in argv
    try:
        parser = ArgumentParser(prog=f"spectral-peft {name}", description=fn.__doc__.split("\n\n")[0],
                                exit_on_error=False, formatter_class=_help_formatter())
        parser.add_argument("--debug", action="store_true", help="Show the traceback of an unexpected error.")
        parser.add_function_arguments(fn, as_group=False)
        ns = parser.parse_args(argv)
        ns.pop("debug", None)
        fn(**ns.as_dict())
    except SystemExit:
        raise
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every error becomes one line
        return _report(err, debug, name)
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
