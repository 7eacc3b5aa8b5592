"""Costs only where they are a run's own (issue 15): runs that shared the device show no speed or energy, cost
ratios are taken only between runs of one machine (host + boot id, GPU UUID where recorded), and a table that
mixes machines, or whose machines were not recorded, says so. Also: a parameter an old sidecar lacks takes the
notebook's default, so an old plain run and a new run with it on keep apart."""
import math

import pytest

from helpers import analysis
from test_analysis import fake_record, write_run

MACHINE_A = {"host": "gpu-a", "boot_id": "11111111-aaaa", "gpu_uuid": "GPU-aaaa"}
MACHINE_B = {"host": "gpu-a", "boot_id": "22222222-bbbb", "gpu_uuid": "GPU-aaaa"}  # the same host, rebooted


def run(folder, env=None, speed=1.0, **cfg):
    rec = fake_record(gpu=True, **cfg)
    rec["environment"].update(env or {})
    if env and "boot_id" in env:  # the same configuration on two machines: two runs (a sweep resumed elsewhere)
        rec["run_id"] += "-" + env["boot_id"][:4]
    rec["metrics"]["tokens_per_s"] *= speed
    rec["metrics"]["energy_j_per_1k_tokens"] /= speed
    write_run(folder, rec, notebook=False)
    return rec


def test_side_by_side_runs_show_no_speed_or_energy(tmp_path):
    for q in ("none", "nf4"):
        run(tmp_path / "s", {"side_by_side": 15, **MACHINE_A}, quant=q)
    summary, _ = analysis.load_sweep(tmp_path / "s")
    for chart in (analysis.throughput, analysis.energy_per_token, analysis.cost_quality):
        fig, line = chart(summary)
        assert fig is None and "shared the device" in line and "2 of 2 run(s) went up to 15 side by side" in line
    fig, line = analysis.peak_memory(summary)  # torch's per-process peaks still hold
    assert fig is not None and "peak reserved (torch)" in line
    assert not any(t.name.startswith("peak process") for t in fig.data)  # NVML's can hold the others' memory


def test_side_by_side_runs_are_left_out_of_a_mixed_sweep(tmp_path):
    run(tmp_path / "s", {"side_by_side": 1, **MACHINE_A}, quant="none")
    run(tmp_path / "s", {"side_by_side": 1, **MACHINE_A}, quant="nf4", speed=0.5)
    run(tmp_path / "s", {"side_by_side": 4, **MACHINE_A}, quant="nf4", lora_r=32, speed=9.0)
    summary, _ = analysis.load_sweep(tmp_path / "s")
    fig, line = analysis.throughput(summary)
    assert "nf4 · r32" not in line and "1 of 3 run(s) went up to 4 side by side" in line
    table = analysis.lever_table(summary)
    assert table.empty or table["tokens_per_s"].notna().all()


def test_cost_ratios_only_within_one_machine_and_mixing_is_flagged(tmp_path):
    folder = tmp_path / "levers"
    run(folder, MACHINE_A, quant="nf4")                            # plain on A
    run(folder, MACHINE_B, quant="nf4", speed=1.2)                 # plain on B: 20% faster machine
    run(folder, MACHINE_B, quant="nf4", speed=2.4, keep_16bit=True)  # lever on B
    summary, history = analysis.load_sweep(folder)
    t = analysis.lever_table(summary, history)
    lever = t[t["levers"] == "keep_16bit"].iloc[0]
    assert lever["speed_x"] == pytest.approx(2.0)  # against B's plain run only, not the median of A and B (2.18)
    assert lever["machine"].startswith("gpu-a · boot 22222222")
    assert lever["check"] == "cannot tell"  # the fake loss falls < 10%: no quality verdict
    fig, line = analysis.lever_effects(summary, t)
    assert "Mixed machines: these runs ran on 2 machines" in line
    assert "Mixed machines" in analysis.throughput(summary)[1]


def test_unrecorded_machines_are_said_to_be_unknown(tmp_path):
    run(tmp_path / "old", quant="none")  # fake_record's environment has no host or boot id: an old sidecar
    run(tmp_path / "old", quant="nf4", keep_16bit=True)
    summary, _ = analysis.load_sweep(tmp_path / "old")
    assert analysis.machine_labels(summary).isna().all()
    assert "Machine unknown for 2 of 2 run(s)" in analysis.throughput(summary)[1]
    one, _ = analysis.load_sweep(_one_machine(tmp_path / "new"))
    assert analysis.machines_note(one) == ""


def _one_machine(folder):
    run(folder, MACHINE_A, quant="none")
    run(folder, MACHINE_A, quant="nf4")
    return folder


def test_a_parameter_an_old_sidecar_lacks_takes_the_default(tmp_path):
    old = fake_record(gpu=True, quant="nf4")  # recorded before tiled_mlp existed: no such key
    new = fake_record(gpu=True, quant="nf4", tiled_mlp=4)
    for rec in (old, new):
        write_run(tmp_path / "s", rec, notebook=False)
    summary, _ = analysis.load_sweep(tmp_path / "s")
    assert summary["config"].nunique() == 2  # pandas' nunique skipped the missing value: one label for both
    assert sorted(summary["tiled_mlp"]) == [0, 4]
    assert not math.isnan(analysis.lever_table(summary).set_index("levers").loc["tiled_mlp=4", "speed_x"])


def test_throughput_gives_the_window_figure_beside_the_steps(tmp_path):
    for q, w in (("none", 0.9), ("nf4", 0.8)):
        rec = fake_record(gpu=True, quant=q)
        rec["metrics"]["tokens_per_s_window"] = rec["metrics"]["tokens_per_s"] * w
        write_run(tmp_path / "s", rec, notebook=False)
    summary, _ = analysis.load_sweep(tmp_path / "s")
    line = analysis.throughput(summary)[1]
    # fake speeds at r8: none 2361.6, nf4 1889.28 tokens/s over the steps; x 0.9 and x 0.8 over the window
    assert "none · r8 is fastest at 2361.6 tokens/s, 1.25x nf4 · r8 (1889.3 tokens/s)" in line
    assert "(over the whole window, between-step work included: 2125.4 and 1511.4 tokens/s)" in line


def test_lever_takeaway_without_a_speed_ratio_says_so_instead_of_nan(tmp_path):
    # The published lever check: the plain run and a lever ran side by side (no speed of their own), one lever
    # alone on another machine (a speed, but no plain run of its machine to divide by). No ratio exists.
    folder = tmp_path / "check"
    run(folder, {"side_by_side": 5, **MACHINE_A}, quant="nf4")
    run(folder, {"side_by_side": 5, **MACHINE_A}, quant="nf4", keep_16bit=True)
    run(folder, {"side_by_side": 1, **MACHINE_B}, quant="nf4", tiled_mlp=4, speed=0.5)
    summary, history = analysis.load_sweep(folder)
    t = analysis.lever_table(summary, history)
    assert t["speed_x"].isna().all()
    fig, line = analysis.lever_effects(summary, t)
    assert "nan" not in line.lower()
    assert "No speed ratio: no lever run has a plain run of its own machine, both run one at a time" in line
    assert "Equivalence" in line  # the quality check is still reported


def test_runs_on_several_gpus_say_what_their_memory_speed_and_energy_are(tmp_path):
    # reports/multi-gpu: an FSDP run's memory peaks are its fullest GPU's, its tokens/s and energy all GPUs' together;
    # a chart beside one-GPU runs must say so, or a reader compares a card with two
    run(tmp_path / "mg", MACHINE_A, quant="nf4")
    run(tmp_path / "mg", MACHINE_A, quant="nf4", num_gpus=2)
    summary, _ = analysis.load_sweep(tmp_path / "mg")
    for chart in (analysis.peak_memory, analysis.throughput, analysis.energy_per_token):
        fig, line = chart(summary)
        assert fig is not None and ("1 of 2 run(s) trained on 2 GPUs (num_gpus, FSDP): their memory is the fullest "
                                    "GPU's; their tokens/s and energy are all GPUs' together") in line
    one, _ = analysis.load_sweep(_one_machine(tmp_path / "one"))
    assert "num_gpus" not in analysis.peak_memory(one)[1]
