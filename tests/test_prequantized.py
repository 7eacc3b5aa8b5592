"""Synthetic checkpoints written pre-quantized (registry "stored"): the 70B-class shape's format, tested on small
shapes through the same writer (helpers.training.models.write_synthetic): transformers' own 4-bit layout, loadable with
from_pretrained alone, and written with host memory near one layer, not the model."""
import glob
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from helpers.training import models, runs
from helpers.records import registry
from tests.conftest import base_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tensors(folder) -> dict:
    out = {}
    for f in sorted(glob.glob(f"{folder}/*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def test_70b_shape_is_stored_nf4_and_named_in_the_registry():
    assert registry.stored_quant("llama-3.1-70b-shape") == "nf4"
    assert registry.stored_quant("llama-2-7b-shape") is None
    assert models.context_length("llama-3.1-70b-shape") == 131072


def test_4bit_writer_writes_what_transformers_saves(tmp_path):
    """The tiny shape written 4-bit by our writer and the same shape's bf16 checkpoint loaded with the
    BitsAndBytesConfig our runs use, then saved by transformers: same tensors (names, dtypes, shapes), same
    quantization_config, and the same 4-bit values (the writer's weights are the NF4 of the bf16 ones)."""
    from transformers import AutoModelForCausalLM

    bf16 = models.write_synthetic("tiny-llama-shape", tmp_path / "bf16", device="cpu", stored=None)
    ours = models.write_synthetic("tiny-llama-shape", tmp_path / "ours", device="cpu", stored="nf4", shard_bytes=20_000)
    qcfg = models.bnb_config("nf4", "bfloat16", True, sharded=True)
    ref = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16, quantization_config=qcfg,
                                               device_map={"": "cpu"})
    ref.save_pretrained(tmp_path / "ref")
    a, b = _tensors(tmp_path / "ref"), _tensors(ours)
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        bits = lambda t: t.flatten().view(torch.uint8)  # noqa: E731 - packed 4-bit words read as bf16 can be NaN
        assert torch.equal(bits(a[k]), bits(b[k])), k  # bitsandbytes quantizes the same bf16 values the same way
    read = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert read(ours) == read(tmp_path / "ref")
    assert read(ours)["bnb_4bit_quant_storage"] == "bfloat16" and read(ours)["bnb_4bit_quant_type"] == "nf4"
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) > 1  # several shards
    assert json.loads((ours / "qlora_study_source.json").read_text())["stored"] == "nf4"


def test_stored_checkpoint_loads_as_written_and_runs(cache, monkeypatch):
    """With the tiny shape marked stored nf4: load_model reads it with from_pretrained and no BitsAndBytesConfig,
    every decoder Linear is a Linear4bit of the architecture's shape, a forward gives finite logits; a run asking
    for another quant is refused before anything loads, naming both."""
    import bitsandbytes as bnb

    monkeypatch.setitem(registry.SYNTHETIC["tiny-llama-shape"], "stored", "nf4")
    with pytest.raises(ValueError, match="stored pre-quantized \\(nf4.*use quant='nf4'.*got quant='none'"):
        runs.validate(base_config(model="tiny-llama-shape", corpus="random-tokens", quant="none"))
    with pytest.raises(ValueError, match="double_quant=True.*got quant='nf4', double_quant=False"):
        models.load_model("tiny-llama-shape", "nf4", double_quant=False)
    net, tok, info = models.load_model("tiny-llama-shape", "nf4", "bfloat16")
    assert tok is None and json.loads((cache / "tiny-llama-shape" / "qlora_study_source.json").read_text())["stored"] == "nf4"
    cfg = registry.SYNTHETIC["tiny-llama-shape"]["config"]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    want = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * cfg["num_hidden_layers"]
    for n, m in layers:
        assert (m.in_features, m.out_features) == want[n.rsplit(".", 1)[1]], n
        assert m.weight.quant_type == "nf4" and m.weight.dtype == torch.bfloat16 and m.weight.quant_state is not None
    assert not isinstance(net.lm_head, bnb.nn.Linear4bit)
    logits = net(input_ids=torch.randint(0, cfg["vocab_size"], (1, 16))).logits
    assert logits.shape == (1, 16, cfg["vocab_size"]) and torch.isfinite(logits).all()


# Shapes of equal layers (each 32 MB in bf16), 4 or 16 of them: if the writer held the model, its peak memory would
# grow with the depth; small enough to write on a CI CPU in seconds.
SMALL = dict(model_type="llama", vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from helpers.training import models
    from helpers.records import registry
    import bitsandbytes, safetensors.torch, transformers  # imported before the baseline: their memory is not the writer's
    registry.SYNTHETIC["small-test-shape"] = {"shape_of": "a test shape", "config": json.loads(sys.argv[2])}
    bitsandbytes.functional.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16))  # its lazy set-up, once
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    models.write_synthetic("small-test-shape", sys.argv[1], device="cpu", stored="nf4", shard_bytes=2**24)
    print(json.dumps({"peak_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base,
                      "write_s": time.perf_counter() - t0}))
""")


def _write_measured(tmp_path, layers: int) -> dict:
    """Write SMALL with this many layers in a fresh process: its peak memory growth over the imports, and its time.
    glibc's malloc is told to map every block over 1 MB on its own, so a freed tensor's memory goes back to the
    system at once and the peak counts what the writer holds, not what the allocator kept for later."""
    import os

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    shape = {**SMALL, "num_hidden_layers": layers}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / f"small{layers}"), json.dumps(shape)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_4bit_writer_holds_about_one_layer_in_memory(tmp_path):
    """Peak host memory while writing does not grow with the model: 16 layers peak within one layer (32 MB bf16) of
    4 layers, and well under the 16-layer model's bf16 size (~0.5 GB). What it holds: one shard (16 MB here, twice
    while safetensors serializes it) and the tensor being quantized with bitsandbytes' CPU temporaries (measured
    ~7x the tensor's bf16 size). Prints the figures and the write time extrapolated to the 70B shape on this CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**SMALL, "num_hidden_layers": 16}
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        big = AutoModelForCausalLM.from_config(models.synthetic_config("llama-3.1-70b-shape"))
    total, total_70b = sum(p.numel() for p in net.parameters()), sum(p.numel() for p in big.parameters())
    layer_mb, model_mb = 2 * sum(p.numel() for p in net.model.layers[0].parameters()) / 1e6, 2 * total / 1e6
    shallow, deep = _write_measured(tmp_path, 4), _write_measured(tmp_path, 16)
    g4, g16 = shallow["peak_growth_bytes"] / 1e6, deep["peak_growth_bytes"] / 1e6
    rate = total / deep["write_s"]
    print(f"\n4-bit writer, peak host memory growth: {g4:.0f} MB for 4 layers, {g16:.0f} MB for 16 layers "
          f"({model_mb:.0f} MB in bf16; one layer {layer_mb:.0f} MB). {deep['write_s']:.1f} s for 16 layers = "
          f"{rate / 1e6:.0f} M params/s on this CPU: the 70B shape ({total_70b / 1e9:.1f} B params) would take "
          f"~{total_70b / rate / 60:.0f} min here")
    assert g16 < g4 + layer_mb, (g4, g16)  # depth costs no memory
    assert g16 < model_mb / 3, (g16, model_mb)  # the model is never held
