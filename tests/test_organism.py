"""The organism: tokenizer round trip, pretraining determinism and resume, the shipped checkpoint and its quality."""

import itertools
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from spectral_peft.data import SKILLS, World, documents, get_task
from spectral_peft.evaluation import recall, skill_accuracy
from spectral_peft.organism import CHECKPOINT_DIR, PretrainConfig, build_tokenizer, load, pretrain

SAMPLES = ["Math: Start with 31. Subtract 3.\nSolution: 31-3=28. #### 28\n", "  odd   spacing\n\n\tand tabs ",
           "Ünïcödé ✓ 中文 and emoji 🙂", "Q: Where does Zorvath Quellin live?\nA: Velmora\n", ""]


@pytest.fixture(scope="module")
def organism():
    torch.set_num_threads(2)
    return load()


@pytest.mark.parametrize("text", SAMPLES)
def test_shipped_tokenizer_round_trips(text):
    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR, local_files_only=True)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.eos_token_id not in ids


def test_tokenizer_splits_digits_and_round_trips_the_corpus():
    docs = list(itertools.islice(documents(seed=2), 200))
    tok = build_tokenizer(docs, vocab_size=500)
    assert all(tok.decode(tok(d)["input_ids"]) == d for d in docs)
    pieces = tok.convert_ids_to_tokens(tok("12345")["input_ids"])
    assert pieces == ["1", "2", "3", "4", "5"]


def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path):
    cfg = PretrainConfig(steps=4, batch_size=2, block_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, vocab_size=300, tokenizer_docs=200, save_every=100, warmup=2)
    model_a, _ = pretrain(tmp_path / "a", cfg, run_dir=tmp_path / "run_a", progress=False)
    assert pretrain(tmp_path / "b", cfg, run_dir=tmp_path / "run_b", progress=False, stop_after=2) is None
    assert not (tmp_path / "b" / "model.safetensors").exists()
    model_b, tok_b = pretrain(tmp_path / "b", cfg, run_dir=tmp_path / "run_b", progress=False)
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name
    reloaded, tok = load(tmp_path / "b")
    assert torch.equal(reloaded.model.embed_tokens.weight, model_b.model.embed_tokens.weight)
    assert tok.decode(tok(SAMPLES[0])["input_ids"]) == SAMPLES[0]
    with pytest.raises(ValueError):
        pretrain(tmp_path / "c", PretrainConfig(**{**cfg.__dict__, "lr": 1.0}), run_dir=tmp_path / "run_b", progress=False)


def test_shipped_checkpoint_is_a_small_swiglu_llama(organism):
    model, tok = organism
    assert isinstance(model, LlamaForCausalLM) and model.config.hidden_act == "silu"
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 10_000_000
    assert (CHECKPOINT_DIR / "model.safetensors").stat().st_size <= 30 * 2**20
    assert (CHECKPOINT_DIR / "tokenizer.json").exists() and len(tok) == model.config.vocab_size


def test_shipped_checkpoint_reaches_its_recorded_quality(organism):
    """The first 100 test problems per skill, and 100 known / 100 held-out facts, against quality.json."""
    model, tok = organism
    recorded = json.loads((CHECKPOINT_DIR / "quality.json").read_text())
    for skill in SKILLS:
        acc = skill_accuracy(model, tok, skill, get_task(skill).examples("test", n=100), progress=False).accuracy
        assert abs(acc - recorded["skills_first100"][skill]) <= 0.05, skill
        assert 0.2 <= acc <= 0.8, skill
    world = World()
    assert recall(model, tok, world.known_facts[:100], progress=False).accuracy >= recorded["known_recall"] - 0.1
    assert recall(model, tok, world.heldout_facts[:100], progress=False).accuracy <= 0.08
