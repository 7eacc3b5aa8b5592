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
offload_overlap = load("offload_overlap")


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


def test_rounds_reverse_their_order():
    assert [fast_arm.round_order(["plain", "optimised", "peer"], i) for i in range(3)] == [
        ["plain", "optimised", "peer"], ["peer", "optimised", "plain"], ["plain", "optimised", "peer"]]


def _rec(tok, gib, joules, losses=(2.0, 1.5), status="ok"):
    return {"status": status, "metrics": {"tokens_per_s": tok, "peak_reserved_gib": gib, "energy_j_per_1k_tokens": joules,
                                          "energy_steady_j_per_1k_tokens": joules},
            "history": [{"step": s, "loss": v} for s, v in enumerate(losses, 1)]}


def test_three_arm_ratios_are_per_round_with_medians_and_each_arms_medians():
    figures = {  # round -> arm -> (tokens/s, reserved GiB, J / 1k tokens)
        0: {"plain": (100, 8.0, 10.0), "optimised": (150, 6.0, 8.0), "peer": (120, 5.0, 9.0)},
        1: {"plain": (110, 8.0, 10.0), "optimised": (176, 6.0, 8.0), "peer": (110, 5.0, 9.0)},
        2: {"plain": (90, 8.0, 10.0), "optimised": (180, 6.0, 8.0), "peer": (150, 5.0, 9.0)},
    }
    results = [{"quant": "nf4", "pair": i, "arm": arm, "record": _rec(*f)} for i, arms in figures.items()
               for arm, f in arms.items()]
    results.append({"quant": "nf4", "pair": 3, "arm": "plain", "record": _rec(1, 1, 1)})  # a round cut short: left out
    [row] = fast_arm.tabulate(results, ["nf4"], ["plain", "optimised", "peer"])
    assert [p["pair"] for p in row["pairs"]] == [0, 1, 2]
    speed = {name: [p["ratios"][name]["tokens_per_s_ratio"] for p in row["pairs"]] for name in row["median_ratios"]}
    assert speed["ours/plain"] == pytest.approx([1.5, 1.6, 2.0]) and speed["peer/plain"] == pytest.approx([1.2, 1.0, 150 / 90])
    assert speed["ours/peer"] == pytest.approx([1.25, 1.6, 1.2])
    assert row["median_ratios"]["ours/peer"]["tokens_per_s_ratio"] == pytest.approx(1.25)  # median of per-round ratios
    assert row["median_ratios"]["ours/peer"]["peak_reserved_ratio"] == pytest.approx(1.2)
    assert row["median_tokens_per_s_ratio"] == pytest.approx(1.6)  # the two-arm key: ours / plain
    assert row["arms"]["peer"] == {"runs_ok": 3, "median_tokens_per_s": 120, "median_peak_reserved_gib": 5.0,
                                   "median_energy_j_per_1k_tokens": 9.0}
    assert row["arms"]["plain"]["runs_ok"] == 4 and row["loss_gap_max"] == 0.0


@pytest.mark.slow
def test_three_arms_on_cpu_record_the_peer_that_cannot_load_and_go_on(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fa" / "peer.json"
    r = fast_arm.main(["--model", "tiny-llama-shape", "--device", "cpu", "--quants", "nf4", "--levers",
                       "keep_16bit,gradient_checkpointing=false", "--peer", "unsloth", "--rounds", "2", "--steps", "2",
                       "--warmup", "1", "--seq-len", "32", "--out", str(out)])
    assert [(x["pair"], x["arm"]) for x in r["runs"]] == [(0, "plain"), (0, "optimised"), (0, "peer"),
                                                          (1, "peer"), (1, "optimised"), (1, "plain")]
    assert {x["arm"]: x["status"] for x in r["runs"]} == {"plain": "ok", "optimised": "ok", "peer": "error"}
    assert r["peer"] == {"stack": "unsloth", "gradient_checkpointing": False}  # our arm's checkpointing, not our levers
    [row] = r["table"]
    assert row["arms"]["peer"]["runs_ok"] == 0 and row["median_ratios"]["peer/plain"]["tokens_per_s_ratio"] is None
    assert row["median_ratios"]["ours/plain"]["tokens_per_s_ratio"] > 0
    peer_run = json.loads((tmp_path / "fa" / "runs" / "peer" / f"{r['runs'][2]['run_id']}.json").read_text())
    assert peer_run["config"]["stack"] == "unsloth" and peer_run["config"]["gradient_checkpointing"] is False
    assert "needs a CUDA GPU and `pip install -e .[peer]`" in peer_run["error"]
    assert json.loads(out.read_text())["status"] == "ok"


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


def test_max_context_with_the_peer_on_a_cpu_says_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(max_context.peer, "_IMPORT", {})
    with pytest.raises(SystemExit) as e:
        max_context.main(["--model", "tiny-llama-shape", "--device", "cpu", "--stack", "unsloth", "--out",
                          str(tmp_path / "mc.json")])
    assert "--stack unsloth: stack 'unsloth' needs a CUDA GPU and `pip install -e .[peer]`" in str(e.value)
    assert not (tmp_path / "mc.json").exists()


def test_max_context_refuses_our_levers_with_the_peer(tmp_path, capsys):
    with pytest.raises(SystemExit):
        max_context.main(["--model", "tiny-llama-shape", "--device", "cpu", "--stack", "unsloth", "--tiled-mlp", "4",
                          "--out", str(tmp_path / "mc.json")])
    assert "--tiled-mlp=4 is not allowed: 0 with stack 'unsloth'" in capsys.readouterr().err


@pytest.mark.slow
def test_offload_overlap_runs_on_cpu_and_finds_the_same_bits(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    r = offload_overlap.main(["--model", "tiny-llama-shape", "--device", "cpu", "--batch-size", "2", "--seq-len", "32",
                              "--passes", "2", "--min-bytes", "0", "--out", str(tmp_path / "oo.json")])
    assert set(r["results"]) == {"off", "save_on_cpu", "overlapped"}
    assert all(x["same_bits"] and x["tokens_per_s"] > 0 for x in r["results"].values())
    assert json.loads((tmp_path / "oo.json").read_text())["status"] == "ok"
