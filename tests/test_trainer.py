"""transformers Trainer with defaults, SpectralTrainer checkpoints and resume, HiP-LoRA's penalty wherever the loss is
computed, and the budget hook on an accelerate-prepared optimiser (tiny tied-embedding Llama, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spectral_peft import get_peft_model, load_adapter
from spectral_peft.adapters import method_config
from spectral_peft.training.hooks import attach_budget_projection
from spectral_peft.budget import hip_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def tied_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def dataset(n: int = 8, extra: bool = False):
    from datasets import Dataset

    ids = torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(3)).tolist()
    cols = {"input_ids": ids, "attention_mask": [[1] * 10] * n, "labels": ids}
    if extra:
        cols["text"] = ["unused"] * n
    return Dataset.from_dict(cols)


def args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2, report_to=[],
                use_cpu=True, logging_steps=1, seed=0, save_strategy="no")
    return TrainingArguments(**{**base, **kw})


def test_trainer_defaults_keep_columns_and_log_eval_loss(tmp_path):
    from transformers import Trainer

    wrapped = get_peft_model(tied_model(), method_config("hiplora", k=4), progress=False)
    trainer = Trainer(model=wrapped, args=args(tmp_path, eval_strategy="steps", eval_steps=2),
                      train_dataset=dataset(extra=True), eval_dataset=dataset(4, extra=True))
    assert trainer.args.remove_unused_columns
    trainer.train()
    evals = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert len(evals) == 2 and all(torch.isfinite(torch.tensor(evals)))


def train_spectral(out, steps: int, resume: str | None = None, method: str = "hiplora"):
    from spectral_peft.integrations import SpectralTrainer

    wrapped = get_peft_model(tied_model(), method_config(method, k=4, budget_rho=0.01), progress=False)
    trainer = SpectralTrainer(model=wrapped, args=args(out, max_steps=steps, save_strategy="steps", save_steps=2),
                              train_dataset=dataset())
    trainer.train(resume_from_checkpoint=resume)
    return wrapped, trainer


def test_checkpoints_hold_the_adapter_and_reload(tmp_path, input_ids):
    wrapped, trainer = train_spectral(tmp_path / "a", 4)
    for step in (2, 4):
        files = {p.name for p in (tmp_path / "a" / f"checkpoint-{step}").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
        assert "model.safetensors" not in files
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    wrapped.eval()
    reloaded = load_adapter(tied_model(), tmp_path / "final", progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, wrapped(input_ids=input_ids).logits)
    assert max(wrapped.budget_use().values()) <= 1 + 1e-6  # the mixin added the budget projection


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    full, _ = train_spectral(tmp_path / "a", 4)
    resumed, trainer = train_spectral(tmp_path / "b", 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    a, b = full.adapter_state_dict(), resumed.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = get_peft_model(tied_model(), method_config("hiplora", k=4, budget_rho=0.01), progress=False)
    assert not all(torch.equal(a[k], v) for k, v in fresh.adapter_state_dict().items())


def phi_grads(model, batches, with_labels: bool) -> list[torch.Tensor]:
    model.train()
    model.zero_grad()
    for ids in batches:
        if with_labels:
            loss = model(input_ids=ids, labels=ids).loss
        else:  # a loss the model never sees (custom compute_loss, TRL's fused head, a plain loop)
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        (loss / len(batches)).backward()
    return [layer.hip_phi.grad.clone() for layer in hip_layers(model.spectral_layers().values())]


@pytest.mark.parametrize("with_labels", [True, False])
def test_penalty_gradient_counts_once_per_step_wherever_the_loss_is_computed(input_ids, with_labels):
    lam = 0.7
    wrapped = get_peft_model(tied_model(), method_config("hiplora", k=4, budget_mode="penalty", budget_lambda=lam),
                             progress=False)
    plain = get_peft_model(tied_model(), method_config("hiplora", k=4, budget_mode="penalty", budget_lambda=0.0),
                           progress=False)
    with torch.no_grad():
        for a, b in zip(hip_layers(wrapped.spectral_layers().values()), hip_layers(plain.spectral_layers().values())):
            a.hip_phi.fill_(0.2)
            b.hip_phi.fill_(0.2)
    batches = [input_ids[:1], input_ids[1:]]  # two accumulated micro-batches
    for model in (wrapped, copy.deepcopy(wrapped)):
        got = phi_grads(model, batches, with_labels)
        want = phi_grads(plain, batches, with_labels)
        for g, w, layer in zip(got, want, hip_layers(model.spectral_layers().values())):
            assert torch.allclose(g, w + 2 * lam * layer.budget_w * 0.2, rtol=1e-5, atol=1e-7)


def test_budget_hook_on_accelerate_prepared_optimizer(input_ids):
    from accelerate import Accelerator

    wrapped = get_peft_model(tied_model(), method_config("hiplora", k=4, budget_rho=0.01), progress=False)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=5e-2)
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(wrapped, opt)
    attach_budget_projection(opt, model)
    model.train()
    uses = []
    for _ in range(4):
        accelerator.backward(model(input_ids=input_ids, labels=input_ids).loss)
        opt.step()
        opt.zero_grad()
        uses.append(max(wrapped.budget_use().values()))
    assert max(uses) <= 1 + 1e-6 and max(uses) > 0.5
