"""The `svf`, `inject`, `eval` and `demo` commands: help, one-line errors, and an svf -> inject -> eval chain on a
tiny random organism."""

import json

import pytest
import torch
from typer.testing import CliRunner

from helpers import save_tiny_organism

from spectral_peft.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random organism saved as an HF checkpoint (hidden 32, MLP 64, one layer)."""
    return save_tiny_organism(tmp_path_factory.mktemp("tiny-organism"))


@pytest.mark.parametrize("command,option", [("svf", "--objective"), ("inject", "--method"), ("eval", "--n-skill"),
                                            ("demo", "--methods")])
def test_help(command, option):
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0 and option in res.output and "--model" in res.output


@pytest.mark.parametrize("args,message", [
    (["inject", "--method", "lorax"], "unknown method 'lorax'"),
    (["inject", "--probe", "/nonexistent/probe"], "probe directory /nonexistent/probe does not exist"),
    (["svf", "--skill", "chess"], "unknown task 'chess'"),
    (["svf", "--objective", "ppo"], "unknown objective 'ppo'"),
    (["demo", "--methods", "lora,nope"], "unknown method 'nope'"),
    (["eval", "/nonexistent/run"], "is not an injection run directory"),
])
def test_bad_input_is_a_one_line_error(args, message, tmp_path):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output and res.output.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_svf_inject_eval_chain(checkpoint, tmp_path):
    torch.set_num_threads(1)
    svf = tmp_path / "svf"
    res = runner.invoke(app, ["svf", "--model", checkpoint, "--out", str(svf), "--n-train", "16", "--n-val", "4",
                              "--eval-every", "1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert (svf / "probe" / "probe_config.json").exists() and (svf / "figures" / "probe_spectrum.png").exists()
    run = tmp_path / "inject"
    res = runner.invoke(app, ["inject", "--method", "palora", "--probe", str(svf), "--model", checkpoint, "--out",
                              str(run), "--n-facts", "4", "--epochs", "1", "--r", "4", "--n-skill", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["injected"]["trainable_parameters"] == 3 * 4 * 96 and len(metrics["facts"]["inject"]) == 4
    res = runner.invoke(app, ["eval", str(run), "--n-skill", "2", "--n-ppl", "2", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "e.json").read_text())["injected"]
    assert again["recall"] == metrics["injected"]["recall"]  # the reloaded adapter recalls exactly as trained
    assert "parameter overhead" in res.output and "| palora |" in res.output
