"""The analysis as a package: the sweep records its plan and the analysis reads it; the plain stack and the values of
parameters added later come from the registry and agree with notebook 01; each chart's row selection, figure and
takeaway can be called apart."""
import json

import pandas as pd
import plotly.graph_objects as go
import pytest
import yaml

from helpers import analysis
from helpers.records import sidecars
from helpers.sweeps import sweep
from helpers.analysis import cost, quality, rows
from helpers.records.registry import ADDED_LATER, LEVERS, PLAIN_STACK
from test_analysis import fake_record, make_sweep, write_run


def test_the_registry_plain_stack_and_later_parameters_are_the_notebooks_defaults():
    defaults = {k: p["default"] for k, p in sweep.notebook_parameters().items()}
    assert set(LEVERS) <= set(PLAIN_STACK) and set(LEVERS) <= set(ADDED_LATER)
    assert {k: defaults[k] for k in PLAIN_STACK} == PLAIN_STACK
    assert {k: defaults[k] for k in ADDED_LATER} == ADDED_LATER


def test_the_sweep_records_its_plan_before_the_first_run_and_dry_run_does_not(tmp_path, monkeypatch):
    spec = {"name": "planned", "base": {"max_steps": 4}, "grid": {"quant": ["none"], "lora_r": [4, 8]}, "repeats": 2}
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(spec))
    seen = []
    monkeypatch.setattr(sweep, "_run_one_at_a_time",
                        lambda sw, configs, *a: seen.append(sidecars.read_plan(sw["folder"])))
    sweep.run_sweep(path, dry_run=True, report=False, reports_root=tmp_path / "reports", out=open("/dev/null", "w"))
    assert sidecars.read_plan(tmp_path / "reports" / "planned") is None
    sweep.run_sweep(path, report=False, reports_root=tmp_path / "reports", out=open("/dev/null", "w"))
    plan = seen[0]  # written before any run started
    configs = sweep.expand(sweep.load_sweep(path, tmp_path / "reports"))
    assert [r["run_id"] for r in plan["runs"]] == [c["run_id"] for c in configs]
    assert plan["varying"] == ["lora_r", "seed"] and plan["sweep_file"] == str(path)
    assert "output_dir" not in plan["runs"][0]["config"]  # this machine's path is no part of the plan
    assert plan["runs"][1]["config"]["lora_r"] == configs[1]["lora_r"]


def test_plan_status_of_a_folder_without_a_plan_or_with_a_broken_one(tmp_path):
    folder = tmp_path / "old-report"
    write_run(folder, fake_record(False, quant="none", lora_r=8))
    summary, _ = analysis.load_sweep(folder)
    assert analysis.plan_status(folder, summary) == analysis.NO_PLAN  # published before plans were recorded
    assert "no plan record" in analysis.NO_PLAN
    (folder / sidecars.PLAN_FILE).write_text('{"runs": [')
    line = analysis.plan_status(folder, summary)
    assert line.startswith(" Its plan record cannot be read:") and "plan.json" in line
    sidecars.write_plan(folder, tmp_path / "s.yaml", [{"run_id": summary["run_id"][0], "quant": "none"},
                                                      {"run_id": "never-ran", "quant": "nf4"}])
    line = analysis.plan_status(folder, summary)
    assert "1 of the 2 runs that" in line and "still to run: quant=nf4 (1)" in line


def test_drawn_joins_a_selection_its_figure_and_its_takeaway():
    assert rows.drawn("No chart: why.", None, None) == (None, "No chart: why.")
    assert rows.drawn({"x": 2}, lambda s: s["x"] * 10, lambda s: f"x is {s['x']}.") == (20, "x is 2.")


def test_each_cost_chart_is_a_selection_a_figure_and_a_takeaway(tmp_path):
    folder = tmp_path / "gpu"
    make_sweep(folder, gpu=True)
    summary, _ = analysis.load_sweep(folder)
    sel = cost.feasibility_rows(summary)
    assert sel["budgets"] == [6.0, 0.0]  # capped budgets first, the whole device last
    cells = cost.feasibility_cells(sel)
    none_r8 = sel["configs"].index("none · r8")
    assert cells[none_r8][0][:2] == (cost.STATUS_CODE["oom"], "oom")
    assert cost.feasibility_takeaway(sel) == analysis.feasibility_matrix(summary)[1]
    sel = cost.memory_rows(summary)
    assert [c for c, _ in sel["bars"]][:1] == ["weights_gib"] and list(sel["medians"].index) == sel["runs"][
        "config"].drop_duplicates().tolist()
    assert isinstance(cost.memory_figure(sel), go.Figure)
    assert cost.memory_rows(summary.iloc[0:0]) == "No memory chart: no run in this sweep finished."


def make_seeds(folder, seeds=3):
    for q in ("none", "nf4"):
        for seed in range(seeds):
            rec = fake_record(False, quant=q, lora_r=8, seed=seed)
            for h in rec["history"]:
                if h["loss"] is not None:
                    h["loss"] += 0.1 * seed  # seeds apart: the band has a width
            write_run(folder, rec)


def test_loss_chart_draws_a_mean_and_a_band_per_configuration_and_hides_single_runs(tmp_path):
    folder = tmp_path / "seeds"
    make_seeds(folder)
    _, history = analysis.load_sweep(folder)
    sel = quality.loss_rows(history)
    assert len(sel["runs"]) == 6
    bands = {b["group"]: b for b in quality.loss_bands(sel)}
    assert set(bands) == {"none · r8", "nf4 · r8"} and bands["nf4 · r8"]["n"] == 3
    step1 = history[(history["config"] == "nf4 · r8") & (history["step"] == 1)]["loss"]
    assert bands["nf4 · r8"]["mean"][1] == pytest.approx(step1.mean())
    assert bands["nf4 · r8"]["hi"][1] - bands["nf4 · r8"]["lo"][1] == pytest.approx(0.2)
    fig = quality.loss_figure(sel)
    shown_now = [t for t in fig.data if t.visible is not False]
    assert len(shown_now) == 4  # two means and two bands; the six single runs wait behind the menu
    singles = fig.layout.updatemenus[1].buttons
    assert [b.label for b in singles] == ["single runs: all", "single runs: quant none", "single runs: quant nf4"]
    nf4_runs = singles[2].args[0]["visible"]
    assert sum(nf4_runs) == 3 and all(t.meta == "nf4" and "seed" in t.name for t, v in zip(fig.data, nf4_runs) if v)
    assert quality.loss_takeaway(sel) == analysis.loss_curves(history)[1]


def test_cost_quality_labels_only_the_front_and_names_every_point_on_hover(tmp_path):
    text, where = quality.point_labels(["a", "b", "c", "d"], ["a", "c", "d"])
    assert text == ["a", "", "c", "d"]
    assert where[0] != where[2] and where[2] != where[3]  # neighbours on the front on opposite sides
    folder = tmp_path / "s"
    make_sweep(folder, faults=False)
    summary, _ = analysis.load_sweep(folder)
    sel = quality.cost_quality_rows(summary)
    fig = quality.cost_quality_figure(sel)
    points = fig.data[0]
    assert list(points.customdata) == list(sel["medians"].index)  # hover names every configuration
    assert [t for t in points.text if t] == sel["fronts"]["train_s"]


def test_a_sweep_writes_summary_csv_once_and_its_report_reads_the_same_runs(tmp_path, monkeypatch):
    from helpers.sweeps import report

    spec = {"name": "once", "base": {"max_steps": 4}, "grid": {"quant": ["none"], "lora_r": [4]}}
    path = tmp_path / "once.yaml"
    path.write_text(yaml.safe_dump(spec))
    writes = []
    real = sidecars.write_summary
    monkeypatch.setattr(sweep, "write_summary", lambda folder: writes.append("sweep") or real(folder))
    monkeypatch.setattr(report, "write_summary", lambda folder: writes.append("report") or real(folder))
    monkeypatch.setattr(sweep, "_run_one_at_a_time", lambda sw, *a: (sw["folder"] / "runs").mkdir())
    monkeypatch.setattr(report, "execute_into", lambda nb, dest, *a, **k: dest.write_text("{}"))
    monkeypatch.setattr(report, "export_html", lambda nb, html, **k: html)
    sweep.run_sweep(path, reports_root=tmp_path / "reports", out=open("/dev/null", "w"))
    assert writes == ["sweep"]
    report.build_report(tmp_path / "reports" / "once")  # a report rebuilt on its own writes it itself
    assert writes == ["sweep", "report"]


def test_record_plan_gives_a_folder_filled_before_plans_its_plan_without_running(tmp_path):
    spec = {"name": "late", "base": {"max_steps": 4}, "grid": {"quant": ["none", "nf4"], "lora_r": [4]}}
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "reports" / "late"
    write_run(folder, fake_record(False, quant="none", lora_r=4, max_steps=4, output_dir=str(folder / "runs")))
    summary, _ = analysis.load_sweep(folder)
    assert analysis.plan_status(folder, summary) == analysis.NO_PLAN
    sweep.record_plan(path, tmp_path / "reports")
    assert not list((folder / "runs").glob("*nf4*"))  # nothing ran
    line = analysis.plan_status(folder, summary)
    assert "**1 of the 2 runs that" in line and "still to run: quant=nf4 (1)" in line


def test_a_loss_chart_of_many_configurations_opens_on_one_quantization(tmp_path):
    folder = tmp_path / "many"
    for q in ("none", "nf4"):
        for r in (4, 8, 16, 32, 64):
            for seed in range(2):
                write_run(folder, fake_record(False, quant=q, lora_r=r, seed=seed))
    _, history = analysis.load_sweep(folder)
    fig = analysis.loss_curves(history)[0]
    visible = [t for t in fig.data if t.visible is not False]
    assert len(visible) == 10 and {t.meta for t in visible} == {"none"}  # five means and five bands of 16-bit
    assert fig.layout.updatemenus[0].active == 1  # the menu shows 'quant none'
    assert fig.layout.updatemenus[0].buttons[0].label == "all quantizations"  # one click from every mean
