"""The recipes on a model that is not the organism: a tiny random Qwen2 saved to a directory (with the organism's
tokenizer), fed real data sets' formats (GSM8K, ARC, a knowledge-QA JSONL) through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import save_tiny_qwen2
from spectral_peft.cli import main

REAL = Path(__file__).parent / "fixtures" / "real"
GSM8K = f"gsm8k:{REAL / 'gsm8k'}"
ARC = f"arc-easy:{REAL / 'ai2_arc'}"
SMALL = ["--train.n-train", "3", "--train.n-eval", "2", "--train.max-new-tokens", "8", "--progress", "false"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("qwen") / "model")


def run(argv, capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_finetune_then_mergefail_quick_on_qwen2(qwen, tmp_path, capsys):
    out = run(["finetune", "--model", qwen, "--task", GSM8K, "--method", "hiplora:r=2,k=4", "--quick", *SMALL,
               "--out", str(tmp_path / "ft")], capsys)
    assert "hiplora:r=2,k=4 on gsm8k" in out
    ft = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert ft["budget_use_max"] <= 1 + 1e-6 and len(ft["items"]["correct"]) == 2
    run(["mergefail", "--model", qwen, "--tasks", f"{GSM8K},{ARC}", "--methods", "lora,hiplora", "--r", "2",
         "--k", "4", "--quick", *SMALL, "--out", str(tmp_path / "mf")], capsys)
    cfg = yaml.safe_load((tmp_path / "mf" / "config.yaml").read_text())
    assert cfg["model"] == qwen and cfg["tasks"] == [GSM8K, ARC] and cfg["seeds"] == [42]
    metrics = json.loads((tmp_path / "mf" / "metrics.json").read_text())
    assert set(metrics["single_accuracy"]) == {"lora", "hiplora"} and metrics["summary"]
    assert (tmp_path / "mf" / "report.md").exists()


def test_svf_inject_eval_on_qwen2_with_gsm8k_and_qa_files(qwen, tmp_path, capsys, monkeypatch):
    facts = REAL / "knowledge.jsonl"
    run(["svf", "--model", qwen, "--skill", GSM8K, "--quick", "--train.n-train", "3", "--train.n-val", "3",
         "--train.max-new-tokens", "8", "--progress", "false", "--out", str(tmp_path / "svf")], capsys)
    assert (tmp_path / "svf" / "probe" / "probe_config.json").exists()
    run(["inject", "--model", qwen, "--probe", str(tmp_path / "svf"), "--facts", str(facts), "--skill", GSM8K,
         "--method", "palora", "--quick", "--n-facts", "4", "--eval.n-skill", "3", "--eval.max-new-tokens", "8",
         "--progress", "false", "--out", str(tmp_path / "inject")], capsys)
    injected = json.loads((tmp_path / "inject" / "metrics.json").read_text())
    n_rows = sum(1 for line in facts.read_text().splitlines() if line.strip())
    assert injected["n_inject"] == 4 and injected["n_inject"] + injected["n_retain"] <= n_rows  # a random model knows little
    assert injected["skills"] == [GSM8K]
    monkeypatch.chdir(tmp_path / "svf")  # the run stores absolute paths: eval works from anywhere
    run(["eval", "--run-dir", str(tmp_path / "inject"), "--progress", "false", "--out", str(tmp_path / "eval")], capsys)
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    drop = lambda items: {k: v for k, v in items.items() if k != "seconds"}  # noqa: E731
    assert drop(again["items"]["injected"]) == drop(injected["items"]["injected"])
