"""The training stack switch (helpers/training/peer.py, notebook parameter `stack`): bad values refused before anything
runs, the peer refused clearly where it cannot load (a CPU, the package missing) with the sweep going on, and a
CPU user without the [peer] extra seeing nothing change."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.training import models, peer, runs
from helpers.sweeps import sweep
from helpers.records.registry import LINEARS
from helpers.training.runs import read_all
from tests.conftest import base_config
from tests.test_sweep import tiny_sweep

ROOT = Path(__file__).resolve().parents[1]
TYPES = {k: p["type"] for k, p in sweep.notebook_parameters().items()}


def test_the_notebook_takes_stack_hf_by_default():
    assert sweep.notebook_parameters()["stack"]["default"] == "hf" and peer.STACKS[0] == "hf"


@pytest.mark.parametrize("change, message", [
    ({"stack": "unsloh"}, "stack='unsloh' is not allowed: use one of ['hf', 'unsloth']"),
    ({"stack": "unsloth", "quant": "int8"}, "quant='int8' is not allowed: one of ['nf4'] with stack 'unsloth'"),
    ({"stack": "unsloth", "quant": "none"}, "quant='none' is not allowed: one of ['nf4'] with stack 'unsloth'"),
    ({"stack": "unsloth", "double_quant": False}, "double_quant=False is not allowed: True with stack 'unsloth'"),
    ({"stack": "unsloth", "dtype": "float32"}, "dtype='float32' is not allowed: one of ['auto', 'bfloat16']"),
    ({"stack": "unsloth", "torch_compile": True, "chunked_loss": 4},
     "torch_compile=True is not allowed: False with stack 'unsloth': our levers (torch_compile, chunked_loss on here)"),
    ({"stack": "unsloth", "tiled_mlp": 2}, "tiled_mlp=2 is not allowed: 0 with stack 'unsloth'"),
    ({"stack": "unsloth", "offload_activations": True}, "offload_activations=True is not allowed: False with stack"),
    ({"stack": "unsloth", "keep_16bit": True}, "keep_16bit=True is not allowed: False with stack 'unsloth'"),
])
def test_bad_stack_settings_are_refused_naming_what_is_allowed(change, message):
    with pytest.raises(ValueError) as e:
        runs.validate(base_config(**{"quant": "nf4", **change}), types=TYPES)
    assert message in str(e.value)


def test_a_peer_run_validates_on_a_cpu_machine():
    """Whether Unsloth loads here is the run's result, not a configuration error: the sweep must go on."""
    runs.validate(base_config(quant="nf4", stack="unsloth", device="cpu"), types=TYPES)


def test_the_default_stack_keeps_its_run_ids_and_the_peer_gets_its_own():
    cfg = base_config()
    before = {k: v for k, v in cfg.items() if k != "stack"}  # a configuration recorded before the parameter existed
    assert runs.run_id(cfg) == runs.run_id(before)
    other = runs.run_id({**cfg, "stack": "unsloth"})
    assert other != runs.run_id(cfg) and "-nf4-unsloth-r" in other


def test_importing_peer_imports_neither_transformers_nor_peft():
    code = "import sys, helpers.training.peer; print(sorted(m for m in ('transformers', 'peft', 'unsloth') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def fresh_import_state():
    saved = dict(peer._IMPORT)
    peer._IMPORT.clear()
    yield
    peer._IMPORT.clear()
    peer._IMPORT.update(saved)


def test_on_a_cpu_the_peer_is_refused_at_load_naming_what_it_needs(fresh_import_state):
    peer.import_first("unsloth", "cpu")
    assert "unsloth" not in sys.modules
    with pytest.raises(RuntimeError, match=r"stack 'unsloth' needs a CUDA GPU and `pip install -e .\[peer\]`: this run "
                                           r"is on the CPU \(device='cpu'"):
        peer.load_model("unsloth", "tiny-llama-shape", "nf4", "auto", True, "cpu", 64)


def test_without_the_package_the_peer_is_refused_naming_the_extra(fresh_import_state, monkeypatch):
    monkeypatch.setattr(peer, "_cuda_here", lambda device: True)  # a GPU machine without `pip install -e .[peer]`
    monkeypatch.setattr(peer.importlib.util, "find_spec", lambda name: None)
    peer.import_first("unsloth", "cuda")
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU and `pip install -e .\[peer\]`: unsloth, unsloth_zoo not "
                                           "installed here"):
        peer.attach_lora("unsloth", None, "nf4", 8, 16, 0.0)


def test_transformers_imported_first_is_refused(fresh_import_state, monkeypatch):
    import transformers  # noqa: F401 - as in a kernel that ran an hf run before

    monkeypatch.setattr(peer, "unavailable", lambda device: None)
    peer.import_first("unsloth", "cuda")
    with pytest.raises(RuntimeError, match="transformers.* imported first in this kernel, so Unsloth could not patch them. Restart the kernel"):
        peer.load_model("unsloth", "tiny-llama-shape", "nf4", "auto", True, "cuda", 64)


def test_stack_hf_imports_nothing_and_sets_nothing(fresh_import_state, monkeypatch):
    for k in peer.OFFLINE_ENV:
        monkeypatch.delenv(k, raising=False)
    peer.import_first("hf", "auto")
    assert not peer._IMPORT and not any(k in peer.os.environ for k in peer.OFFLINE_ENV)


def test_all_linear_is_the_seven_projections_for_the_peer():
    assert peer.target_names("all-linear") == "all-linear"
    assert peer.target_names("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert len(LINEARS) == 7


@pytest.mark.parametrize("name", ["tiny-llama-shape", "qwen2.5-7b-shape"])
def test_a_synthetic_checkpoint_gets_a_tokenizer_a_loader_can_read(tmp_path, name):
    from transformers import AutoTokenizer

    models.write_synthetic_tokenizer(name, tmp_path)
    made = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    assert "tokenizer.json" in made and not [f for f in made if f.startswith(".")]  # no temp folder left
    tok = AutoTokenizer.from_pretrained(tmp_path)
    cfg = models.SYNTHETIC[name]["config"]
    assert len(tok) == cfg["vocab_size"]  # no resize of the embeddings
    assert tok.eos_token_id == cfg["eos_token_id"] and tok.bos_token_id == cfg["bos_token_id"]
    assert tok.pad_token_id not in (tok.eos_token_id, None)  # so no loader adds a pad token
    models.write_synthetic_tokenizer(name, tmp_path)  # once: a folder that has it is left alone
    assert {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()} == made


@pytest.mark.slow
def test_a_sweep_records_the_peer_that_cannot_load_and_goes_on(tmp_path, tiny_model_dir):
    path = tiny_sweep(tmp_path, tiny_model_dir, {"stack": ["unsloth", "hf"]}, name="stacks")
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "base": {**spec["base"], "quant": "nf4"}}))  # the peer's one quantization
    states = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r")
    records = {r["config"]["stack"]: r for r in read_all(tmp_path / "r" / "stacks" / "runs")}
    assert sorted(states.values()) == ["error", "ok"] and records["hf"]["status"] == "ok"
    failed = records["unsloth"]
    assert failed["status"] == "error"
    assert "stack 'unsloth' needs a CUDA GPU and `pip install -e .[peer]`: this run is on the CPU" in failed["error"]
    assert failed["environment"]["device"] == "cpu"  # the notebook's own record, written by its guarded load step
    # the default stack's record: the new key in its config, nothing of the peer's anywhere else
    ok = records["hf"]
    assert ok["config"]["stack"] == "hf" and "-unsloth-" not in ok["run_id"]
    assert not [k for k in (*ok["metrics"], *ok["environment"]) if "unsloth" in k]


class FakeFastLanguageModel:
    """Stands in for Unsloth's FastLanguageModel on a CPU: records what the peer stack asks of it, loads with
    transformers and attaches with peft, so the rest of the path runs."""
    calls = []

    @classmethod
    def from_pretrained(cls, model_name, **kw):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cls.calls.append(("from_pretrained", model_name, kw))
        tok = AutoTokenizer.from_pretrained(model_name)  # Unsloth always reads one
        return AutoModelForCausalLM.from_pretrained(model_name), tok

    @classmethod
    def get_peft_model(cls, model, **kw):
        from peft import LoraConfig, get_peft_model

        cls.calls.append(("get_peft_model", None, kw))
        cfg = LoraConfig(r=kw["r"], lora_alpha=kw["lora_alpha"], lora_dropout=kw["lora_dropout"],
                         target_modules=kw["target_modules"], bias=kw["bias"], task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)


def test_the_peer_is_asked_for_the_runs_settings(tmp_path, monkeypatch, fresh_import_state):
    import types

    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FakeFastLanguageModel))
    FakeFastLanguageModel.calls = []
    net, tok, info = peer.load_model("unsloth", "tiny-llama-shape", "nf4", "auto", True, "cuda", 96)
    assert tok is None  # the same data as the hf stack: a synthetic model trains on random tokens
    folder = models.cache_dir() / "tiny-llama-shape"
    assert (folder / "tokenizer.json").exists()  # written beside the synthetic checkpoint for Unsloth
    assert info["dtype_resolved"] == "bfloat16" and info["params_total"] > 0 and info["synthetic"] is True
    net = peer.attach_lora("unsloth", net, "nf4", 4, 8, 0.0, "all-linear", gradient_checkpointing=True, seed=3)
    assert net.training
    again, _, _ = peer.load_model("unsloth", "tiny-llama-shape", "nf4", "auto", True, "cuda", 96)
    peer.attach_lora("unsloth", again, "nf4", 4, 8, 0.0, "q_proj,v_proj", False, seed=3)
    (_, name, load), (_, _, attach), _, (_, _, attach_no_gc) = FakeFastLanguageModel.calls
    assert name == str(folder)
    assert load == {"max_seq_length": 96, "dtype": peer.torch.bfloat16, "load_in_4bit": True}
    assert attach == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": list(LINEARS),
                      "bias": "none", "use_gradient_checkpointing": "unsloth", "random_state": 3}
    assert attach_no_gc["use_gradient_checkpointing"] is False and attach_no_gc["target_modules"] == ["q_proj", "v_proj"]
    # on a second GPU, the model goes there
    peer.load_model("unsloth", "tiny-llama-shape", "nf4", "auto", True, "cuda:1", 96)
    assert FakeFastLanguageModel.calls[-1][2]["device_map"] == {"": "cuda:1"}


def test_the_notebook_imports_the_peer_before_anything_else():
    """Unsloth patches transformers only if imported first: the cell after the parameters starts with it, and
    what runs before it (the parameters cell) imports nothing."""
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "01_train.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []) and "import" not in code[0].source
    assert code[1].source.startswith("from helpers.training import peer\npeer.import_first(stack, device)")


def test_max_context_imports_no_transformers_before_it_chooses_the_stack():
    code = ("import sys, importlib.util; s = importlib.util.spec_from_file_location('mc', 'benchmarks/max_context.py'); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(x for x in ('transformers', 'peft') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
