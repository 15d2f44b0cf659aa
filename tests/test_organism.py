"""The organism: tokenizer round trip, pretraining determinism and resume (no pickle), installing a checkpoint,
the shipped checkpoint and its quality."""

import dataclasses
import functools
import hashlib
import itertools
import json

import pytest
import torch
from helpers import save_tiny_organism
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM

import spectral_peft.organism as organism_pkg
from spectral_peft.cli import main
from spectral_peft.data import SKILLS, World, documents, get_task
from spectral_peft.errors import InputError, MissingInputError, OutputExistsError
from spectral_peft.evaluation import recall, skill_accuracy
from spectral_peft.organism import (
    CHECKPOINT_DIR,
    PretrainConfig,
    build_tokenizer,
    check_checkpoint,
    install,
    load,
    pretrain,
)

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


TINY = {"batch_size": 2, "block_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
        "vocab_size": 300, "tokenizer_docs": 200, "save_every": 100, "warmup": 2}


def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path):
    cfg = PretrainConfig(steps=4, **TINY)
    model_a, _ = pretrain(tmp_path / "a", cfg, progress=False)
    assert pretrain(tmp_path / "b", cfg, progress=False, stop_after=2) is None
    assert not (tmp_path / "b" / "checkpoint").exists()
    with safe_open(tmp_path / "b" / "state.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        assert meta["step"] == 2 and meta["data_position"] == 2 * cfg.batch_size
        assert f.get_tensor("rng.torch").dtype == torch.uint8
    model_b, _ = pretrain(tmp_path / "b", cfg, progress=False)
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint", "state.safetensors"]
    reloaded, tok = load(tmp_path / "b" / "checkpoint")
    assert torch.equal(reloaded.model.embed_tokens.weight, model_b.model.embed_tokens.weight)
    assert tok.decode(tok(SAMPLES[0])["input_ids"]) == SAMPLES[0]
    with pytest.raises(InputError, match="another config"):
        pretrain(tmp_path / "b", PretrainConfig(**{**cfg.__dict__, "lr": 1.0}), progress=False)


def test_a_damaged_state_is_refused_in_one_line(tmp_path):
    cfg = PretrainConfig(steps=2, **TINY)
    assert pretrain(tmp_path / "run", cfg, progress=False, stop_after=1) is None
    state = tmp_path / "run" / "state.safetensors"
    tensors = load_file(state)
    with safe_open(state, framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    save_file(tensors, state, metadata={"state": json.dumps({**meta, "data_position": 5})})
    with pytest.raises(InputError, match="inconsistent step"):
        pretrain(tmp_path / "run", cfg, progress=False)
    del tensors["rng.torch"]
    save_file(tensors, state, metadata={"state": json.dumps(meta)})
    with pytest.raises(InputError, match="not a readable pretraining state"):
        pretrain(tmp_path / "run", cfg, progress=False)
    state.write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(InputError, match="not a readable pretraining state") as err:
        pretrain(tmp_path / "run", cfg, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change", [{"steps": 0}, {"steps": -5}, {"threads": -1}, {"threads": 0}, {"lr": float("nan")},
                                    {"lr": 0.0}, {"batch_size": 0}, {"block_size": 1024}, {"min_lr_ratio": 1.5},
                                    {"hidden_size": 30, "num_heads": 4}, {"vocab_size": 100}, {"steps": 2.5},
                                    {"save_every": 0}, {"seed": -1}])
def test_pretrain_config_rejects_values_that_cannot_train(change):
    with pytest.raises(InputError) as err:
        dataclasses.replace(PretrainConfig(), **change).validate()
    assert "\n" not in str(err.value) and next(iter(change)) in str(err.value)


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-5"], ["--threads", "-1"],
                                  ["--overwrite", "--resume"], ["--out", str(CHECKPOINT_DIR)],
                                  ["--out", str(CHECKPOINT_DIR / "run")]])
def test_pretrain_organism_bad_input_is_one_line_exit_2(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _digest(CHECKPOINT_DIR)
    assert main(["pretrain-organism", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [] and _digest(CHECKPOINT_DIR) == before


def test_pretrain_organism_writes_its_run_directory_and_resumes(tmp_path, capsys, monkeypatch):
    """The command writes OUT (manifest, state, checkpoint) and never the package; an existing run needs --resume."""
    monkeypatch.setattr(organism_pkg, "PretrainConfig", functools.partial(PretrainConfig, **TINY))
    before = _digest(CHECKPOINT_DIR)
    out = tmp_path / "organism"
    assert main(["pretrain-organism", "--out", str(out), "--steps", "3"]) == 0
    assert {"run.json", "config.yaml", "state.safetensors", "checkpoint"} <= {p.name for p in out.iterdir()}
    first = load_file(out / "checkpoint" / "model.safetensors")
    assert main(["pretrain-organism", "--out", str(out), "--steps", "3"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["pretrain-organism", "--out", str(out), "--steps", "3", "--resume"]) == 0
    again = load_file(out / "checkpoint" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert _digest(CHECKPOINT_DIR) == before
    assert not list(tmp_path.glob(".*"))


@pytest.fixture
def checkpoints(tmp_path):
    """`new`: a valid tiny checkpoint; `target`: an installed one (another model, with a quality.json)."""
    new = save_tiny_organism(tmp_path / "new")
    target = save_tiny_organism(tmp_path / "target", num_layers=2)
    (tmp_path / "target" / "quality.json").write_text("{}")
    return tmp_path / new, tmp_path / target


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
def test_install_validates_then_swaps_the_checkpoint_in(checkpoints, swap, monkeypatch):
    new, target = checkpoints
    if swap == "fallback":
        monkeypatch.setattr(organism_pkg, "_exchange", lambda a, b: False)
    before = _digest(target)
    with pytest.raises(OutputExistsError, match="--force"):
        install(new, target)
    assert _digest(target) == before
    assert install(new, target, force=True) == target
    assert _digest(target) == _digest(new)
    assert sorted(p.name for p in target.parent.iterdir()) == ["new", "target"]
    assert load(target)[0].config.num_hidden_layers == 1


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    if not organism_pkg._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert (tmp_path / "b" / "x").read_text() == "a" and not list((tmp_path / "a").iterdir())


def test_install_refuses_broken_checkpoints_and_leaves_the_target(checkpoints, tmp_path):
    new, target = checkpoints
    before = _digest(target)
    weights = load_file(new / "model.safetensors")
    name = next(iter(weights))
    weights[name][0, 0] = float("nan")
    save_file(weights, new / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="non-finite weights"):
        install(new, target, force=True)
    del weights[name]
    save_file(weights, new / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="do not match the config"):
        install(new, target, force=True)
    (new / "model.safetensors").unlink()
    with pytest.raises(InputError, match="does not load as a causal LM"):
        install(new, target, force=True)
    with pytest.raises(MissingInputError):
        install(tmp_path / "absent", target, force=True)
    with pytest.raises(InputError, match="installed checkpoint itself"):
        install(target, target, force=True)
    assert _digest(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["new", "target"]


def test_install_organism_cli_never_replaces_without_force(checkpoints, capsys):
    new, _ = checkpoints
    before = _digest(CHECKPOINT_DIR)
    check_checkpoint(CHECKPOINT_DIR)
    assert main(["install-organism", "--checkpoint", str(new)]) == 2
    assert main(["install-organism", "--checkpoint", str(new.parent / "absent"), "--force"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line and line]
    assert len(err) == 2 and "--force" in err[0] and "absent" in err[1], err
    assert _digest(CHECKPOINT_DIR) == before
    assert not list(CHECKPOINT_DIR.parent.glob(".toy*"))


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
        assert acc < 0.8, skill
    world = World()
    assert recall(model, tok, world.known_facts[:100], progress=False).accuracy >= recorded["known_recall"] - 0.1
    assert recall(model, tok, world.heldout_facts[:100], progress=False).accuracy <= 0.08


def test_shipped_math_is_latent_greedy_skips_the_working_that_would_solve_it(organism):
    """The improvable skill (docs/organism.md): greedy decoding answers at once and mostly fails, while the same
    model, started on its worked style, solves most of the same problems; the first-token odds follow the corpus's
    60/40 mix of the two styles."""
    model, tok = organism
    problems = get_task("math").examples("test", n=60, difficulty=2)
    greedy = skill_accuracy(model, tok, "math", problems, progress=False)
    worked = [dataclasses.replace(e, prompt=e.prompt + " ") for e in problems]
    assert greedy.accuracy < 0.25 < 0.6 < skill_accuracy(model, tok, "math", worked, progress=False).accuracy
    with torch.no_grad():
        p = model(**tok(problems[0].prompt, return_tensors="pt")).logits[0, -1].softmax(-1)
    shortcut, working = (tok.convert_tokens_to_ids(tok.tokenize(text))[0] for text in (" ####", " "))
    assert 0.5 < p[shortcut] < 0.7 and 0.3 < p[working] < 0.5
