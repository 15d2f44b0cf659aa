"""lm-evaluation-harness on adapters: the ``spectral-peft`` lm-eval model on a native adapter folder scores every item
as the library's adapted model does (and not as the base does); vanilla lm-eval ``hf`` with ``peft=`` on the folder's
``export_lora`` export gives the same scores; bad input fails with one line before any evaluation.

A tiny random organism-family Llama (one layer, with its tokenizer) and the 8-item multiple-choice task in
``fixtures/lm_eval`` (its data path is relative to the repository root, so the tests run lm-eval from there), CPU,
offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_organism

import spectral_peft.integrations  # noqa: F401 (the package must not import lm_eval)
from spectral_peft import export_lora, get_peft_model, load_adapter, method_config
from spectral_peft.errors import InputError, MissingInputError

# read before this module imports lm-eval (no other test module imports it)
IMPORTED_BY_SPECTRAL_PEFT = "lm_eval" in sys.modules
lm_eval = pytest.importorskip("lm_eval")
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from spectral_peft.integrations.lm_eval import SpectralLM, main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"
TASK = "spectral_tiny_mc"
TOL = 1e-5


def test_lm_eval_stays_an_optional_import():
    assert not IMPORTED_BY_SPECTRAL_PEFT, "importing spectral_peft (its integrations included) imported lm_eval"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``base`` (a checkpoint with tokenizer), ``native`` (a HiP-LoRA adapter on it with non-zero random tensors),
    ``export`` (that adapter as a PEFT LoRA) and ``other`` (the base with one adapted matrix nudged: same shapes,
    other weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("lm_eval")
    base = save_tiny_organism(tmp / "base")
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(base), method_config("hiplora", r=2, k=2),
                             progress=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    wrapped.save_pretrained(tmp / "native")
    export_lora(wrapped, tmp / "export")
    other = AutoModelForCausalLM.from_pretrained(base)
    name = next(iter(wrapped.spectral_layers()))
    with torch.no_grad():
        other.get_submodule(name).weight.add_(1e-3)
    other.save_pretrained(tmp / "other")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp / "other")
    return {"base": base, "native": str(tmp / "native"), "export": str(tmp / "export"), "other": str(tmp / "other")}


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def evaluate(model, **kwargs) -> list[dict]:
    """lm-eval's per-item samples of the tiny task, in item order."""
    task_manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    results = simple_evaluate(model=model, tasks=[TASK], task_manager=task_manager, log_samples=True, **kwargs)
    return sorted(results["samples"][TASK], key=lambda s: s["doc_id"])


def scores(samples: list[dict]) -> torch.Tensor:
    """``[items, choices]`` log-likelihoods lm-eval gave each choice (its samples files hold them as strings)."""
    return torch.tensor([[float(ll) for ll, _ in s["filtered_resps"]] for s in samples], dtype=torch.float64)


def direct_scores(model, tokenizer, samples: list[dict]) -> torch.Tensor:
    """The same log-likelihoods from ``model`` itself: the sum of ``log p(token | prefix)`` over the continuation's
    tokens, the continuation being what tokenizing context + continuation adds to the context's tokens."""
    out = []
    for sample in samples:
        row = []
        for context, continuation in sample["arguments"]:
            ctx, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
            assert whole[:len(ctx)] == ctx and len(whole) > len(ctx), "the fixture's choices must tokenize apart"
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].double().log_softmax(-1)
            row.append(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))).item())
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def native_samples(folders):
    """lm-eval's samples for the native folder through the Python API (``pretrained`` a folder path)."""
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)
    try:
        return evaluate(SpectralLM(pretrained=folders["base"], adapter=folders["native"], device="cpu", batch_size=8))
    finally:
        mp.undo()


def test_native_folder_scores_as_the_library_does(folders, native_samples):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["base"])
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(folders["base"]).eval(), folders["native"],
                           progress=False)
    got = scores(native_samples)
    assert got.shape == (8, 3)
    torch.testing.assert_close(got, direct_scores(adapted, tokenizer, native_samples), atol=TOL, rtol=0)
    with adapted.disable_adapter():
        base = direct_scores(adapted, tokenizer, native_samples)
    assert (got - base).abs().max() > 1e-2, "lm-eval scored the base model: the adapter was not applied"


def test_loaded_model_and_recorded_adapter(folders, native_samples, at_root):
    """``pretrained`` may be a loaded model (the adapter is loaded onto it); the results record the adapter."""
    from transformers import AutoModelForCausalLM

    lm = SpectralLM(pretrained=AutoModelForCausalLM.from_pretrained(folders["base"]), adapter=folders["native"],
                    batch_size=8)
    torch.testing.assert_close(scores(evaluate(lm)), scores(native_samples), atol=TOL, rtol=0)
    info = lm.get_model_info()
    assert info["adapter"] == folders["native"] and info["adapter_type"] == "hiplora"


@pytest.mark.parametrize("model, key", [("hf", "peft"), ("spectral-peft", "adapter")])
def test_export_equals_native(folders, native_samples, at_root, model, key):
    """The export through vanilla lm-eval (``hf`` with ``peft=``) and through ``spectral-peft`` (a PEFT folder)."""
    samples = evaluate(model, model_args=f"pretrained={folders['base']},{key}={folders['export']}", device="cpu",
                       batch_size=8)
    assert [s["arguments"] for s in samples] == [s["arguments"] for s in native_samples]
    torch.testing.assert_close(scores(samples), scores(native_samples), atol=TOL, rtol=0)


@pytest.mark.parametrize("as_module", [False, True])
def test_folder_for_another_base_is_refused_in_one_line(folders, as_module):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(folders["other"]) if as_module else folders["other"]
    with pytest.raises(InputError, match="hash mismatch") as err:
        SpectralLM(pretrained=other, adapter=folders["native"], device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"adapter": "missing"}, MissingInputError, "not an adapter directory"),
    ({}, InputError, "needs adapter=DIR"),
    ({"adapter": "native", "peft": "export"}, InputError, "not peft="),
])
def test_bad_arguments_fail_before_the_base_is_loaded(folders, tmp_path, kwargs, error, words):
    """The base named does not exist: each error must come from the adapter's arguments, checked first."""
    kwargs = {k: folders.get(v, str(tmp_path / v)) for k, v in kwargs.items()}
    with pytest.raises(error, match=words) as err:
        SpectralLM(pretrained=str(tmp_path / "no-base"), **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_command_line_native_folder(folders, native_samples, at_root, tmp_path):
    """``python -m spectral_peft.integrations.lm_eval`` arguments, in process (~15 s on 2 busy cores: lm-eval's
    command line indexes its thousands of built-in tasks on every run)."""
    args = ["--model", "spectral-peft", "--model_args", f"pretrained={folders['base']},adapter={folders['native']}",
            "--tasks", TASK, "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "8",
            "--output_path", str(tmp_path / "out"), "--log_samples"]
    assert main(args) == 0
    [written] = (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")
    samples = sorted((json.loads(line) for line in written.read_text().splitlines()), key=lambda s: s["doc_id"])
    torch.testing.assert_close(scores(samples), scores(native_samples), atol=TOL, rtol=0)


@pytest.mark.slow
def test_command_line_another_base_exits_with_one_line(folders, at_root, tmp_path, capsys):
    """A folder for another base: status 2, one line on stderr, no results written (~15 s, as above)."""
    args = ["--model", "spectral-peft", "--model_args", f"pretrained={folders['other']},adapter={folders['native']}",
            "--tasks", TASK, "--include_path", str(TASKS), "--device", "cpu", "--output_path", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "hash mismatch" in err[-1]
    assert not (tmp_path / "out").exists()
