"""The HiP-LoRA commands: help, one-line errors, finetune -> merge (the merged model is W + sum of dWs), and
--quick protocol runs through the CLI on a tiny random organism."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import save_tiny_organism

from spectral_peft.cli import app
from spectral_peft.experiments.common import load_model
from spectral_peft.merging import adapter_deltas

runner = CliRunner()
SMALL = ["--r", "4", "--k", "4", "--n-train", "16", "--n-eval", "4", "--epochs", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_organism(tmp_path_factory.mktemp("tiny-organism-cli-hip"))


@pytest.mark.parametrize("command,option", [("finetune", "--budget-mode"), ("merge", "--how"), ("drift", "--methods"),
                                            ("mergefail", "--n-merge"), ("continual", "--tasks"),
                                            ("edit", "--n-edits"), ("sanity", "--n-indices")])
def test_help(command, option):
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0 and option in res.output and "--model" in res.output


@pytest.mark.parametrize("args,message", [
    (["finetune", "--method", "lorax"], "unknown method 'lorax'"),
    (["finetune", "--method", "hiplora:rho=x"], "bad value 'x' for 'rho'"),
    (["finetune", "--task", "/nonexistent/data.jsonl"], "data file /nonexistent/data.jsonl does not exist"),
    (["finetune", "--task", "juggling"], "unknown task 'juggling'"),
    (["mergefail", "--tasks", "sort"], "MergeFail needs at least 2 distinct tasks"),
    (["mergefail", "--operators", "mean"], "unknown merge operator"),
    (["continual", "--seeds", "a,b"], "expected comma-separated integers"),
    (["sanity", "--perturbations", "shake"], "unknown perturbation"),
    (["merge", "/nonexistent/adapter", "--out", "/tmp/x", "--how", "avg"], "unknown merge operator 'avg'"),
])
def test_one_line_errors(args, message, checkpoint):
    res = runner.invoke(app, [*args, "--model", checkpoint])
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.strip().startswith("error:") and res.output.strip().count("\n") == 0


def test_finetune_then_merge_is_the_sum_of_updates(checkpoint, tmp_path):
    dirs = []
    for method, task in (("hiplora", "sort"), ("lora", "reverse")):
        out = tmp_path / method
        res = runner.invoke(app, ["finetune", "--method", method, "--task", task, "--model", checkpoint,
                                  "--out", str(out), "--lr", "0.02", *SMALL])
        assert res.exit_code == 0, res.output
        assert (out / "adapter" / "adapter_config.json").exists() and (out / "report.md").exists()
        dirs.append(out / "adapter")
    merged_dir = tmp_path / "merged"
    res = runner.invoke(app, ["merge", *map(str, dirs), "--out", str(merged_dir), "--model", checkpoint])
    assert res.exit_code == 0, res.output
    base, _ = load_model(checkpoint)
    deltas = [adapter_deltas(d, load_model(checkpoint)[0]) for d in dirs]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    mods, base_mods = dict(merged.named_modules()), dict(base.named_modules())
    names = set(deltas[0]) | set(deltas[1])
    assert names and all(float(d.abs().max()) > 0 for d in deltas[0].values())
    for name in names:
        expected = base_mods[name].weight + sum(d.get(name, 0) for d in deltas)
        torch.testing.assert_close(mods[name].weight, expected, rtol=0, atol=1e-6)
    assert json.loads((merged_dir / "merge.json").read_text())["how"] == "sum"


def test_quick_protocols_through_the_cli(checkpoint, tmp_path):
    res = runner.invoke(app, ["mergefail", "--quick", "--methods", "lora,hiplora", "--model", checkpoint,
                              "--out", str(tmp_path / "mf"), *SMALL])
    assert res.exit_code == 0, res.output
    assert "hiplora|sum: fail rate" in res.output
    res = runner.invoke(app, ["sanity", "--quick", "--n-indices", "2", "--n-docs", "2", "--model", checkpoint,
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["quick"] is True
