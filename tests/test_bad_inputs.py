"""Bad inputs, table-driven, on the command line and the Python API.

Every case must: end with exit status 2 (on the API: raise an error the command line reports with status 2), print
one line ``error: ...`` naming the problem (no traceback), leave no partial output and no work directory behind,
leave every input untouched (``--out mydata`` keeps ``mydata/thesis.txt``), and fail fast (under 10 s; most take a
few milliseconds, the NaN-weight cases one load of a tiny model).
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
import struct
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import save_tiny_organism
from spectral_peft.cli import USER_ERRORS, _report, main
from spectral_peft.errors import InputError, MissingInputError, OutputExistsError
from spectral_peft.recipes import RECIPES, execute, recipe

FAST = 10.0  # seconds


def _poison(src: Path, dst: Path, value: float, weights: str) -> str:
    """A copy of directory ``src`` with one entry of one tensor of ``weights`` set to ``value``."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / weights))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(dst / weights), metadata={"format": "pt"})
    return str(dst)


def _model_variants(root: Path, model: Path) -> dict[str, str]:
    """Broken copies of a good checkpoint, one per way a checkpoint directory goes wrong."""
    out: dict[str, str] = {}
    weights = (model / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("garbage", bytes(range(256)) * 20),
                       ("tiny_file", b"\x01\x02"), ("padded", weights + b"\0" * 16),
                       ("bad_header", struct.pack("<Q", 5) + b"{oops" + weights[13:])):
        shutil.copytree(model, root / name)
        (root / name / "model.safetensors").write_bytes(data)
        out[name] = str(root / name)
    out["nan_model"] = _poison(model, root / "nan_model", float("nan"), "model.safetensors")
    out["inf_model"] = _poison(model, root / "inf_model", float("inf"), "model.safetensors")
    (root / "empty").mkdir()
    out["empty"] = str(root / "empty")
    for name, remove in (("no_tokenizer", ("tokenizer.json", "tokenizer_config.json")),
                         ("no_weights", ("model.safetensors",))):
        shutil.copytree(model, root / name)
        for f in remove:
            (root / name / f).unlink()
        out[name] = str(root / name)
    config = json.loads((model / "config.json").read_text())
    for name, change in (("bert", {"model_type": "bert", "architectures": ["BertForMaskedLM"]}),
                         ("alien", {"model_type": "no-such-architecture"}),
                         ("no_type", {"model_type": None})):
        shutil.copytree(model, root / name)
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
        out[name] = str(root / name)
    shutil.copytree(model, root / "bad_config")
    (root / "bad_config" / "config.json").write_text("{")
    out["bad_config"] = str(root / "bad_config")
    shutil.copytree(model, root / "missing_shard")
    (root / "missing_shard" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    out["missing_shard"] = str(root / "missing_shard")
    return out


def _adapters(root: Path, model: str) -> dict[str, str]:
    """A HiP-LoRA adapter and an SVF probe of the tiny model, with NaN and truncated copies, and fake injection
    runs for ``eval``."""
    from spectral_peft import get_peft_model, method_config
    from spectral_peft.loading import load_model
    from spectral_peft.methods import MethodSpec, build_model, parse_method
    from spectral_peft.probe import Probe

    base, _ = load_model(model)
    build_model(parse_method("hiplora:r=2,k=2", MethodSpec(targets="mlp")), base).save_pretrained(root / "adapter")
    out = {"adapter": str(root / "adapter"),
           "nan_adapter": _poison(root / "adapter", root / "nan_adapter", float("nan"), "adapter_model.safetensors")}
    shutil.copytree(root / "adapter", root / "truncated_adapter")
    weights = root / "truncated_adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    out["truncated_adapter"] = str(root / "truncated_adapter")
    shutil.copytree(root / "adapter", root / "peft_adapter")
    (root / "peft_adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    out["peft_adapter"] = str(root / "peft_adapter")
    base, _ = load_model(model)
    svf = get_peft_model(base, method_config("svf", target_modules=["up_proj"]), progress=False)
    Probe.from_model(svf).save(root / "probe")
    out["probe"] = str(root / "probe")
    out["nan_probe"] = _poison(root / "probe", root / "nan_probe", float("nan"), "probe.safetensors")
    metrics = {"method": "lora", "spec": {"method": "lora"}, "probe": out["probe"], "model": model, "eval": {},
               "skills": ["math"], "chat_template": "auto"}
    for name, adapter, text in (("eval_nan", out["nan_adapter"], json.dumps(metrics)),
                                ("eval_bad_json", out["adapter"], "{not json"),
                                ("eval_foreign", out["adapter"], json.dumps({"accuracy": 0.5})),
                                ("eval_nan_probe", out["adapter"], json.dumps({**metrics, "probe": out["nan_probe"]}))):
        (root / name).mkdir()
        (root / name / "metrics.json").write_text(text)
        (root / name / "facts.json").write_text("{}")
        shutil.copytree(adapter, root / name / "adapter")
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Paths of every (good and bad) input; recipes are imported here so that the cases time validation only."""
    root = tmp_path_factory.mktemp("inputs")
    model = Path(save_tiny_organism(root / "model"))
    paths = {"model": str(model), **_model_variants(root, model), **_adapters(root, str(model))}
    (root / "mydata").mkdir()
    (root / "mydata" / "thesis.txt").write_text("four years of work")
    (root / "plain.txt").write_text("a file")
    (root / "bad.yaml").write_text("train: {lr: [1\n")
    (root / "nan.yaml").write_text("train:\n  lr: .nan\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "qa.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n')
    paths.update(root=str(root), mydata=str(root / "mydata"), plain=str(root / "plain.txt"),
                 missing=str(root / "does-not-exist"), bad_yaml=str(root / "bad.yaml"), nan_yaml=str(root / "nan.yaml"),
                 list_yaml=str(root / "list.yaml"), qa=str(root / "qa.jsonl"),
                 package=str(Path(sys.modules["spectral_peft"].__file__).parent))
    for name in RECIPES:
        recipe(name)
    return paths


def snapshot(root: str | Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def offline(monkeypatch):
    """No network: a hub id that is not in the local cache fails at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# (command line, a fragment of the expected message). ``{name}`` is an input path; recipes get ``--out {out}``.
CLI_CASES = [
    # the model: weights, config, tokenizer, path
    ("finetune --model {truncated}", "is not a valid safetensors file"),
    ("finetune --model {garbage}", "is not a valid safetensors file"),
    ("finetune --model {tiny_file}", "is not a valid safetensors file (only 2 bytes)"),
    ("finetune --model {padded}", "truncated or corrupt"),
    ("finetune --model {bad_header}", "its header is not JSON"),
    ("finetune --model {nan_model}", "holds NaN or infinite values"),
    ("finetune --model {inf_model}", "holds NaN or infinite values"),
    ("sanity --model {nan_model}", "holds NaN or infinite values"),
    ("drift --model {truncated}", "is not a valid safetensors file"),
    ("finetune --model {empty}", "directory has no config.json"),
    ("finetune --model {no_tokenizer}", "no tokenizer files"),
    ("finetune --model {no_weights}", "no weights"),
    ("finetune --model {missing}", "no such checkpoint directory"),
    ("finetune --model ./no/such/checkpoint", "no such checkpoint directory"),
    ("finetune --model no-such-model-xyz", "no such directory, and not in the local Hugging Face cache"),
    ("finetune --model no-such-owner/no-such-model", "no such directory, and not in the local Hugging Face cache"),
    ("finetune --model 'not a model id!'", "not a Hugging Face model id"),
    ("finetune --model {plain}", "is a file"),
    ("finetune --model {bert}", "is a BertForMaskedLM checkpoint, not a causal language model"),
    ("finetune --model {alien}", "model_type 'no-such-architecture' is unknown to transformers"),
    ("finetune --model {no_type}", "config.json has no model_type"),
    ("finetune --model {bad_config}", "is not valid JSON"),
    ("finetune --model {missing_shard}", "model-00002-of-00002.safetensors listed in"),
    # ranges and numbers
    ("finetune --threads -1", "threads must be >= 1, got threads=-1"),
    ("drift --threads 0", "threads must be >= 1"),
    ("mergefail --seeds ,", "seeds: give at least 1, each once (got [])"),
    ("drift --seeds 1,1", "seeds: give at least 1, each once (got [1, 1])"),
    ("edit --seeds []", "seeds: give at least 1"),
    ("finetune --train.n-eval 0", "n_eval"),
    ("finetune --train.n-train 0", "n_train"),
    ("svf --train.n-val 0", "n_val"),
    ("finetune --train.lr -1", "lr must be a positive number"),
    ("finetune --train.lr nan", "--train.lr: expected float, got nan"),
    ("finetune --method hiplora:rho=nan", "budget_rho must be a finite number, got nan"),
    ("finetune --method hiplora:lam=inf", "budget_lambda must be a finite number, got inf"),
    ("drift --methods lora,hiplora:rho=nan", "budget_rho must be a finite number"),
    ("mergefail --tau 0", "tau must be in (0, 1]"),
    ("mergefail --density 1.5", "density must be in (0, 1]"),
    ("drift --n-ppl 0", "n_ppl, n_skill and n_facts must be >= 1, got n_ppl=0"),
    ("edit --n-edits 0", "n_edits, n_local, n_skill and threads must be >= 1"),
    ("sanity --noise 0", "noise must be a positive number"),
    ("sanity --n-indices 0", "n_indices, n_docs and threads must be >= 1"),
    ("palora-study --n-resamples 0", "n_resamples"),
    ("inject --n-facts 0", "n_facts and threads must be >= 1"),
    ("eval --n-skill 0", "n_skill must be >= 1"),
    ("export --adapter {adapter} --out {out} --max-rank 0", "max_rank must be >= 1"),
    # method and data specs
    ("finetune --method lorax", "unknown method 'lorax'"),
    ("finetune --method lora:r=0", "r and k must be >= 1"),
    ("finetune --method lora:bogus=1", "bad option 'bogus=1'"),
    ("finetune --method lora:r=abc", "bad value 'abc' for 'r'"),
    ("drift --methods lora,pissa", "cannot be used here"),
    ("palora-study --baseline nope", "baseline 'nope' is not one of the methods"),
    ("finetune --task juggling", "unknown task 'juggling'"),
    ("finetune --task {missing}.jsonl", "no such task file"),
    ("finetune --task gsm8k:{missing}", "no such data file or directory"),
    ("finetune --task mbpp:{qa}", "pass --allow-code-execution"),
    ("finetune --chat-template sometimes", "chat_template must be one of"),
    ("svf --chat-template sometimes", "chat_template must be one of"),
    ("mergefail --tasks sort", "needs at least 2 distinct tasks"),
    ("continual --tasks sort,sort", "needs at least 2 distinct tasks"),
    ("svf --objective dance", "unknown objective 'dance'"),
    ("inject --facts {missing}", "no such file"),
    ("inject --probe {mydata}", "no probe at"),
    ("inject --probe {nan_probe}", "holds NaN or infinite values"),
    ("edit --task {missing}.jsonl", "no such edits file"),
    # configs, flags and commands
    ("finetune --config {bad_yaml}", "Problems parsing config"),
    ("finetune --config {missing}.yaml", "--config: File does not exist"),
    ("finetune --config {nan_yaml}", "lr"),
    ("finetune --config {list_yaml}", "Unexpected config"),
    ("finetune --bogus 1", "unrecognized arguments: --bogus 1"),
    ("finetune --seed abc", "--seed: expected int, got abc"),
    ("finetune --overwrite --resume", "give --overwrite or --resume, not both"),
    ("nonsense", "unknown command 'nonsense'"),
    ("export --adapter {adapter}", "the following arguments are required: out"),
    # outputs that are not ours
    ("finetune --out .", "would replace the current or root directory"),
    ("finetune --out {mydata}", "mydata exists and is not a spectral-peft run"),
    ("finetune --out {mydata} --overwrite", "mydata exists and is not a spectral-peft run"),
    ("finetune --out {mydata} --resume", "mydata exists and is not a spectral-peft run"),
    ("finetune --out {mydata}/thesis.txt", "thesis.txt exists and is not a spectral-peft run"),
    ("finetune --out {plain}/run", "is a file, not a directory"),
    ("finetune --out {package}/toy/run", "is inside the installed package"),
    ("export --adapter {adapter} --out {mydata}", "exists; choose a new directory for the export"),
    # adapters and injection runs
    ("export --adapter {nan_adapter} --out {out}", "holds NaN or infinite values"),
    ("export --adapter {truncated_adapter} --out {out}", "is not a valid safetensors file"),
    ("export --adapter {mydata} --out {out}", "is not an adapter directory"),
    ("export --adapter {peft_adapter} --out {out}", "is already a PEFT adapter"),
    ("export --adapter {adapter} --out {out} --model {nan_model}", "holds NaN or infinite values"),
    ("merge --adapters {nan_adapter}", "holds NaN or infinite values"),
    ("merge --adapters {adapter},{nan_adapter}", "nan_adapter: "),
    ("merge --adapters {truncated_adapter}", "is not a valid safetensors file"),
    ("merge --adapters {adapter},{missing}", "no such adapter directory"),
    ("merge --adapters {adapter} --density 0", "density must be in (0, 1]"),
    ("merge --adapters {adapter} --weights 1,2", "2 weights for 1 adapters"),
    ("merge --adapters {adapter} --model {bert}", "not a causal language model"),
    ("eval --run-dir {eval_nan}", "holds NaN or infinite values"),
    ("eval --run-dir {eval_nan_probe}", "holds NaN or infinite values"),
    ("eval --run-dir {eval_bad_json}", "is not valid JSON"),
    ("eval --run-dir {eval_foreign}", "is not from spectral-peft inject"),
    ("eval --run-dir {mydata}", "is not an injection run directory"),
]


@pytest.mark.parametrize("command, message", CLI_CASES, ids=[c for c, _ in CLI_CASES])
def test_command_line(command, message, inputs, offline, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = shlex.split(command.format(**inputs, out=out))
    if argv[0] in RECIPES and "--out" not in argv:
        argv += ["--out", str(out)]
    untouched = snapshot(inputs["root"])
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert list(tmp_path.iterdir()) == []  # no output, no partial output, no work directory
    assert snapshot(inputs["root"]) == untouched  # mydata/thesis.txt and every other input intact
    assert elapsed < FAST


def _set(cfg, changes: dict, inputs: dict):
    """``cfg`` with dotted fields set in place, as a Python user may (so nested settings skip their constructor)."""
    for key, value in changes.items():
        *parents, name = key.split(".")
        target = cfg
        for p in parents:
            target = getattr(target, p)
        fmt = lambda v: v.format(**inputs) if isinstance(v, str) else v  # noqa: E731
        setattr(target, name, tuple(map(fmt, value)) if isinstance(value, tuple) else fmt(value))
    return cfg


def _recipe(name: str, changes: dict):
    return lambda inputs, out: execute(name, _set(recipe(name).Config(), changes, inputs), out)


def _call(fn_path: str, *args: str):
    def call(inputs, out):
        module, _, fn = fn_path.rpartition(".")
        target = getattr(__import__(module, fromlist=[fn]), fn)
        return target(*(a.format(**inputs, out=out) for a in args))
    return call


NAN, INF = float("nan"), float("inf")
# (id, call, the error class, a fragment of the message)
API_CASES = [
    ("finetune rho=nan", _recipe("finetune", {"method": "hiplora:rho=nan"}), InputError, "budget_rho"),
    ("finetune threads=-1", _recipe("finetune", {"threads": -1}), InputError, "threads must be >= 1"),
    ("finetune truncated model", _recipe("finetune", {"model": "{truncated}"}), InputError, "not a valid safetensors"),
    ("finetune nan model", _recipe("finetune", {"model": "{nan_model}"}), InputError, "NaN or infinite"),
    ("finetune train.lr=inf", _recipe("finetune", {"train.lr": INF}), InputError, "train.lr must be a finite number"),
    ("finetune train.n_eval=0", _recipe("finetune", {"train.n_eval": 0}), ValueError, "n_eval"),
    ("finetune empty model dir", _recipe("finetune", {"model": "{empty}"}), MissingInputError, "no config.json"),
    ("svf kl_coef=nan", _recipe("svf", {"train.kl_coef": NAN}), InputError, "train.kl_coef must be a finite"),
    ("svf train.lr=inf", _recipe("svf", {"train.lr": INF}), InputError, "train.lr must be a finite number"),
    ("drift seeds=()", _recipe("drift", {"seeds": ()}), InputError, "seeds: give at least 1"),
    ("mergefail tau=nan", _recipe("mergefail", {"tau": NAN}), InputError, "tau must be a finite number"),
    ("mergefail operators", _recipe("mergefail", {"operators": ("avg",)}), InputError, "unknown or repeated merge"),
    ("continual one task", _recipe("continual", {"tasks": ("sort",)}), InputError, "at least 2 distinct tasks"),
    ("edit n_local=0", _recipe("edit", {"n_local": 0}), InputError, "n_local"),
    ("sanity noise=inf", _recipe("sanity", {"noise": INF}), InputError, "noise must be a positive number, got inf"),
    ("sanity perturbations", _recipe("sanity", {"perturbations": ("flip", "flip")}), InputError, "each once"),
    ("palora-study baseline", _recipe("palora-study", {"baseline": "nope"}), InputError, "baseline 'nope'"),
    ("palora-study palora:fraction=nan", _recipe("palora-study", {"methods": "lora,palora:fraction=nan"}),
     InputError, "palora_fraction must be a finite number"),
    ("inject nan probe", _recipe("inject", {"probe": "{nan_probe}"}), InputError, "NaN or infinite"),
    ("demo retain_skills=()", _recipe("demo", {"retain_skills": ()}), InputError, "retain_skills: give at least 1"),
    ("merge nan adapter", _recipe("merge", {"adapters": ("{nan_adapter}",)}), InputError, "NaN or infinite"),
    ("merge weights=nan", _recipe("merge", {"adapters": ("{adapter}",), "weights": (NAN,)}), InputError,
     "weights[0] must be a finite number"),
    ("eval nan adapter", _recipe("eval", {"run_dir": "{eval_nan}"}), InputError, "NaN or infinite"),
    ("eval threads=0", _recipe("eval", {"threads": 0}), InputError, "threads must be >= 1"),
    ("out=.", lambda inputs, out: execute("finetune", None, "."), InputError, "current or root directory"),
    ("out=mydata", lambda inputs, out: execute("finetune", None, inputs["mydata"], "overwrite"), OutputExistsError,
     "is not a spectral-peft run"),
    ("mode=sideways", lambda inputs, out: execute("finetune", None, out, "sideways"), InputError, "mode must be one"),
    ("load_model nan", _call("spectral_peft.loading.load_model", "{nan_model}"), InputError, "NaN or infinite"),
    ("load_model inf", _call("spectral_peft.loading.load_model", "{inf_model}"), InputError, "NaN or infinite"),
    ("load_model missing", _call("spectral_peft.loading.load_model", "{missing}"), MissingInputError,
     "no such checkpoint directory"),
    ("check_adapter nan", _call("spectral_peft.validation.check_adapter", "{nan_adapter}"), InputError,
     "NaN or infinite"),
    ("check_probe nan", _call("spectral_peft.validation.check_probe", "{nan_probe}"), InputError, "NaN or infinite"),
    ("check_method rho=nan", _call("spectral_peft.validation.check_method", "hiplora:rho=nan"), InputError,
     "budget_rho must be a finite number"),
    ("check_safetensors garbage", _call("spectral_peft.validation.check_safetensors", "{garbage}/model.safetensors"),
     InputError, "header length"),
    ("RunDir mydata", _call("spectral_peft.runs.RunDir", "{mydata}", "finetune", "overwrite"), OutputExistsError,
     "not a spectral-peft run"),
    ("export nan adapter", _call("spectral_peft.cli.export", "{nan_adapter}", "{out}"), InputError, "NaN or infinite"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_python_api(call, error, message, inputs, offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    untouched = snapshot(inputs["root"])
    start = time.perf_counter()
    with pytest.raises(error) as info:
        call(inputs, tmp_path / "run")
    elapsed = time.perf_counter() - start
    assert isinstance(info.value, USER_ERRORS)
    with redirect_stderr(io.StringIO()) as err:
        assert _report(info.value, debug=False) == 2  # what the command line would exit with
    line = err.getvalue().strip()
    assert "\n" not in line and message in line, line
    assert list(tmp_path.iterdir()) == [] and snapshot(inputs["root"]) == untouched
    assert elapsed < FAST


def test_enough_cases():
    assert len(CLI_CASES) + len(API_CASES) >= 50
