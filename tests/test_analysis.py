"""The analysis of a sweep folder: corrupt entries are marked and skipped, takeaways follow the data,
charts without data say why. Fake sweeps are written with helpers.training.runs.write_sidecar, like real runs."""
import copy
import json
import math

import nbformat
import pandas as pd
import plotly.graph_objects as go
import pytest

from helpers import analysis
from helpers.training import runs

BASE_CONFIG = {
    "model": "smollm2-135m", "quant": "nf4", "dtype": "auto", "double_quant": True, "corpus": "pydoc",
    "seq_len": 256, "eval_fraction": 0.1, "eval_blocks": 16, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
    "target_modules": "all-linear", "gradient_checkpointing": True, "max_steps": 10, "batch_size": 2,
    "grad_accum": 1, "learning_rate": 2e-4, "warmup_steps": 3, "optimizer": "adamw_torch", "seed": 0,
    "timing_warmup_steps": 3, "vram_budget_gib": 0.0, "device": "auto", "output_dir": "reports/fake/runs",
    "run_id": "",
}
QUANT_SPEED = {"none": 1.0, "int8": 0.55, "nf4": 0.8, "fp4": 0.78}  # relative tokens/s, made up but plausible
QUANT_BYTES = {"none": 2.0, "int8": 1.0, "nf4": 0.55, "fp4": 0.55}


def fake_record(gpu: bool, status: str = "ok", steps: int = 10, synthetic: bool = False, **cfg) -> dict:
    """A sidecar record shaped like the training notebook's, with made-up but self-consistent numbers."""
    config = {**BASE_CONFIG, **cfg}
    if synthetic:
        config.update(model="llama-2-7b-shape", corpus="random-tokens")
    q, r = config["quant"], config["lora_r"]
    big = 6.7e9 if synthetic else 1.345e8
    tps = (2400.0 if gpu else 52.0) * QUANT_SPEED[q] * (1 - 0.002 * r) * (0.25 if synthetic else 1)
    tokens = config["batch_size"] * (config["seq_len"] - 1)
    weights = big * QUANT_BYTES[q] / 2**30
    ppl_before = (24.9 + {"none": 0.0, "int8": 0.05, "nf4": 0.4, "fp4": 0.7}[q]) * (400 if synthetic else 1)
    history = []
    for s in range(1, steps + 1):
        row = {"step": s, "step_time_s": tokens / tps * (1.3 if s == 1 else 1.0), "tokens": tokens,
               "loss": 3.1 - 0.02 * s * (1 + r / 64) - (0.05 if q == "none" else 0.0) if s < steps else None,
               "learning_rate": 2e-4, "power_w": 250.0 if gpu else None, "rss_gib": 1.6 + 0.001 * s,
               "allocated_gib": weights + 0.5 if gpu else None, "reserved_gib": weights + 0.9 if gpu else None,
               "nvml_process_used_gib": weights + 1.4 if gpu else None,
               "nvml_device_used_gib": weights + 1.5 if gpu else None}
        history.append(row)
    train_s = sum(h["step_time_s"] for h in history)
    metrics = {
        "load_s": 4.0 + weights, "dtype_resolved": "bfloat16" if gpu else "float32", "params_total": big,
        "weights_gib": weights, "eval_before_s": 20.0 if not gpu else 1.5, "ppl_before": ppl_before,
        "params_trainable": 2442240 * r / 8, "train_s": train_s, "steps": steps, "tokens_trained": tokens * steps,
        "tokens_per_s": tps, "step_time_median_s": tokens / tps, "peak_rss_gib": 1.9 + 0.01 * r,
        "peak_allocated_gib": weights + 0.6 + 0.01 * r if gpu else None,
        "peak_reserved_gib": weights + 1.0 + 0.01 * r if gpu else None,
        "energy_j": 250.0 * train_s if gpu else None, "energy_source": "nvml_counter" if gpu else None,
        "energy_j_per_1k_tokens": 250.0 * train_s / (tokens * steps) * 1000 if gpu else None,
        "eval_after_s": 17.0 if not gpu else 1.2,
        "ppl_after": ppl_before * (0.95 - 0.0005 * r) if status == "ok" else None,
    }
    if synthetic:
        metrics["synthetic"] = True
    error = None
    if status == "oom":
        error = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        metrics = {k: metrics[k] for k in ("load_s", "weights_gib", "peak_allocated_gib", "peak_reserved_gib")}
        history = history[:2]
    elif status == "error":
        error = "RuntimeError: something in the model broke"
        metrics, history = {"load_s": metrics["load_s"]}, []
    env = {"python": "3.11.7", "platform": "Linux", "cpu_count": 2, "torch": "2.13.0", "transformers": "5.24.0",
           "peft": "0.21.2", "bitsandbytes": "0.50.2", "accelerate": "1.15.0",
           "device": "cuda" if gpu else "cpu", "device_name": "NVIDIA H200" if gpu else "x86_64",
           "device_total_gib": 139.8 if gpu else None}
    return {"run_id": runs.run_id(config), "status": status, "error": error, "device": env["device"],
            "config": config, "environment": env, "metrics": metrics, "history": history}


def write_run(folder, record, notebook: bool = True):
    runs_dir = folder / "runs"
    runs.write_sidecar(runs_dir / f"{record['run_id']}.json", record)
    if notebook:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"run {record['run_id']}")])
        nbformat.write(nb, str(runs_dir / f"{record['run_id']}.ipynb"))
    return record["run_id"]


def make_sweep(folder, gpu: bool = False, faults: bool = True, synthetic: bool = False):
    """A sweep folder: none/nf4 x r8/r32 ok; with faults, one oom, one error, one truncated sidecar and one
    truncated run notebook; on a 'gpu', also a 6 GiB budget where 16-bit runs go out of memory."""
    ids = {}
    for q in ("none", "nf4"):
        for r in (8, 32):
            ids[(q, r)] = write_run(folder, fake_record(gpu, quant=q, lora_r=r))
            if gpu:
                status = "oom" if q == "none" else "ok"
                write_run(folder, fake_record(gpu, status=status, quant=q, lora_r=r, vram_budget_gib=6.0))
    if synthetic:
        for r in (8, 16):
            write_run(folder, fake_record(gpu, synthetic=True, quant="nf4", lora_r=r))
    if faults:
        ids["oom"] = write_run(folder, fake_record(gpu, status="oom", quant="none", lora_r=64))
        ids["error"] = write_run(folder, fake_record(gpu, status="error", quant="fp4", lora_r=8))
        good = json.dumps(fake_record(gpu, quant="int8", lora_r=8))
        (folder / "runs" / "truncated-run.json").write_text(good[: len(good) // 2])  # a sidecar cut mid-write
        nb = folder / "runs" / f"{ids[('nf4', 32)]}.ipynb"
        nb.write_text(nb.read_text()[:40])  # the run's notebook cut mid-write; its sidecar is fine
    return ids


@pytest.fixture
def cpu_sweep(tmp_path):
    folder = tmp_path / "cpu-sweep"
    return folder, make_sweep(folder)


def test_corrupt_sidecar_and_notebook_are_marked_and_the_rest_loads(cpu_sweep):
    folder, ids = cpu_sweep
    summary, history = analysis.load_sweep(folder)
    by_id = summary.set_index("run_id")
    assert by_id.loc["truncated-run", "status"] == "corrupt"
    assert "truncated-run.json" in by_id.loc["truncated-run", "error"]
    assert by_id.loc[ids[("nf4", 32)], "notebook"] == "corrupt"
    assert "not a readable notebook" in by_id.loc[ids[("nf4", 32)], "notebook_error"]
    assert by_id.loc[ids[("nf4", 32)], "status"] == "ok"  # its sidecar still counts
    assert by_id.loc[ids[("none", 8)], "notebook"] == "ok"
    assert by_id.loc[ids["oom"], "status"] == "oom" and "out of memory" in by_id.loc[ids["oom"], "error"]
    assert by_id.loc[ids["error"], "status"] == "error"
    assert sorted(summary["status"]) == ["corrupt", "error", "ok", "ok", "ok", "ok", "oom"]
    assert set(history["run_id"]) == {ids[k] for k in [("none", 8), ("none", 32), ("nf4", 8), ("nf4", 32), "oom"]}
    assert {"quant", "lora_r", "config", "status"} <= set(history.columns)
    line = analysis.overview(summary)
    assert "1 corrupt" in line and "4 ok" in line and "1 executed run notebook(s) unreadable" in line
    table = analysis.run_table(summary).set_index("run_id")
    assert table.loc["truncated-run", "status"] == "corrupt" and "truncated-run.json" in table.loc["truncated-run", "error"]
    assert table.loc[ids[("nf4", 32)], "notebook"] == "corrupt"
    assert "not a readable notebook" in table.loc[ids[("nf4", 32)], "error"]
    assert set(table["memory budget"]) == {"whole device"}  # vram_budget_gib 0 is no cap, not "0.0"


def test_summary_csv_marks_corrupt_sidecar_and_goes_on(cpu_sweep):
    import pandas as pd

    folder, ids = cpu_sweep
    df = pd.read_csv(runs.write_summary(folder))
    assert len(df) == 7
    assert df.set_index("run_id").loc["truncated-run", "status"] == "corrupt"
    assert (df["status"] == "ok").sum() == 4


def test_notebook_without_sidecar_is_unfinished_or_corrupt(tmp_path):
    folder = tmp_path / "s"
    write_run(folder, fake_record(False))
    nbformat.write(nbformat.v4.new_notebook(), str(folder / "runs" / "killed-run.ipynb"))
    (folder / "runs" / "broken-run.ipynb").write_text('{"cells": [')
    summary, _ = analysis.load_sweep(folder)
    status = summary.set_index("run_id")["status"]
    assert status["killed-run"] == "unfinished" and status["broken-run"] == "corrupt"


def test_missing_folder_is_refused_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-sweep"):
        analysis.load_sweep(tmp_path / "no-such-sweep")


def test_relative_sweep_dir_resolves_against_project_root():
    with pytest.raises(FileNotFoundError) as e:
        analysis.resolve_sweep_dir("reports/does-not-exist")
    assert str(analysis.PROJECT_ROOT / "reports" / "does-not-exist") in str(e.value)


def test_config_labels_name_only_what_varies(cpu_sweep):
    folder, ids = cpu_sweep
    summary, _ = analysis.load_sweep(folder)
    labels = set(summary["config"].dropna())
    assert {"none · r8", "nf4 · r32", "fp4 · r8", "none · r64"} <= labels
    assert summary.loc[summary["run_id"] == "truncated-run", "config"].isna().all()


def test_cpu_sweep_charts_and_skips(cpu_sweep):
    folder, _ = cpu_sweep
    summary, history = analysis.load_sweep(folder)
    fig, line = analysis.energy_per_token(summary)
    assert fig is None and "CPU" in line and "absent, not zero" in line
    fig, line = analysis.peak_memory(summary)
    assert isinstance(fig, go.Figure) and "resident" in line  # CPU: peak RSS, not torch/NVML
    assert [t.name for t in fig.data] == ["weights after load", "peak resident memory (process, CPU)"]
    fig, line = analysis.feasibility_matrix(summary)
    assert "4 of 6 runs trained, 1 ran out of memory, 1 failed with another error" in line
    for chart in (analysis.throughput, analysis.perplexity_vs_rank, analysis.cost_quality):
        fig, line = chart(summary)
        assert isinstance(fig, go.Figure) and line, chart.__name__
    fig, line = analysis.throughput(summary)
    assert "speed vs 16-bit LoRA in the same configuration: nf4 0.80x" in line  # the fake sweep's QUANT_SPEED
    fig, line = analysis.perplexity_vs_rank(summary)
    assert "Q4_1" in line  # smollm2-135m's quality caveat travels with its numbers
    fig, line = analysis.loss_curves(history)
    assert isinstance(fig, go.Figure)


def test_takeaways_are_computed_from_the_data(tmp_path):
    folder = tmp_path / "s"
    make_sweep(folder, faults=False)
    summary, history = analysis.load_sweep(folder)
    before = {c.__name__: c(summary)[1] for c in analysis.CHARTS}
    assert analysis.throughput(summary)[1].startswith("none · r8 is fastest")
    assert analysis.perplexity_vs_rank(summary)[1].startswith("Lowest perplexity after training: none at r32")

    # change the data: make nf4 r32 the fastest and the best, and give it the smallest memory peak
    path = next(p for p in (folder / "runs").glob("*.json") if "-nf4-r32-" in p.name)
    rec = json.loads(path.read_text())
    rec["metrics"].update(tokens_per_s=500.0, ppl_after=5.0, train_s=1.0, peak_rss_gib=0.5)
    runs.write_sidecar(path, rec)
    summary, _ = analysis.load_sweep(folder)
    after = {c.__name__: c(summary)[1] for c in analysis.CHARTS}
    assert analysis.throughput(summary)[1].startswith("nf4 · r32 is fastest at 500.0 tokens/s")
    assert analysis.perplexity_vs_rank(summary)[1].startswith("Lowest perplexity after training: nf4 at r32, 5.000")
    assert analysis.peak_memory(summary)[1].startswith("nf4 · r32 needs the least memory: 0.50 GiB")
    assert "nf4 · r32 is fastest (1 s, ppl 5.000)" in analysis.cost_quality(summary)[1]
    changed = [k for k in before if before[k] != after[k]]
    assert set(changed) == {"peak_memory", "throughput", "perplexity_vs_rank", "cost_quality"}


def test_loss_takeaway_follows_the_losses(tmp_path):
    folder = tmp_path / "s"
    make_sweep(folder, faults=False)
    _, history = analysis.load_sweep(folder)
    line = analysis.loss_curves(history)[1]
    assert line.startswith("Loss fell most for none · r32") or line.startswith("Loss fell most for nf4 · r32")
    path = next(p for p in (folder / "runs").glob("*.json") if "-none-r8-" in p.name)
    rec = json.loads(path.read_text())
    for i, h in enumerate(rec["history"]):
        h["loss"] = 9.0 - i if h["loss"] is not None else None
    runs.write_sidecar(path, rec)
    _, history = analysis.load_sweep(folder)
    assert analysis.loss_curves(history)[1].startswith("Loss fell most for none · r8: 8.000 → ")


def test_gpu_sweep_has_every_chart_and_a_quant_dropdown(tmp_path):
    folder = tmp_path / "gpu"
    make_sweep(folder, gpu=True, synthetic=True)
    summary, history = analysis.load_sweep(folder)
    for chart in analysis.CHARTS:
        fig, line = chart(summary)
        assert isinstance(fig, go.Figure), (chart.__name__, line)
    fig, line = analysis.feasibility_matrix(summary)
    assert "at the smallest budget (6 GiB) 2 of 4 configurations fit (smollm2-135m · nf4 · r8, smollm2-135m · nf4 · r32)" in line
    fig, line = analysis.peak_memory(summary)
    assert [t.name for t in fig.data][1:] == ["peak allocated (torch)", "peak reserved (torch)",
                                             "peak process used (NVML, step ends)"]  # NVML peak from the step rows
    assert "NVML" in line

    # telemetry's process estimate (reserved + non-torch): charted; the takeaway's measure once all configs have it
    oks = [p for p in (folder / "runs").glob("*.json") if p.stem != "truncated-run" and '"status": "ok"' in p.read_text()]
    for i, path in enumerate(oks):
        rec = json.loads(path.read_text())
        rec["metrics"]["peak_process_est_gib"] = rec["metrics"]["peak_reserved_gib"] + 0.74 if i else 0.25
        runs.write_sidecar(path, rec)
        fig, line = analysis.peak_memory(analysis.load_sweep(folder)[0])
        assert fig.data[-1].name == "peak process, estimated (reserved + non-torch)"
        if i == 0:  # one configuration has it: the takeaway stays with NVML, which all have
            assert "estimated" not in line and "NVML" in line, line
    assert "needs the least memory: 0.25 GiB peak process, estimated" in line
    fig, line = analysis.energy_per_token(summary)
    assert "J per 1k tokens" in line
    fig, line = analysis.cost_quality(summary)
    assert len(fig.layout.annotations) == 2 and "energy front" in line  # time and energy panels
    fig, line = analysis.perplexity_vs_rank(summary)
    assert "2 synthetic run(s) left out" in line
    assert not any("llama-2-7b-shape" in (t.name or "") for t in fig.data)
    fig, line = analysis.loss_curves(history)
    assert "2 synthetic run(s) left out" in line
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels == ["all quantizations", "quant none", "quant nf4"]
    nf4 = fig.layout.updatemenus[0].buttons[2].args[0]["visible"]
    assert [t.meta for t, v in zip(fig.data, nf4) if v] == ["nf4"] * sum(nf4)


def test_charts_without_data_are_skipped_with_a_sentence(tmp_path):
    folder = tmp_path / "synthetic-only"
    for r in (8, 16):
        write_run(folder, fake_record(True, synthetic=True, quant="nf4", lora_r=r))
    summary, history = analysis.load_sweep(folder)
    fig, line = analysis.perplexity_vs_rank(summary)
    assert fig is None and "every finished run is synthetic" in line
    fig, line = analysis.cost_quality(summary)
    assert fig is None and "synthetic" in line
    fig, line = analysis.loss_curves(history)
    assert fig is None and "synthetic" in line
    assert isinstance(analysis.energy_per_token(summary)[0], go.Figure)  # energy depends on shapes: kept

    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    summary, history = analysis.load_sweep(empty)
    assert analysis.overview(summary) == "This sweep folder has no runs yet."
    for chart in analysis.CHARTS:
        fig, line = chart(summary)
        assert fig is None and line.startswith("No "), chart.__name__
    assert analysis.loss_curves(history)[0] is None


def test_gpu_without_energy_counter_says_so(tmp_path):
    folder = tmp_path / "s"
    rec = fake_record(True)
    rec["metrics"].update(energy_j=None, energy_j_per_1k_tokens=None, energy_source=None)
    write_run(folder, rec)
    summary, _ = analysis.load_sweep(folder)
    fig, line = analysis.energy_per_token(summary)
    assert fig is None and "cuda" in line and "neither an energy counter nor power samples" in line


def test_report_renderer_adds_no_script_from_anywhere():
    analysis.use_report_renderer()
    import plotly.io as pio

    bundle = pio.renderers._build_mime_bundle(go.Figure(go.Bar(x=[1], y=[2])).to_dict())
    assert "application/vnd.plotly.v1+json" in bundle  # JupyterLab renders this one
    html = bundle["text/html"]
    assert "Plotly.newPlot" in html and "<script src" not in html and "mathjax" not in html.lower()
    assert len(html) < 20_000  # no plotly.js per figure


def test_plan_status_counts_the_planned_runs_with_a_result_and_names_what_is_missing(tmp_path):
    import pandas as pd
    import yaml

    from helpers.records.sidecars import write_plan
    from helpers.sweeps.sweep import expand, load_sweep

    spec = {"name": "plan", "base": {"model": "smollm2-135m", "max_steps": 4},
            "grid": {"quant": ["none", "nf4"], "lora_r": [4, 8]}, "repeats": 2}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "reports" / "plan"
    configs = expand(load_sweep(path, folder.parent))
    write_plan(folder, path, configs)  # what helpers.sweep records when the sweep starts: the analysis reads this
    ids = {(c["quant"], c["lora_r"], c["seed"]): c["run_id"] for c in configs}
    assert len(ids) == 8
    # every none run finished, one nf4 run failed, the other nf4 runs never ran; one run is from an older recipe
    rows = [{"run_id": rid, "status": "ok"} for (q, _, _), rid in ids.items() if q == "none"]
    rows += [{"run_id": ids[("nf4", 4, 0)], "status": "error"}, {"run_id": "old-recipe-run", "status": "ok"}]
    line = analysis.plan_status(folder, pd.DataFrame(rows), sweep_file=path)
    assert f"4 of the 8 runs that `{path}` plans have a result" in line
    assert "still to run: quant=nf4 (4)" in line and f"python -m helpers.sweep {path}" in line
    assert "1 run(s) here are not in it" in line
    rows = [{"run_id": rid, "status": "ok" if q == "none" else "oom"} for (q, _, _), rid in ids.items()]
    assert analysis.plan_status(folder, pd.DataFrame(rows), sweep_file=path) == f" All 8 runs that `{path}` plans have a result."
    # no sweep file of that name, or one that fills another folder: nothing to say
    assert analysis.plan_status(folder, pd.DataFrame(rows), sweep_file=tmp_path / "absent.yaml") == ""
    assert analysis.plan_status(tmp_path / "reports" / "other", pd.DataFrame(rows), sweep_file=path) == ""
    assert analysis.plan_status(tmp_path / "nowhere", pd.DataFrame(rows)) == ""


def test_lever_effects_compare_each_lever_with_the_plain_run_of_the_same_configuration(tmp_path):
    folder = tmp_path / "levers"
    arms = [  # (config, speed factor, reserved GiB added, energy factor)
        ({"quant": "nf4"}, 1.0, 0.0, 1.0),
        ({"quant": "nf4", "fused_kernels": True}, 1.5, -0.5, 0.7),
        ({"quant": "nf4", "torch_compile": True, "optimizer": "adamw_torch_fused"}, 2.2, 0.0, 0.5),
        ({"quant": "nf4", "offload_activations": True}, 0.8, -1.0, 1.2),
        ({"quant": "none"}, 1.0, 0.0, 1.0),
        ({"quant": "none", "gradient_checkpointing": False, "chunked_loss": 8}, 1.3, 2.0, 0.8),
        ({"quant": "nf4", "lora_r": 32, "fused_kernels": True}, 9.0, 0.0, 1.0),  # no plain r32 run: not compared
    ]
    for cfg, speed, mem, energy in arms:
        rec = fake_record(gpu=True, **cfg)
        m = rec["metrics"]
        m["tokens_per_s"] *= speed
        m["peak_reserved_gib"] += mem
        m["energy_j_per_1k_tokens"] *= energy
        if cfg["quant"] == "nf4":  # steady-state energy recorded (the none runs predate it: absent)
            m["energy_steady_j_per_1k_tokens"] = 100.0 * (0.4 if cfg.get("torch_compile") else energy)
        write_run(folder, rec)
    summary, _ = analysis.load_sweep(folder)
    table = analysis.lever_table(summary)
    steady = dict(zip(table["levers"], table["energy_steady_x"]))
    assert steady["torch_compile + optimizer=adamw_torch_fused"] == pytest.approx(0.4)  # not the window's 0.5
    assert steady["fused_kernels"] == pytest.approx(0.7)
    assert math.isnan(steady["chunked_loss=8 + gradient_checkpointing=False"])  # absent, not 0 or 1
    got = {(q, l): (round(x, 3), round(m, 3), round(e, 3)) for q, l, x, m, e in
           table[["quant", "levers", "speed_x", "reserved_vs_plain_gib", "energy_x"]].values}
    assert got == {
        ("nf4", "plain"): (1.0, 0.0, 1.0), ("nf4", "fused_kernels"): (1.5, -0.5, 0.7),
        ("nf4", "torch_compile + optimizer=adamw_torch_fused"): (2.2, 0.0, 0.5),
        ("nf4", "offload_activations"): (0.8, -1.0, 1.2),
        ("none", "plain"): (1.0, 0.0, 1.0), ("none", "chunked_loss=8 + gradient_checkpointing=False"): (1.3, 2.0, 0.8),
    }
    # with the steps: each lever's largest loss difference from its plain run (the fake losses differ by quant
    # and rank only, so every lever run here matches its plain run exactly); without them, no such column
    summary, history = analysis.load_sweep(folder)
    gaps = analysis.lever_table(summary, history)
    assert (gaps["loss_gap_pct"] == 0).all() and "loss_gap_pct" not in table
    fig, line = analysis.lever_effects(summary)
    assert fig is not None and len(fig.data) == 2  # one bar group per quant
    assert "fastest: nf4 · torch_compile + optimizer=adamw_torch_fused at 2.20x" in line
    assert "most memory saved: nf4 · offload_activations, 1.00 GiB" in line
    assert "slower than plain: nf4 · offload_activations (0.80x)" in line


def test_lever_effects_say_why_a_sweep_without_levers_has_no_comparison(tmp_path):
    folder = tmp_path / "plain"
    for q in ("none", "nf4"):
        write_run(folder, fake_record(gpu=True, quant=q))
    summary, _ = analysis.load_sweep(folder)
    assert analysis.lever_table(summary).empty
    fig, line = analysis.lever_effects(summary)
    assert fig is None and "No lever comparison" in line


def test_loss_gap_compares_the_steps_both_runs_logged():
    a = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 1.0}]
    b = [{"step": 1, "loss": 2.02}, {"step": 2, "loss": 1.005}, {"step": 3, "loss": None}]
    assert analysis.loss_gap(a, b) == pytest.approx(0.01)
    assert analysis.loss_gap(pd.DataFrame(a), pd.DataFrame(b)) == pytest.approx(0.01)  # history rows as a table
    assert analysis.loss_gap(a, []) is None


def test_lever_table_gives_each_levers_loss_gap_against_its_plain_run(tmp_path):
    folder = tmp_path / "levers"
    plain, fused = fake_record(gpu=True, quant="nf4"), fake_record(gpu=True, quant="nf4", fused_kernels=True)
    for h in fused["history"]:
        if h["step"] == 3:
            h["loss"] *= 1.02  # one step 2% off: the largest gap, not an average over the steps
    write_run(folder, plain)
    write_run(folder, fused)
    summary, history = analysis.load_sweep(folder)
    gaps = dict(zip(*analysis.lever_table(summary, history)[["levers", "loss_gap_pct"]].values.T))
    assert gaps["plain"] == 0 and gaps["fused_kernels"] == pytest.approx(2.0)


def test_plan_status_names_a_missing_lever_run_by_its_lever(tmp_path):
    # one lever run missing from a lever sweep: named by the lever that is on, not by the first setting that varies
    import pandas as pd
    import yaml

    from helpers.records.sidecars import write_plan
    from helpers.sweeps.sweep import expand, load_sweep

    spec = {"name": "levers", "base": {"model": "smollm2-135m", "max_steps": 4},
            "grid": [{"quant": ["nf4"]}, {"gradient_checkpointing": [False]}, {"tiled_mlp": [4]}, {"chunked_loss": [8]}]}
    path = tmp_path / "levers.yaml"
    path.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "reports" / "levers"
    configs = expand(load_sweep(path, folder.parent))
    write_plan(folder, path, configs)
    rows = [{"run_id": c["run_id"], "status": "ok"} for c in configs if not c.get("tiled_mlp")]
    line = analysis.plan_status(folder, pd.DataFrame(rows), sweep_file=path)
    assert "3 of the 4 runs" in line and "still to run: tiled_mlp=4 (1)" in line
