"""--device and --dtype: the requested dtype is the one trained in, auto keeps the checkpoint's, a missing CUDA is a
one-line error, and models are reloaded (never deep-copied) with results identical to deep copies."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from helpers import save_tiny_organism
from torch import nn

from spectral_peft.cli import main
from spectral_peft.errors import InputError
from spectral_peft.loading import ModelSource, load_model
from spectral_peft.recipes import execute, finetune, mergefail
from spectral_peft.training.adapter import FinetuneSettings

TINY = FinetuneSettings(n_train=8, n_eval=3, epochs=1, batch_size=4, lr=2e-3, max_new_tokens=4)


@pytest.fixture(scope="module")
def organism(tmp_path_factory, one_thread):
    return save_tiny_organism(tmp_path_factory.mktemp("org") / "model", num_layers=2)


@pytest.fixture(scope="module")
def bf16_checkpoint(organism, tmp_path_factory):
    model, tok = load_model(organism)
    path = tmp_path_factory.mktemp("bf16") / "model"
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


class DeepCopySource(ModelSource):
    """The old behaviour, as the reference: load once, hand out deep copies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kept = self._model

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self._kept).eval()


def test_dtype_bfloat16_trains_in_bf16(organism, tmp_path, monkeypatch):
    seen = []
    train = finetune.train_adapter

    def recording(base, *args, **kwargs):
        seen.append({p.dtype for p in base.parameters()})
        model, history = train(base, *args, **kwargs)
        seen.append({p.dtype for n, p in model.named_parameters() if not p.requires_grad})
        return model, history

    monkeypatch.setattr(finetune, "train_adapter", recording)
    out = tmp_path / "ft"
    assert main(["finetune", "--model", organism, "--dtype", "bfloat16", "--method", "lora:r=2", "--task", "sort",
                 "--train.n-train", "8", "--train.n-eval", "3", "--train.epochs", "1", "--train.max-new-tokens", "4",
                 "--progress", "false", "--out", str(out)]) == 0
    assert seen == [{torch.bfloat16}, {torch.bfloat16}]
    assert (out / "adapter" / "adapter_config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["items"]["correct"]) == 3 and metrics["steps"] >= 1


def test_auto_dtype_is_the_checkpoints(organism, bf16_checkpoint):
    assert next(ModelSource(bf16_checkpoint).fresh().parameters()).dtype == torch.bfloat16
    assert next(ModelSource(organism).fresh().parameters()).dtype == torch.float32
    assert next(load_model(bf16_checkpoint, dtype="float32")[0].parameters()).dtype == torch.float32
    source = ModelSource(bf16_checkpoint, "cpu", "float16")
    assert {next(source.fresh().parameters()).dtype for _ in range(2)} == {torch.float16}  # the reload too


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda_is_one_line(organism, tmp_path, capsys):
    assert main(["finetune", "--model", organism, "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device cuda" in err and "CUDA is not available" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("field, value, message", [("device", "tpu", "unknown device"),
                                                   ("device", "cuda:x", "unknown device"),
                                                   ("dtype", "float64", "unknown dtype"),
                                                   ("dtype", "bf16", "unknown dtype")])
def test_bad_device_or_dtype_is_refused_in_validate(field, value, message):
    with pytest.raises(InputError, match=message):
        replace(finetune.Config(), **{field: value}).validate()


def mergefail_config(model: str) -> mergefail.Config:
    return mergefail.Config(methods="lora,hiplora", tasks=("count", "max"), model=model, seeds=(3,), r=2, k=2,
                            n_merge=2, train=TINY, progress=False)


def outcomes(result: mergefail.Result) -> dict:
    return {"base": result.base_correct, "single": result.single_correct,
            "merged": [r.to_dict() for r in result.results] if hasattr(result.results[0], "to_dict")
            else result.results}


@pytest.fixture(scope="module")
def reloaded(organism, tmp_path_factory):
    """A two-method mergefail run with ``copy.deepcopy`` refusing modules."""
    real = copy.deepcopy

    def no_module_copies(obj, *args, **kwargs):
        if isinstance(obj, nn.Module):
            raise TypeError(f"deepcopy of a {type(obj).__name__}")
        return real(obj, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(copy, "deepcopy", no_module_copies)
        result, _ = execute("mergefail", mergefail_config(organism), tmp_path_factory.mktemp("mf") / "run")
    return result


def test_no_deepcopy_of_the_model_per_method(reloaded):
    assert set(reloaded.single_correct) == {"lora", "hiplora"}


def test_reloads_give_the_results_of_deep_copies(reloaded, organism, tmp_path, monkeypatch):
    monkeypatch.setattr(mergefail, "ModelSource", DeepCopySource)
    reference, _ = execute("mergefail", mergefail_config(organism), tmp_path / "ref")
    assert outcomes(reloaded) == outcomes(reference)
    assert reloaded.budget_logs == reference.budget_logs  # the training losses and budget use, step by step


def test_finetune_on_one_model_matches_deep_copies(organism, tmp_path, monkeypatch):
    cfg = finetune.Config(method="hiplora", task="max@3", model=organism, r=2, k=2, train=TINY, progress=False)
    new, _ = execute("finetune", cfg, tmp_path / "new")
    monkeypatch.setattr(finetune, "ModelSource", DeepCopySource)
    old, _ = execute("finetune", cfg, tmp_path / "old")
    assert (new.base_correct, new.correct, new.losses) == (old.base_correct, old.correct, old.losses)
    assert new.budget_counts == old.budget_counts
