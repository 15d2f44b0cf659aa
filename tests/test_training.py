"""The training loop and objectives: masked SFT loss, loss decrease, determinism, best-state keeping, schedules,
HiP-LoRA budget projection inside the loop, and REINFORCE."""


import pytest
import torch

from spectral_peft import get_peft_model, method_config
from spectral_peft.data import Example
from spectral_peft.organism import tiny_random_model
from spectral_peft.training import (ReinforceObjective, SFTObjective, TrainConfig, collate_pairs, encode_pair, lr_factor,
                                    masked_nll, train)

from helpers import PAIRS, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return tiny_random_model(tok, seed=seed, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


def test_encode_pair_masks_prompt_and_keeps_target(tok):
    ids, labels = encode_pair(tok, *PAIRS[0])
    n_prompt = len(tok(PAIRS[0][0])["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == tok(PAIRS[0][1], add_special_tokens=False)["input_ids"]
    ids_t, labels_t = encode_pair(tok, *PAIRS[0], max_length=4)
    assert len(ids_t) == 4 and labels_t == labels[-4:]  # truncation keeps the target's end


def test_collate_pads_right_and_masks_padding(tok):
    b = collate_pairs(tok, PAIRS)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    pad = b["attention_mask"] == 0
    assert pad.any() and (b["labels"][pad] == -100).all() and (b["input_ids"][pad] == tok.pad_token_id).all()


def test_masked_loss_ignores_prompt_tokens(tok):
    b = collate_pairs(tok, PAIRS)
    torch.manual_seed(0)
    logits = torch.randn(*b["input_ids"].shape, len(tok))
    loss = masked_nll(logits, b["labels"])
    # logits at positions whose next token is unlabelled (prompt or padding) do not matter
    free = torch.zeros_like(b["labels"], dtype=torch.bool)
    free[:, :-1] = b["labels"][:, 1:] == -100
    changed = logits.clone()
    changed[free] += 50 * torch.randn_like(changed[free])
    assert torch.allclose(masked_nll(changed, b["labels"]), loss)
    # and it is the mean cross-entropy of the target tokens
    lp = torch.log_softmax(logits[:, :-1], -1)
    lab = b["labels"][:, 1:]
    keep = lab != -100
    manual = -lp[keep].gather(-1, lab[keep][:, None]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    # a logit change at a labelled position does change it
    changed = logits.clone()
    changed[~free] += 50 * torch.randn_like(changed[~free])
    assert not torch.allclose(masked_nll(changed, b["labels"]), loss)


def test_sft_loss_goes_down_and_is_deterministic(tok):
    runs = []
    for _ in range(2):
        model = get_peft_model(tiny(tok), method_config("lora", r=4, target_modules="all-linear"))
        res = train(model, PAIRS * 4, SFTObjective(tok), TrainConfig(epochs=12, batch_size=4, lr=5e-2, progress=False))
        runs.append(res.losses)
        # a random tiny model has near-uniform logits (tied 0.02-scale embeddings): a 0.1-nat drop is a real signal
        assert sum(res.losses[-4:]) / 4 < sum(res.losses[:4]) / 4 - 0.1
        assert not model.training
    assert runs[0] == runs[1]


def test_spectral_model_trains_and_only_adapter_changes(tok):
    model = get_peft_model(tiny(tok), method_config("svf"), progress=False)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    res = train(model, PAIRS * 4, SFTObjective(tok), TrainConfig(epochs=6, batch_size=4, lr=0.3, progress=False))
    assert sum(res.losses[-4:]) < sum(res.losses[:4])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(layer.svf_param.abs().sum() > 0 for layer in model.spectral_layers().values())


def test_best_state_is_restored(tok):
    model = get_peft_model(tiny(tok), method_config("svf"), progress=False)
    snaps, scores = {}, iter([0.2, 0.9, 0.1, 0.3])

    def validate(m):
        step = len(snaps) * 2 + 2
        snaps[step] = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        return {"score": next(scores), "accuracy": 0.0}

    res = train(model, PAIRS * 2, SFTObjective(tok),
                TrainConfig(epochs=2, batch_size=2, lr=5e-2, eval_every=2, progress=False), validate=validate)
    assert res.steps == 8 and [v["step"] for v in res.validation] == [2, 4, 6, 8]
    assert res.best_step == 4 and res.best_score == 0.9
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, snaps[4][n])
    assert any(not torch.equal(snaps[4][n], snaps[8][n]) for n in trained)


def test_lr_schedules():
    cfg = TrainConfig(schedule="linear", warmup_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1) and lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(99, 100, cfg) < 0.02
    cos = TrainConfig(schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 10, cos) == pytest.approx(1.0) and lr_factor(10, 10, cos) == pytest.approx(0.1)
    assert lr_factor(50, 100, TrainConfig(schedule="constant")) == 1.0
    with pytest.raises(ValueError):
        TrainConfig(schedule="step")


def test_hiplora_budget_is_projected_every_step(tok):
    model = get_peft_model(tiny(tok), method_config("hiplora", r=2, k=4, budget_rho=0.01), progress=False)
    train(model, PAIRS * 4, SFTObjective(tok), TrainConfig(epochs=4, batch_size=4, lr=0.5, progress=False))
    use = model.budget_use()
    assert use and max(use.values()) <= 1 + 1e-4
    assert max(use.values()) > 0.5  # the budget binds at this learning rate


class AlwaysRight:
    name = "stub"

    def check(self, output, example):
        return True


def test_reinforce_rewards_and_raises_rollout_likelihood(tok):
    model = get_peft_model(tiny(tok), method_config("svf"), progress=False)
    examples = [Example(prompt=p, target=t, answer=t.strip()) for p, t in PAIRS]
    obj = ReinforceObjective(tok, AlwaysRight(), max_new_tokens=6, kl_coef=0.1)
    outputs, rewards = obj.rollouts(model, examples)
    assert rewards.tolist() == [1.0] * len(examples)
    pairs = [(e.prompt, o + "\n") for e, o in zip(examples, outputs)]

    def rollout_nll():
        b = collate_pairs(tok, pairs)
        with torch.no_grad():
            return masked_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    before = rollout_nll()
    res = train(model, examples, obj, TrainConfig(epochs=3, batch_size=4, lr=2e-2, progress=False))
    assert all(log["reward"] == 1.0 and "kl" in log for log in res.logs)
    assert rollout_nll() < before
