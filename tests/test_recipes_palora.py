"""The PALoRA recipes (svf, inject, eval, demo, palora-study) and their components, on the tiny random organism and,
where a planted effect needs a model that knows things, on the shipped organism with an identity expert (z = 1)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import save_tiny_organism

from spectral_peft import get_peft_model, method_config
from spectral_peft.adapters.matrices import matrix_weights
from spectral_peft.cli import main
from spectral_peft.data import World, as_qa
from spectral_peft.evaluation.injection import EvalSettings, InjectionOutcome, metric_items, summarise
from spectral_peft.evaluation.knowledge_split import SplitSettings
from spectral_peft.training.injection import InjectSettings
from spectral_peft.loading import ModelSource
from spectral_peft.model import load_adapter
from spectral_peft.probe import Probe, load_probe
from spectral_peft.recipes import execute, recipe
from spectral_peft.spectral import svd_full
from spectral_peft.training.svf_expert import SVFSettings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SVF = SVFSettings(n_train=16, n_val=4, eval_every=1, max_new_tokens=24)
TINY_SPLIT = SplitSettings(n_known=6, n_windows=2, n_samples=1)
TINY_EVAL = EvalSettings(n_skill=3, n_ppl=4, max_new_tokens=24)
TINY_FLAGS = ["--r", "4", "--n-facts", "4", "--split.n-known", "6", "--split.n-windows", "2", "--split.n-samples", "1",
              "--train.epochs", "2", "--eval.n-skill", "3", "--eval.n-ppl", "4", "--eval.max-new-tokens", "24",
              "--threads", "1", "--progress", "false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random organism saved as a checkpoint (hidden 32, MLP 64, one layer: three 64 x 32 MLP matrices)."""
    return save_tiny_organism(tmp_path_factory.mktemp("tiny-organism"))


@pytest.fixture(scope="module")
def svf_run(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("svf") / "run"
    cfg = recipe("svf").Config(model=checkpoint, train=TINY_SVF, threads=1, progress=False)
    result, _ = execute("svf", cfg, out)
    return out, result


def inject_cfg(checkpoint, probe, method="palora", **kw):
    base = dict(method=method, probe=str(probe), model=checkpoint, r=4, n_facts=4, split=TINY_SPLIT,
                train=InjectSettings(epochs=3, lr=3e-2, batch_size=4), eval=TINY_EVAL, threads=1, progress=False)
    return recipe("inject").Config(**{**base, **kw})


def factors(layer, svd) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW_k, U_S)`` of a PALoRA layer: its knowledge update and the protected left singular vectors of its base
    matrix (``svd``, computed afresh: the layer keeps only its own copy of ``U_S``)."""
    B, A = layer.lora.factors()
    return (B @ A).detach(), svd.U[:, layer.protected_index]


# --- svf -------------------------------------------------------------------------------------------------------

def test_svf_probe_is_the_kept_expert(svf_run, checkpoint):
    out, result = svf_run
    m = json.loads((out / "metrics.json").read_text())
    n_z = 7 * 32  # every linear matrix of the one layer (the default targets), min(m, n) = 32 scales each
    assert m["n_z"] == n_z and m["parameter_overhead"] == pytest.approx(n_z / m["n_base_parameters"])
    assert len(m["items"]["val_correct"]) == 4 and m["expert_val_accuracy"] == sum(m["items"]["val_correct"]) / 4
    for f in ("probe/probe.safetensors", "adapter/adapter_config.json", "report.md", "figures/probe_spectrum.png",
              "figures/svf_training.png"):
        assert (out / f).exists(), f
    probe = load_probe(out)  # an svf run directory works as a probe path
    adapter = load_adapter(ModelSource(checkpoint).fresh(), out / "adapter", progress=False)
    for name, layer in adapter.spectral_layers().items():
        assert torch.equal(layer.scale().detach(), probe.scales[name])  # the probe is the saved (kept) state
    assert any((z - 1).abs().max() > 0 for z in probe.scales.values())  # training moved the scales


# --- inject and eval ---------------------------------------------------------------------------------------------

def test_cli_chain_svf_inject_eval_reproduces_from_another_directory(checkpoint, tmp_path, monkeypatch, capsys):
    svf, run, again = tmp_path / "svf", tmp_path / "inject", tmp_path / "eval"
    assert main(["svf", "--model", checkpoint, "--out", str(svf), "--train.n-train", "16", "--train.n-val", "4",
                 "--train.eval-every", "1", "--train.max-new-tokens", "24", "--threads", "1",
                 "--progress", "false"]) == 0
    assert main(["inject", "--method", "palora", "--probe", str(svf / "probe"), "--model", checkpoint, "--out",
                 str(run), *TINY_FLAGS]) == 0
    assert "palora: recall" in capsys.readouterr().out
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["probe"] == str((svf / "probe").absolute()) and saved["trainable_parameters"] == 4 * (4 * 64 + 3 * 96)
    # r = 4 on every linear matrix of the one layer: q, k, v, o (32 x 32) and gate, up, down (32 x 64)
    assert len(saved["items"]["injected"]["recall"]) == 4 and len(json.loads((run / "facts.json").read_text())
                                                                  ["inject"]) == 4
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--run-dir", str(run), "--out", str(again), "--threads", "1", "--progress", "false"]) == 0
    out = capsys.readouterr().out
    assert "palora reloaded" in out and "| palora |" in out
    now = json.loads((again / "metrics.json").read_text())
    untimed = lambda items: {k: {**v, "seconds": 0} for k, v in items.items()}  # noqa: E731
    assert untimed(now["items"]) == untimed(saved["items"])  # every per-item outcome, document NLLs included
    assert now["injected"]["recall"] == saved["injected"]["recall"]


def test_protected_sets_and_placement_of_the_palora_ablations(checkpoint, svf_run, tmp_path):
    out, _ = svf_run
    probe = load_probe(out)
    layers = {}
    for method in ("palora", "palora:place=inside", "palora:protect=sigma"):
        run = tmp_path / method.replace(":", "-").replace("=", "-")
        execute("inject", inject_cfg(checkpoint, out, method), run)
        model = load_adapter(ModelSource(checkpoint).fresh(), run / "adapter", progress=False)
        layers[method] = model.spectral_layers()
    k = math.ceil(0.1 * 32)
    svds = {n: svd_full(W) for n, W in matrix_weights(ModelSource(checkpoint).fresh(), list(probe.scales)).items()}
    for name, layer in layers["palora"].items():
        assert torch.equal(layer.protected_index, probe.select(name, "top_fraction", rho=0.1))
        dW, U_S = factors(layer, svds[name])
        assert dW.abs().max() > 1e-3  # it trained
        assert (U_S.T @ dW).abs().max() < 1e-5  # nothing inside span(U_S)
    for name, layer in layers["palora:place=inside"].items():
        dW, U_S = factors(layer, svds[name])
        assert dW.abs().max() > 1e-3
        assert (dW - U_S @ (U_S.T @ dW)).abs().max() < 1e-5  # nothing orthogonal to span(U_S)
    for name, layer in layers["palora:protect=sigma"].items():
        assert layer.protected_index.tolist() == list(range(k))  # the top-|S| by sigma (svd_full sorts them)
        dW, U_S = factors(layer, svds[name])
        assert (U_S.T @ dW).abs().max() < 1e-5


@pytest.fixture(scope="module")
def organism_probe(tmp_path_factory):
    """An identity expert (z = 1) on the shipped organism: the expert is the organism itself."""
    path = tmp_path_factory.mktemp("identity-probe")
    model = get_peft_model(ModelSource().fresh(), method_config("svf"), progress=False)
    Probe.from_model(model, meta={"skill": "math"}).save(path)
    return path


@pytest.fixture(scope="module")
def known_and_unknown_facts(tmp_path_factory):
    """A QA JSONL of 6 facts the organism learned in pretraining and 6 it never saw."""
    world = World()
    facts = world.known_facts[:6] + world.heldout_facts[:6]
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    rows = [{"id": f.id, "question": q.question, "answers": [q.answer], "aliases": list(q.aliases),
             "paraphrases": list(q.paraphrases)} for f, q in ((f, as_qa(f)) for f in facts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {f.id for f in world.known_facts[:6]}, {f.id for f in world.heldout_facts[:6]}


@pytest.fixture(scope="module")
def frozen_injection(organism_probe, known_and_unknown_facts, tmp_path_factory):
    """LoRA at lr 1e-12 on the organism (nothing moves), facts from the JSONL."""
    path, _, _ = known_and_unknown_facts
    cfg = recipe("inject").Config(method="lora", probe=str(organism_probe), facts=str(path), n_facts=4,
                                  split=SplitSettings(n_windows=3, n_samples=2),
                                  train=InjectSettings(epochs=1, lr=1e-12), eval=EvalSettings(n_skill=8, n_ppl=2),
                                  threads=1, progress=False)
    out = tmp_path_factory.mktemp("frozen") / "run"
    result, _ = execute("inject", cfg, out)
    return out, result


def test_known_facts_of_a_jsonl_are_highly_known_and_not_injected(frozen_injection, known_and_unknown_facts):
    out, result = frozen_injection
    _, known, unknown = known_and_unknown_facts
    facts = json.loads((out / "facts.json").read_text())
    assert {f["id"] for f in facts["retain"]} == known  # every known fact is HighlyKnown, held out for retention
    assert {f["id"] for f in facts["inject"]} <= unknown and len(facts["inject"]) == 4
    probed = facts["counts"]["probed"]  # the known facts are HighlyKnown; the held-out ones mostly Unknown
    assert probed["HighlyKnown"] == 6 and sum(probed.values()) == 12 and probed.get("Unknown", 0) >= 4


def test_an_injection_that_moves_nothing_retains_everything(frozen_injection):
    out, result = frozen_injection
    e, i = result.expert, result.injected
    assert sum(e.highly_known) > 0 and all(sum(v) > 0 for v in e.skills.values())  # the ratios are defined
    assert (i.recall, i.highly_known, i.skills) == (e.recall, e.highly_known, e.skills)
    m = json.loads((out / "metrics.json").read_text())["injected"]
    assert m["highly_known_retention"] == 1.0 and m["mean_skill_retention"] == 1.0
    assert m["skill_retention"] == {"math": 1.0, "code": 1.0, "science": 1.0}
    assert abs(m["nll_increase"]) < 1e-6


# --- statistics of the suite ---------------------------------------------------------------------------------------

def outcome(recall, skill, hk=(1.0, 1.0), nll=(2.0, 4.0)):
    return InjectionOutcome(list(recall), list(recall), list(hk), {"a": list(skill), "b": list(skill[:2])},
                            list(nll), [2, 2])


def test_metric_items_average_to_the_metrics():
    ref = outcome([0, 0, 0, 0], [1, 1, 0, 0], nll=(1.0, 1.0))
    m = outcome([1, 1, 0, 1], [1, 0, 0, 0], hk=(1.0, 0.0))
    items = metric_items(m, ref)
    assert items["recall"].mean() == 0.75 and items["highly_known_retention"].mean() == 0.5
    assert items["retention:a"].mean() == pytest.approx(0.25 / 0.5)
    assert items["retention:b"].mean() == pytest.approx(0.5 / 1.0)
    assert items["mean_skill_retention"].mean() == pytest.approx((0.5 + 0.5) / 2)  # skills of 4 and 2 items
    assert items["nll_increase"].mean() == pytest.approx((1.0 + 3.0) / 4)  # nats per token over 4 tokens


def test_summarise_pairs_seeds_and_items_against_the_baseline():
    seeds = [{"ref": outcome([0, 0, 0, 0], [1, 1, 0, 0]), "lora": outcome([1, 0, 1, 0], [1, 0, 0, 0]),
              "m": outcome([1, 1, 1, 0], [1, 1, 0, 0])},
             {"ref": outcome([0, 0, 0, 0], [1, 0, 1, 0]), "lora": outcome([0, 0, 1, 0], [0, 0, 1, 0]),
              "m": outcome([1, 1, 1, 1], [1, 0, 1, 0])}]
    s = summarise(seeds, "ref", baseline="lora", n_resamples=500)
    recall = s["m"]["metrics"]["recall"]
    assert recall["method"] == "hierarchical-bootstrap" and recall["estimate"] == 7 / 8
    diff = s["m"]["vs_baseline"]["recall"]
    assert diff["estimate"] == pytest.approx(7 / 8 - 3 / 8) and diff["low"] <= diff["estimate"] <= diff["high"]
    assert "recall" not in s["lora"]["vs_baseline"] and s["m"]["n_items"]["recall"] == 4
    one = summarise(seeds[:1], "ref", baseline="lora")
    assert one["m"]["metrics"]["recall"]["method"] == "wilson"


# --- demo and palora-study -----------------------------------------------------------------------------------------

def tiny(checkpoint, **kw):
    return dict(model=checkpoint, r=4, n_facts=4, svf=TINY_SVF, split=TINY_SPLIT, train=InjectSettings(epochs=2),
                eval=TINY_EVAL, threads=1, progress=False, **kw)


def test_demo_writes_its_report_and_is_deterministic(checkpoint, tmp_path):
    cfg = recipe("demo").Config(methods="lora,palora", **tiny(checkpoint))
    a, summary = execute("demo", cfg, tmp_path / "demo")
    b, _ = execute("demo", cfg, tmp_path / "demo", mode="overwrite")
    assert "| palora |" in summary and "| lora |" in summary
    for f in ("report.md", "metrics.json", "facts.json", "config.yaml", "svf/probe/probe.safetensors",
              "figures/probe_spectrum.png", "figures/tradeoff.png", "adapters/palora/adapter_config.json"):
        assert (tmp_path / "demo" / f).exists(), f
    assert {n: o.to_dict() | {"seconds": 0} for n, o in a.outcomes.items()} == \
        {n: o.to_dict() | {"seconds": 0} for n, o in b.outcomes.items()}
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert list(m["models"]) == ["base", "svf-expert", "lora", "palora"] and m["baseline"] == "lora"
    assert set(m["summary"]["palora"]["vs_baseline"]) >= {"recall", "nll_increase"}
    assert "![tradeoff](figures/tradeoff.png)" in (tmp_path / "demo" / "report.md").read_text()


def test_palora_study_resumes_only_the_missing_units(checkpoint, tmp_path, monkeypatch):
    study = recipe("palora-study")
    calls = {"svf": 0, "inject": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(study, "train_svf_expert", counting("svf", study.train_svf_expert))
    monkeypatch.setattr(study, "train_injection", counting("inject", study.train_injection))
    out = tmp_path / "study"
    first, _ = execute("palora-study", study.Config(methods="lora", seeds=(0, 1), **tiny(checkpoint)), out)
    assert calls == {"svf": 2, "inject": 2}
    cfg = study.Config(methods="lora,palora:protect=random", seeds=(0, 1), **tiny(checkpoint))
    with pytest.raises(FileExistsError, match="--resume"):
        execute("palora-study", cfg, out)
    second, summary = execute("palora-study", cfg, out, mode="resume")
    assert calls == {"svf": 2, "inject": 4}  # only the new method, once per seed
    assert second.outcomes[1]["lora"] == first.outcomes[1]["lora"]
    assert (out / "units" / "seed1-palora-protect-random.json").exists() and "| palora:protect=random |" in summary
    nll = second.summary["palora:protect=random"]["vs_baseline"]["nll_increase"]
    assert nll["method"] == "hierarchical-bootstrap"
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["items"]["0"]["lora"]["recall"]) == 4 and m["baseline"] == "lora"


# --- the command line ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,option", [("svf", "--objective"), ("inject", "--method"), ("eval", "--run-dir"),
                                            ("demo", "--methods"), ("palora-study", "--seeds")])
def test_help(command, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and option in out and "--model" in out


@pytest.mark.parametrize("args,message", [
    (["inject", "--method", "lorax"], "unknown method 'lorax'"),
    (["inject", "--probe", "/nonexistent/probe"], "no probe at /nonexistent/probe"),
    (["inject", "--facts", "/nonexistent/facts.jsonl"], "--facts /nonexistent/facts.jsonl: no such file"),
    (["svf", "--skill", "chess"], "unknown task 'chess'"),
    (["svf", "--objective", "ppo"], "unknown objective 'ppo'"),
    (["demo", "--methods", "lora,nope"], "unknown method 'nope'"),
    (["palora-study", "--methods", "lora,palora", "--baseline", "dora"], "baseline 'dora' is not one of the methods"),
    (["eval", "--run-dir", "/nonexistent/run"], "is not an injection run directory"),
])
def test_bad_input_is_a_one_line_error(args, message, tmp_path, capsys, svf_run):
    if args[0] == "inject" and "--probe" not in args:
        args += ["--probe", str(svf_run[0])]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_an_existing_run_is_refused_without_overwrite_or_resume(checkpoint, tmp_path, capsys):
    args = ["svf", "--model", checkpoint, "--out", str(tmp_path / "svf"), "--train.n-train", "8", "--train.n-val",
            "2", "--train.max-new-tokens", "8", "--threads", "1", "--progress", "false"]
    assert main(args) == 0
    before = (tmp_path / "svf" / "probe" / "probe.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and err.strip().count("\n") == 0
    assert (tmp_path / "svf" / "probe" / "probe.safetensors").stat().st_mtime_ns == before
    assert main([*args, "--overwrite"]) == 0
