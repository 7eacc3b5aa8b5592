"""parameters/multi-gpu.yaml's dry run and the per-GPU memory prediction it prints (helpers.fit.predict_per_gpu)."""
import pytest

from helpers import fit
from helpers.records import registry
from helpers.sweeps import sweep
from helpers.records.paths import PROJECT_ROOT

SEVENTY_B = "llama-3.1-70b-shape"
# Llama-3.1-70B's config.json values, for a branch whose registry does not have the shape yet (the other issue-19
# branch adds it; after the merge the registry's own entry is used)
SEVENTY_B_CONFIG = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


@pytest.fixture
def seventy_b(monkeypatch):
    if SEVENTY_B not in registry.SYNTHETIC:
        monkeypatch.setitem(registry.SYNTHETIC, SEVENTY_B, {"shape_of": "meta-llama/Llama-3.1-70B",
                                                            "config": SEVENTY_B_CONFIG, "stored": "nf4"})


CFG = dict(model="llama-2-7b-shape", quant="nf4", seq_len=2048, batch_size=1, lora_r=16, vram_budget_gib=24.0)


def test_one_gpu_without_offload_is_the_single_gpu_prediction():
    assert fit.predict_per_gpu(CFG, 1, False) == {**fit.predict(CFG), "num_gpus": 1, "host_offload_gib": 0.0}


def test_fsdp_divides_the_sharded_terms_and_not_the_activations():
    one, two, four = (fit.predict_per_gpu(CFG, n) for n in (1, 2, 4))
    sharded = sum(one[k] for k in fit.SHARDED)
    gathered = fit.FSDP_GATHERED_LAYERS * one["weights_gib"] / 32  # Llama-2-7B: 32 layers
    assert two["needs_under_cap_gib"] == pytest.approx(one["needs_under_cap_gib"] - sharded / 2 + gathered)
    assert four["needs_under_cap_gib"] == pytest.approx(one["needs_under_cap_gib"] - 3 * sharded / 4 + gathered)
    assert two["activations_gib"] == one["activations_gib"]  # each GPU its own micro-batch


def test_cpu_offload_moves_the_sharded_terms_to_host_memory():
    one, off = fit.predict_per_gpu(CFG, 1), fit.predict_per_gpu(CFG, 2, cpu_offload=True)
    sharded = sum(one[k] for k in fit.SHARDED)
    assert off["host_offload_gib"] == pytest.approx(sharded / 2)
    assert off["needs_under_cap_gib"] < fit.predict_per_gpu(CFG, 2)["needs_under_cap_gib"]
    assert off["needs_under_cap_gib"] > one["needs_under_cap_gib"] - sharded  # the gathered layers stay on the GPU


@pytest.mark.parametrize("n", [0, 1.5, True])
def test_num_gpus_must_be_a_whole_number(n):
    with pytest.raises(ValueError, match="num_gpus"):
        fit.predict_per_gpu(CFG, n)


def test_the_multi_gpu_dry_run_shows_the_plan_and_the_prediction_per_gpu(seventy_b, capsys, tmp_path):
    states = sweep.run_sweep(PROJECT_ROOT / "parameters" / "multi-gpu.yaml", dry_run=True, reports_root=tmp_path)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  [")]
    assert len(states) == len(lines) == 20
    assert all("| pred " in line and "GiB/GPU" in line for line in lines)
    assert "a prediction, not a measurement" in out
    seventy = [line for line in lines if SEVENTY_B in line]
    assert len(seventy) == 8
    # 70B on 2 x 24 GiB: over without offload, fits with it at 512 tokens (the study's question, predicted)
    assert "over 24 GiB" in next(x for x in seventy if "s512" in x and "num_gpus=2 fsdp_cpu_offload=False" in x)
    assert "fits 24 GiB" in next(x for x in seventy if "s512" in x and "num_gpus=2 fsdp_cpu_offload=True" in x)
    assert not (tmp_path / "multi-gpu").exists()


def test_under_a_budget_the_cap_is_applied_per_gpu_after_the_shards_are_taken_out(seventy_b):
    """The 70B shape on 2 GPUs with offload under a 24 GiB cap: predict() caps the whole model's reserve at the budget
    before the shards come out, which left -18 GiB of reserve per GPU in reports/fit/validation.csv."""
    cfg = dict(model=SEVENTY_B, quant="nf4", seq_len=512, batch_size=1, eval_blocks=2)
    free, capped = (fit.predict_per_gpu({**cfg, "vram_budget_gib": b}, 2, cpu_offload=True) for b in (0.0, 24.0))
    assert capped["peak_reserved_gib"] >= capped["peak_allocated_gib"] > 0
    assert capped["peak_reserved_gib"] == pytest.approx(min(free["peak_reserved_gib"], 24.0))
    assert capped["peak_process_gib"] == pytest.approx(capped["peak_reserved_gib"] + capped["outside_torch_gib"])
    assert capped["needs_under_cap_gib"] == pytest.approx(free["needs_under_cap_gib"])
