"""Synthetic architectures: real shapes, random weights written once, loaded like any checkpoint; honest labels."""
import json
import math

import papermill
import pytest
import torch

from helpers.training import data, models, runs
from helpers.sweeps.sweep import TRAIN_NOTEBOOK
from tests.conftest import base_config

# Published parameter counts of the checkpoints whose shapes we copy (from their model cards / safetensors index)
PUBLISHED_PARAMS = {"llama-2-7b-shape": 6_738_415_616, "mistral-7b-shape": 7_241_732_096,
                    "llama-3.2-1b-shape": 1_235_814_400, "llama-3.1-8b-shape": 8_030_261_248,
                    "qwen2.5-7b-shape": 7_615_616_512, "llama-3.1-70b-shape": 70_553_706_496}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_shapes_match_the_real_checkpoints(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(models.synthetic_config(name))
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMS[name]


def test_synthetic_names_validate_with_their_context():
    runs.validate(base_config(model="llama-2-7b-shape", corpus="random-tokens", seq_len=4096))
    with pytest.raises(ValueError, match="seq_len=4097.*context of 4096"):
        runs.validate(base_config(model="llama-2-7b-shape", corpus="random-tokens", seq_len=4097))
    runs.validate(base_config(model="mistral-7b-shape", corpus="random-tokens", seq_len=32768))
    assert models.context_length("llama-3.2-1b-shape") == 131072
    assert models.context_length("tiny-llama-shape") == 1024


def test_synthetic_models_and_random_tokens_go_together():
    with pytest.raises(ValueError, match="corpus='pydoc'.*model='llama-2-7b-shape'.*'random-tokens'"):
        runs.validate(base_config(model="llama-2-7b-shape"))
    with pytest.raises(ValueError, match="corpus='random-tokens'.*model='smollm2-135m'"):
        runs.validate(base_config(corpus="random-tokens"))


def test_unknown_model_lists_synthetic_names():
    with pytest.raises(ValueError) as e:
        models.check_model_name("llama-2-7b")
    assert "llama-2-7b-shape" in str(e.value) and "smollm2-135m" in str(e.value)


def test_shard_plan_bounds_shard_size():
    shapes = {"a": (4, 4), "b": (4, 4), "c": (100,), "d": (1,)}
    assert models._shard_plan(shapes, 64) == [["a", "b"], ["c"], ["d"]]  # c (200 B) alone: larger than a shard
    assert models._shard_plan(shapes, 10**6) == [["a", "b", "c", "d"]]


def test_written_checkpoint_is_seeded_sharded_and_loads_like_a_real_one(cache, tmp_path):
    from safetensors.torch import load_file

    path = models.fetch_synthetic("tiny-llama-shape", quiet=True)
    assert path == cache / "tiny-llama-shape" and [p.name for p in cache.iterdir()] == ["tiny-llama-shape"]
    source = json.loads((path / "qlora_study_source.json").read_text())
    assert source["synthetic"] is True and source["seed"] == models.SYNTHETIC_SEED
    index = json.loads((path / "model.safetensors.index.json").read_text())
    one = {}
    for f in sorted(set(index["weight_map"].values())):
        one.update(load_file(path / f))
    assert set(one) == set(index["weight_map"]) and all(t.dtype == torch.bfloat16 for t in one.values())
    emb = one["model.embed_tokens.weight"].float()
    assert emb.shape == (512, 64) and abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    assert torch.equal(one["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    # the same tensors whatever the sharding (each tensor has its own seeded generator)
    small = models.write_synthetic("tiny-llama-shape", tmp_path / "small", shard_bytes=40_000, device="cpu")
    shards = sorted(small.glob("*.safetensors"))
    assert len(shards) > 3 and all(s.stat().st_size < 40_000 + 70_000 for s in shards)
    other = {}
    for s in shards:
        other.update(load_file(s))
    assert set(other) == set(one) and all(torch.equal(other[k], one[k]) for k in one)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("small.")]  # no temp folder left

    net, tok, info = models.load_model("tiny-llama-shape", quant="nf4", dtype="float32")
    assert tok is None and info["synthetic"] is True and info["model_source"] == str(path)
    assert info["params_total"] == sum(t.numel() for t in one.values())


def test_random_tokens_are_exactly_what_the_run_consumes():
    cfg = base_config(model="tiny-llama-shape", corpus="random-tokens", seq_len=32, max_steps=5, batch_size=3,
                      grad_accum=2, eval_blocks=0)
    run = {"metrics": {}}
    train, evals = data.prepare(cfg, None, run)
    assert train.shape == (5 * 3 * 2, 32) and evals.shape == (data.SYNTHETIC_EVAL_BLOCKS, 32)
    assert 0 <= int(train.min()) and int(train.max()) < 512 and len(train.unique()) > 400  # uniform over the vocab
    assert run["metrics"]["train_docs"] is None and run["metrics"]["eval_blocks_scored"] == 16
    train1, evals1 = data.prepare({**cfg, "seed": 1}, None)
    assert not torch.equal(train, train1) and torch.equal(evals, evals1)  # eval blocks do not follow the seed


def test_summary_table_never_calls_synthetic_perplexity_quality():
    run = {"run_id": "x", "status": "ok", "metrics": {"synthetic": True, "ppl_before": 510.0, "ppl_after": 509.0}}
    labels = list(runs.summary_table(run).index)
    assert "perplexity before (synthetic: not quality)" in labels and "perplexity before" not in labels
    run["metrics"]["synthetic"] = False
    assert "perplexity before" in list(runs.summary_table(run).index)


@pytest.mark.slow
def test_notebook_runs_a_synthetic_shape(tmp_path, cache):
    out = tmp_path / "runs"
    papermill.execute_notebook(
        str(TRAIN_NOTEBOOK), str(tmp_path / "run.ipynb"), progress_bar=False,
        parameters=dict(model="tiny-llama-shape", corpus="random-tokens", quant="nf4", max_steps=3, seq_len=32,
                        batch_size=2, eval_blocks=2, timing_warmup_steps=1, warmup_steps=1, output_dir=str(out)))
    [sidecar] = list(out.glob("*.json"))
    r = json.loads(sidecar.read_text())
    assert r["status"] == "ok" and r["config"]["corpus"] == "random-tokens"
    m = r["metrics"]
    assert m["synthetic"] is True and m["train_docs"] is None and m["train_blocks"] == 3 * 2
    assert m["vram_budget_emulated"] is False and m["fetch_s"] > 0 and m["load_s"] > 0
    assert all(m[k] is not None and math.isfinite(m[k]) for k in ("ppl_before", "ppl_after", "tokens_per_s"))
    assert m["energy_j_per_1k_tokens"] is None and m["peak_reserved_gib"] is None  # CPU: absent, not zero
    assert len(r["history"]) == 3
    text = (tmp_path / "run.ipynb").read_text()
    assert "not a quality figure" in text and "synthetic: random weights, cost figures only" in text


def test_gpu_sweep_file_is_valid_and_keeps_the_claim_rows():
    from helpers.sweeps import sweep

    s = sweep.load_sweep(sweep.PROJECT_ROOT / "parameters" / "gpu-7b.yaml", reports_root="/nonexistent")
    configs = sweep.expand(s)
    for c in configs:  # the budget needs a GPU; everything else is checked here
        runs.validate({**c, "vram_budget_gib": 0.0})
    cells = {(c["quant"], c["vram_budget_gib"], c["batch_size"]) for c in configs}
    assert ("none", 6.0, 4) in cells and ("nf4", 6.0, 1) in cells  # 16-bit at 6 GiB (the OOM row); NF4 at 6 GiB
    assert {c["quant"] for c in configs} == set(models.QUANTS)
    assert all(c["max_steps"] - c["timing_warmup_steps"] >= 10 for c in configs)  # >= 10 timed steps
    assert all(c["model"] == "llama-2-7b-shape" and c["corpus"] == "random-tokens" for c in configs)
