"""benchmarks/fast_arm.py (plain vs optimised, interleaved) and the max-context probe with levers: CPU smoke runs
of the whole scripts on the tiny shape, and their argument checks."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fast_arm = load("fast_arm")
max_context = load("max_context")


def test_lever_list_is_parsed_and_checked():
    assert fast_arm.parse_levers("fused_kernels, chunked_loss=8,gradient_checkpointing=false,optimizer=adamw_torch_fused") == {
        "fused_kernels": True, "chunked_loss": 8, "gradient_checkpointing": False, "optimizer": "adamw_torch_fused"}
    assert fast_arm.parse_levers("tiled_mlp=8,torch_compile") == {"tiled_mlp": 8, "torch_compile": True}
    with pytest.raises(SystemExit, match="unknown lever 'fused'"):
        fast_arm.parse_levers("fused")


def test_an_optimised_arm_with_nothing_on_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fast_arm.main(["--levers", "keep_16bit=false", "--out", str(tmp_path / "x.json")])
    assert "turns nothing on" in capsys.readouterr().err


@pytest.mark.slow
def test_fast_arm_runs_interleaved_pairs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fa" / "bench.json"
    r = fast_arm.main(["--model", "tiny-llama-shape", "--device", "cpu", "--quants", "nf4", "--levers",
                       "chunked_loss=4,keep_16bit", "--pairs", "2", "--steps", "3", "--warmup", "1",
                       "--seq-len", "64", "--out", str(out)])
    assert [(x["pair"], x["arm"]) for x in r["runs"]] == [(0, "plain"), (0, "optimised"), (1, "optimised"), (1, "plain")]
    assert all(x["status"] == "ok" for x in r["runs"])
    [row] = r["table"]
    assert row["median_tokens_per_s_ratio"] > 0 and row["loss_gap_max"] < 0.01
    assert json.loads(out.read_text())["table"][0]["quant"] == "nf4"
    # each command's runs in their own folder: a second command's plain arm (same run id) cannot overwrite them
    assert {p.name for p in (tmp_path / "fa" / "runs" / "bench").glob("*.json")} == {f"{x['run_id']}.json" for x in r["runs"]}


@pytest.mark.slow
def test_max_context_probe_runs_with_levers_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mc.json"
    max_context.main(["--model", "tiny-llama-shape", "--device", "cpu", "--max-seq", "256", "--chunked-loss", "4",
                      "--offload-activations", "--keep-16bit", "--tiled-mlp", "3", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["levers"] == {"fused_kernels": False, "torch_compile": False, "offload_activations": True,
                           "keep_16bit": True, "chunked_loss": 4, "tiled_mlp": 3}
    assert r["results"][0]["max_seq_len"] == 256 and all(p["ok"] for p in r["probes"])


def test_max_context_refuses_fused_kernels_on_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        max_context.main(["--model", "tiny-llama-shape", "--device", "cpu", "--fused-kernels", "--out",
                          str(tmp_path / "mc.json")])
    assert "--fused-kernels=True is not allowed: False on a CPU" in capsys.readouterr().err
