"""PALoRA experiments on a tiny random organism: expert folding, every method from the same expert, protected
directions kept, ablations, atomic run directories, and a tiny deterministic end-to-end demo."""

import json
import math

import pytest
import torch

from helpers import save_tiny_organism

from spectral_peft import Probe, get_peft_model, method_config
from spectral_peft.experiments import MethodConfig, ModelSource, atomic_run_dir, build_method_model, merge_expert
from spectral_peft.experiments.demo import DemoConfig, run_demo
from spectral_peft.experiments.methods import check_method, protected_size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random organism saved as an HF checkpoint (hidden 32, MLP 64, one layer)."""
    return save_tiny_organism(tmp_path_factory.mktemp("tiny-organism"))


@pytest.fixture(scope="module")
def source(checkpoint):
    return ModelSource(checkpoint)


@pytest.fixture(scope="module")
def probe(source):
    """A probe with non-trivial scales: z = 1 + 0.3 * N(0, 1) on every MLP matrix."""
    model = get_peft_model(source.fresh(), method_config("svf"), progress=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.svf_param.copy_(0.3 * torch.randn(layer.svf_param.shape, generator=gen))
    return Probe.from_model(model, meta={"skill": "math"})


def test_merge_expert_equals_the_svf_layer_and_palora_fold(source, probe):
    svf = get_peft_model(source.fresh(), method_config("svf"), progress=False)
    with torch.no_grad():
        for name, layer in svf.spectral_layers().items():
            layer.svf_param.copy_(probe.scales[name] - 1)
    merged = svf.merge_and_unload()
    folded = merge_expert(source.fresh(), probe)
    pal = build_method_model("palora", source.fresh(), probe, MethodConfig())
    modules = dict(folded.named_modules())
    for name, layer in pal.spectral_layers().items():
        assert torch.allclose(modules[name].weight, dict(merged.named_modules())[name].weight, atol=1e-5)
        assert torch.allclose(modules[name].weight, layer.expert_weight, atol=1e-5)
    with pytest.raises(ValueError):
        merge_expert(folded, probe)  # the probe refuses weights it was not trained on


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "milora", "oplora", "svft", "hiplora", "palora",
                                    "palora-sigma", "palora-random", "lora-in-probe"])
def test_every_method_starts_from_the_expert(source, probe, method):
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    expert = merge_expert(source.fresh(), probe)
    model = build_method_model(method, source.fresh(), probe, MethodConfig(r=4))
    with torch.no_grad():
        ref, out = expert(input_ids=ids).logits, model(input_ids=ids).logits
    tol = 1e-3 if method == "pissa" else 1e-4  # PiSSA rewrites W into residual + factors (float error)
    assert torch.allclose(out, ref, atol=tol), method
    if method in ("lora", "milora", "oplora", "palora", "palora-sigma", "palora-random", "lora-in-probe"):
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert n == 3 * 4 * (32 + 64)  # three MLP matrices of 64 x 32 at rank 4: parameter counts match


def _train_a_bit(model):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_palora_keeps_protected_directions_and_ablations_do_what_they_say(source, probe):
    cfg = MethodConfig(r=4, rho=0.25)
    sizes = protected_size(probe, cfg)
    assert set(sizes.values()) == {math.ceil(0.25 * 32)}
    for method in ("palora", "palora-sigma", "palora-random", "lora-in-probe"):
        model = build_method_model(method, source.fresh(), probe, cfg)
        _train_a_bit(model)
        for name, layer in model.spectral_layers().items():
            S = layer.protected_index
            assert S.numel() == sizes[name]
            if method == "palora":
                assert torch.equal(S, probe.select(name, "top_fraction", rho=0.25))
            if method == "palora-sigma":
                assert S.tolist() == list(range(sizes[name]))
            B, A = layer.lora.factors()
            dW = B @ A
            assert dW.abs().max() > 0
            U_S, V_S = layer.U[:, S], layer.V[:, S]
            if method == "lora-in-probe":  # the update lives inside span(U_S) x span(V_S)
                assert torch.allclose(U_S @ (U_S.T @ dW) @ V_S @ V_S.T, dW, atol=1e-6)
            else:  # the protected expert triplets are untouched
                assert (U_S.T @ dW).abs().max() < 1e-5 and (dW @ V_S).abs().max() < 1e-5


def test_oplora_protects_as_many_directions_as_palora(source, probe):
    model = build_method_model("oplora", source.fresh(), probe, MethodConfig(r=4, rho=0.25))
    layer = next(iter(model.spectral_layers().values()))
    assert layer.lora.U_S.shape[1] == math.ceil(0.25 * 32)


def test_unknown_method_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown method 'lorax'; choose from palora"):
        check_method("lorax")


def test_atomic_run_dir_never_leaves_half_written_output(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with atomic_run_dir(target) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_run_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_run_dir(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "one"  # the previous complete run survives a failed one
    with atomic_run_dir(target) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def tiny_demo(checkpoint, seed=0) -> DemoConfig:
    cfg = DemoConfig(model=checkpoint, methods=("lora", "palora"), seed=seed, threads=1, progress=False)
    cfg.svf.n_train, cfg.svf.n_val, cfg.svf.eval_every, cfg.svf.max_new_tokens = 16, 4, 1, 24
    cfg.split.n_facts, cfg.split.n_known, cfg.split.n_windows, cfg.split.n_samples = 4, 6, 2, 1
    cfg.training.epochs = 2
    cfg.eval.n_skill, cfg.eval.n_ppl, cfg.eval.max_new_tokens = 3, 4, 24
    cfg.adapter.r = 4
    return cfg


def test_tiny_demo_writes_report_and_is_deterministic(checkpoint, tmp_path):
    a = run_demo(tiny_demo(checkpoint), tmp_path / "a")
    b = run_demo(tiny_demo(checkpoint), tmp_path / "b")
    for run in (tmp_path / "a", tmp_path / "b"):
        for f in ("report.md", "metrics.json", "facts.json", "config.json", "svf/probe/probe.safetensors",
                  "svf/report.md", "figures/probe_spectrum.png", "figures/tradeoff.png", "adapters/palora/adapter_config.json"):
            assert (run / f).exists(), f
    strip = lambda m: json.loads(json.dumps({k: v for k, v in m.items() if k != "seconds"}, default=str),
                                 object_hook=lambda d: {k: v for k, v in d.items()
                                                        if not k.endswith("seconds")})
    assert strip(a.metrics) == strip(b.metrics)
    assert set(a.metrics["models"]) == {"base", "svf-expert", "lora", "palora"}
    assert "| palora |" in a.table and "| lora |" in a.table
    report = (tmp_path / "a" / "report.md").read_text()
    assert "![recall vs retention](figures/tradeoff.png)" in report
    svf = a.metrics["svf"]
    assert svf["n_z"] == 3 * 32 and svf["parameter_overhead"] == pytest.approx(96 / svf["n_base_parameters"])


def test_tiny_study_resumes_and_summarises(checkpoint, tmp_path):
    from spectral_peft.experiments.palora_study import StudyConfig, run_study
    from spectral_peft.report import study_markdown

    cfg = StudyConfig(model=checkpoint, seeds=(0, 1), methods=("lora", "palora-random"), threads=1, progress=False)
    base = tiny_demo(checkpoint)
    cfg.svf, cfg.split, cfg.training, cfg.eval, cfg.adapter = base.svf, base.split, base.training, base.eval, base.adapter
    s = run_study(cfg, tmp_path)
    assert (tmp_path / "seeds" / "1" / "palora-random.json").exists() and (tmp_path / "figures" / "tradeoff.png").exists()
    e = s["models"]["lora"]
    assert e["n_seeds"] == 2 and len(e["recall"]["values"]) == 2 and e["recall"]["low"] <= e["recall"]["mean"]
    before = (tmp_path / "seeds" / "0" / "lora.json").stat().st_mtime_ns
    run_study(cfg, tmp_path)  # resumes: nothing is retrained
    assert (tmp_path / "seeds" / "0" / "lora.json").stat().st_mtime_ns == before
    assert "| palora-random |" in study_markdown(s, tmp_path)
