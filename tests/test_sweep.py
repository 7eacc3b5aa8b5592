import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.sweeps import sweep
from helpers.training.runs import read_all

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, spec, name="s.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec) if isinstance(spec, dict) else spec)
    return p


GOOD = {"name": "t", "base": {"max_steps": 5}, "grid": {"quant": ["none", "nf4"], "lora_r": [4, 8]}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown key(s) ['colour']"),
        ({"base": {"learning_rat": 1e-4}}, "unknown parameter 'learning_rat'"),
        ({"grid": {"lora_rank": [4]}}, "unknown parameter 'lora_rank'"),
        ({"grid": {"lora_r": ["8"]}}, "lora_r='8' is a str, the notebook expects int"),
        ({"base": {"gradient_checkpointing": 1}}, "expects bool"),
        ({"base": {"max_steps": True}}, "expects int"),
        ({"grid": {}}, "grid is empty"),
        ({"grid": None}, "grid is empty"),
        ({"grid": {"lora_r": []}}, "lora_r must be a non-empty list"),
        ({"grid": {"seed": [0, 1]}}, "seed is set by the runner (use repeats"),
        ({"repeats": 0}, "repeats=0"),
        ({"name": "../escape"}, "name='../escape'"),
        ({"notebook": "notebooks/nope.ipynb"}, "nope.ipynb not found"),
    ],
)
def test_bad_sweep_files_are_refused_naming_the_problem(tmp_path, change, message):
    spec = {**GOOD, **change}
    with pytest.raises(sweep.SweepError) as e:
        sweep.load_sweep(write(tmp_path, spec), reports_root=tmp_path)
    assert message in str(e.value)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(sweep.SweepError, match="not found"):
        sweep.load_sweep(tmp_path / "none.yaml")


def test_bad_value_for_a_run_is_refused_before_any_run(tmp_path, capsys):
    spec = {**GOOD, "grid": {"quant": ["nf4", "int3"]}}
    with pytest.raises(sweep.SweepError, match="quant='int3'"):
        sweep.run_sweep(write(tmp_path, spec), reports_root=tmp_path)
    assert not (tmp_path / "t").exists()  # nothing ran, nothing written


def test_expand_grid_union_and_seeds(tmp_path):
    spec = {"name": "t", "repeats": 2,
            "grid": [{"quant": ["none", "nf4"], "lora_r": [8]}, {"quant": ["nf4"], "lora_r": [8, 16]}]}
    configs = sweep.expand(sweep.load_sweep(write(tmp_path, spec), reports_root=tmp_path))
    cells = sorted({(c["quant"], c["lora_r"]) for c in configs})
    assert cells == [("nf4", 8), ("nf4", 16), ("none", 8)]  # (nf4, 8) once, though in both grids
    assert len(configs) == 3 * 2 and {c["seed"] for c in configs} == {0, 1}
    assert len({c["run_id"] for c in configs}) == 6
    assert all(c["output_dir"] == str(tmp_path / "t" / "runs") for c in configs)
    assert sweep.varying(configs) == ["quant", "lora_r", "seed"]


def test_dry_run_lists_runs(tmp_path, capsys):
    sweep.run_sweep(write(tmp_path, GOOD), dry_run=True, reports_root=tmp_path)
    out = capsys.readouterr().out
    assert "4 runs, 0 finished, 4 to run" in out and out.count("] run ") == 4
    assert not (tmp_path / "t").exists()


# --- end to end with a tiny model (papermill, fresh kernels) -------------------------------------

def tiny_sweep(tmp_path, tiny_model_dir, grid, name="tiny"):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "the quick brown fox jumps. " * 20 for i in range(20)))
    spec = {"name": name, "grid": grid,
            "base": {"model": str(tiny_model_dir), "corpus": str(corpus), "seq_len": 32, "max_steps": 2,
                     "batch_size": 2, "eval_blocks": 2, "timing_warmup_steps": 1, "warmup_steps": 1, "quant": "none"}}
    return write(tmp_path, spec, f"{name}.yaml")


def start(path, reports, *args, env=None):
    """`python -m helpers.sweep` as at a terminal: in its own process group, Ctrl-C (SIGINT) at its default, output
    captured; args: more flags. A suite started in the background (`nohup make test &`) inherits SIGINT ignored, and
    an ignored signal stays ignored across exec (a handled one is reset to the default): the sweep would then never
    see the Ctrl-C these tests send."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "helpers.sweep", str(path), "--no-report", "--reports",
                                 str(reports), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, saved)


def ctrl_c(p, ready, timeout):
    """A terminal's Ctrl-C once ready() says the runs are training: SIGINT to the sweep's whole process group (the
    sweep and its workers). Returns the sweep's output; the group is killed if it outlives the test."""
    try:
        t = time.time()
        while not ready():
            assert p.poll() is None, p.stdout.read()
            assert time.time() - t < timeout, "timeout"
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return out


def wait_for(cond, timeout=120):
    t = time.time()
    while not cond():
        if time.time() - t > timeout:
            raise TimeoutError
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_sweep_redoes_only_the_interrupted_run_and_refuses_a_second_sweep(tmp_path, tiny_model_dir):
    path = tiny_sweep(tmp_path, tiny_model_dir, {"lora_r": [2, 4, 8]})
    reports = tmp_path / "reports"
    runs = reports / "tiny" / "runs"
    configs = sweep.expand(sweep.load_sweep(path, reports))
    first, second = (runs / f"{c['run_id']}.json" for c in configs[:2])
    p = start(path, reports)
    try:
        wait_for(lambda: first.exists() and (runs / f"{configs[1]['run_id']}.ipynb").exists())
        # a second sweep on the same folder refuses while this one runs
        q = subprocess.run([sys.executable, "-m", "helpers.sweep", str(path), "--no-report", "--reports", str(reports)],
                           cwd=ROOT, capture_output=True, text=True)
        assert q.returncode == 2 and "already running" in q.stderr
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the runner and its kernel, mid-run
        p.wait()
    assert not second.exists()
    states = {r["run_id"]: r["status"] for r in read_all(runs)}
    assert states == {configs[0]["run_id"]: "ok"}  # no row from the interrupted run

    p = start(path, reports)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert f"skip {configs[0]['run_id']} (ok)" in out
    assert f"run {configs[1]['run_id']}" in out and f"run {configs[2]['run_id']}" in out
    assert {r["status"] for r in read_all(runs)} == {"ok"} and len(read_all(runs)) == 3
    summary = (reports / "tiny" / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 3


@pytest.mark.slow
def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_model_dir):
    # two documents pass the up-front checks, but hold fewer tokens than one block: the run fails
    bad = tmp_path / "short.txt"
    bad.write_text("a\n\nb\n")
    path = tiny_sweep(tmp_path, tiny_model_dir, {"corpus": [str(tmp_path / "corpus.txt"), str(bad)]}, name="fails")
    states = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r")
    assert sorted(states.values()) == ["error", "ok"]
    runs = tmp_path / "r" / "fails" / "runs"
    failed = next(r for r in read_all(runs) if r["status"] == "error")
    assert "fewer than one block" in failed["error"] and failed["config"]["corpus"] == str(bad)
    nb = json.loads((runs / f"{failed['run_id']}.ipynb").read_text())  # kept, with papermill's error marker
    assert any("papermill-error-cell-tag" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])
    assert (tmp_path / "r" / "fails" / "summary.csv").read_text().count("\n") == 3  # header + 2 rows


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_jobs_must_be_a_whole_number(tmp_path, jobs):
    with pytest.raises(sweep.SweepError, match=rf"jobs={jobs!r} must be a whole number >= 1"):
        sweep.run_sweep(write(tmp_path, GOOD), dry_run=True, reports_root=tmp_path, jobs=jobs)


@pytest.mark.slow
def test_side_by_side_sweep_runs_every_config_records_the_sharing_and_the_analysis_says_so(tmp_path, tiny_model_dir):
    from helpers import analysis

    bad = tmp_path / "short.txt"  # passes the up-front checks, too short for one block: the run fails
    bad.write_text("a\n\nb\n")
    path = tiny_sweep(tmp_path, tiny_model_dir, {"corpus": [str(tmp_path / "corpus.txt"), str(bad)], "lora_r": [2, 4]},
                      name="pair")
    # the worker processes must find the test's model cache as the kernels do
    states = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r", jobs=2)
    assert sorted(states.values()) == ["error", "error", "ok", "ok"]
    records = read_all(tmp_path / "r" / "pair" / "runs")
    assert len(records) == 4
    ok = [r for r in records if r["status"] == "ok"]
    assert [r["environment"]["side_by_side"] for r in ok] == [2, 2]
    # the two kernels share the cores instead of each starting one thread per core
    threads = int(os.environ.get("OMP_NUM_THREADS", max(1, os.cpu_count() // 2)))
    assert [r["environment"]["cpu_threads"] for r in ok] == [threads] * 2
    summary, _ = analysis.load_sweep(tmp_path / "r" / "pair")
    _, line = analysis.throughput(summary)
    assert "2 side by side" in line and "no speed is a run's own" in line  # the analysis draws no per-run cost
    # a resumed sweep finds everything finished or failed-and-redone, never a half-written file
    again = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r", jobs=2)
    assert sorted(again.values()) == ["error", "error", "ok", "ok"]


def test_side_by_side_note_only_for_shared_runs():
    import pandas as pd

    from helpers.analysis import side_by_side_note

    assert side_by_side_note(pd.DataFrame({"env_side_by_side": [1, 1]})) == ""
    assert side_by_side_note(pd.DataFrame({"x": [1]})) == ""  # sidecars from before the field existed
    assert "up to 4 side by side" in side_by_side_note(pd.DataFrame({"env_side_by_side": [1, 4, None]}))
