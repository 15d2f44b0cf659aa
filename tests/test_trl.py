"""TRL's SFTTrainer with a pre-wrapped spectral model: it trains, checkpoints the adapter, and HiP-LoRA's penalty
counts although TRL computes the loss itself (its fused LM head calls the backbone, ``model.base_model``)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spectral_peft import get_peft_model
from spectral_peft.adapters import method_config
from spectral_peft.budget import hip_layers

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("one_thread")


def tied_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1))


def tokenizer():
    import itertools

    from spectral_peft.data import documents
    from spectral_peft.organism import build_tokenizer

    return build_tokenizer(itertools.islice(documents(seed=1), 100), vocab_size=64)


def sft(out, lam: float):
    from datasets import Dataset

    from spectral_peft.integrations import SpectralTrainerMixin

    class SpectralSFTTrainer(SpectralTrainerMixin, trl.SFTTrainer):
        pass

    ids = torch.randint(2, 64, (8, 10), generator=torch.Generator().manual_seed(3)).tolist()
    config = method_config("hiplora", k=4, budget_mode="penalty", budget_lambda=lam)
    wrapped = get_peft_model(tied_model(), config, progress=False)
    args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=5e-2,
                         report_to=[], use_cpu=True, save_strategy="steps", save_steps=4, seed=0, logging_steps=1)
    trainer = SpectralSFTTrainer(model=wrapped, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                                 processing_class=tokenizer())
    trainer.train()
    return wrapped


def test_sft_trainer_trains_a_wrapped_model_and_keeps_the_penalty(tmp_path):
    free = sft(tmp_path / "free", 0.0)
    held = sft(tmp_path / "held", 1e3)
    files = {p.name for p in (tmp_path / "held" / "checkpoint-4").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    norm = lambda m: sum(float(layer.hip_phi.norm()) for layer in hip_layers(m.spectral_layers().values()))  # noqa: E731
    assert norm(free) > 0 and norm(held) < 0.5 * norm(free)
