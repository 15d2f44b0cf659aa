"""The generated command line: help, version, one-line errors, --quick, --config round trips, run-directory rules,
and the finetune recipe end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from helpers import save_tiny_organism
from spectral_peft.cli import main
from spectral_peft.recipes import RECIPES, recipe

TINY = ["--train.n_train", "8", "--train.n_eval", "4", "--train.epochs", "1", "--train.batch_size", "4",
        "--train.max_new_tokens", "4", "--progress", "false"]


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    return save_tiny_organism(tmp_path_factory.mktemp("org") / "model")


def test_version_and_help_list_every_recipe(capsys):
    assert main(["--version"]) == 0
    from spectral_peft import __version__

    assert capsys.readouterr().out.strip() == f"spectral-peft {__version__}"
    assert main([]) == 0
    text = capsys.readouterr().out
    for name in RECIPES:
        assert f"  {name} " in text


def test_help_is_generated_from_the_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    cfg = recipe("finetune").Config()
    for flag in ("--method", "--task", "--model", "--seed", "--train.lr", "--chat-template", "--quick", "--config",
                 "--overwrite", "--resume", "--out"):
        assert flag in text
    assert f"default: {cfg.method}" in text and "method spec" in text  # default and help from the dataclass


def test_help_is_fast():
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spectral_peft.cli", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - start < 5  # no recipe (and no torch) is imported for the command list


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--method", "lorax"], "unknown method 'lorax'"),
    (["finetune", "--task", "no-such-task"], "no-such-task"),
    (["finetune", "--train.lr", "abc"], "train.lr"),
    (["finetune", "--train.lr", "-1"], "lr must be a positive number"),
    (["finetune", "--model", "./no/such/dir"], "no such checkpoint directory"),
    (["finetune", "--overwrite", "--resume"], "not both"),
    (["nonsense"], "unknown command 'nonsense'"),
])
def test_bad_input_is_one_line_exit_2_before_work(argv, message, capsys, tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    assert main([*argv, "--out", str(out)] if argv[0] != "nonsense" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error:") and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".run.partial").exists()
    assert time.perf_counter() - start < 10


def test_finetune_quick_config_round_trip_and_refusal(organism, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", "--model", organism, "--task", "reverse@2", "--method", "lora:r=2", "--quick", *TINY[:4]]
    assert main([*argv, "--out", str(out)]) == 0
    assert "lora:r=2 on reverse@2" in capsys.readouterr().out
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    preset = recipe("finetune").QUICK
    assert cfg["train"]["epochs"] == preset["train.epochs"] and cfg["train"]["n_eval"] == 4  # flags beat the preset
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["items"]["correct"]) == len(metrics["items"]["base_correct"]) == 4
    assert metrics["accuracy"]["method"] == "wilson"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "report.md").exists()
    # an existing run is refused; the resolved config reproduces the run exactly
    assert main([*argv, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    again = tmp_path / "again"
    assert main(["finetune", "--config", str(out / "config.yaml"), "--out", str(again)]) == 0
    assert yaml.safe_load((again / "config.yaml").read_text()) == cfg
    assert json.loads((again / "metrics.json").read_text())["items"] == metrics["items"]


def test_dashed_flags_bare_booleans_and_comma_lists(tmp_path, capsys):
    """`--chat-template`, a bare `--allow-code-execution` and `--seeds 0,1` reach the config as typed values."""
    from spectral_peft.cli import _normalise

    cfg = recipe("finetune").Config
    assert _normalise(["--allow-code-execution", "--chat-template", "none", "--train.n-train", "4"], cfg) == [
        "--allow_code_execution=true", "--chat_template", "none", "--train.n_train", "4"]
    assert _normalise(["--progress", "false"], cfg) == ["--progress", "false"]
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    assert "--chat-template" in text and "--allow-code-execution" in text and "--chat_template" not in text
    out = tmp_path / "p"
    assert main(["finetune", "--chat-template", "sometimes", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sometimes" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_unexpected_error_is_one_line_pointing_to_debug(monkeypatch, tmp_path, capsys):
    def broken(cfg, run):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(recipe("finetune"), "run", broken)
    out = tmp_path / "run"
    assert main(["finetune", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == "error: RuntimeError: boom (rerun with --debug for the traceback)"
    assert list(tmp_path.iterdir()) == []  # the work directory held no work: removed
    assert main(["finetune", "--out", str(out), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err and err.strip().endswith("for the traceback)")


def test_ctrl_c_exits_130_and_keeps_resumable_work(monkeypatch, tmp_path, capsys):
    def interrupted(cfg, run):
        run.unit("first", lambda: 1)
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe("finetune"), "run", interrupted)
    out = tmp_path / "run"
    assert main(["finetune", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted") and "--resume" in err and "\n" not in err
    assert (tmp_path / ".run.partial" / "units" / "first.json").exists() and not out.exists()


def test_option_errors_name_the_flag_and_the_help(capsys):
    assert main(["finetune", "--train.n-train", "many"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --train.n-train: expected int, got many; see spectral-peft "
                                               "finetune --help")
    assert main(["export", "--adapter"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "spectral-peft export --help" in err
