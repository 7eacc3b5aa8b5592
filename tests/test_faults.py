"""Faults and bad input (issue 14): a full disk is not ok, bad values are refused before any model loads,
every failure ends in one clear line with an exit code a script can use."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers.training import data, runs
from helpers.sweeps import sweep
from tests.conftest import base_config
from tests.test_sweep import GOOD, ROOT, ctrl_c, start, tiny_sweep, wait_for, write

TYPES = {k: p["type"] for k, p in sweep.notebook_parameters().items()}


# --- mounts: a real full disk and a real read-only folder where this user may mount (root) ----------------

def _mount(args, target) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args, str(target)], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 40 KiB tmpfs: room for a sidecar, not for a whole executed notebook of the tiny model (~44 KB)."""
    d = tmp_path / "disk"
    d.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "size=40k", "tmpfs"], d):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)])


@pytest.fixture
def read_only(tmp_path):
    """read_only(folder): bind-mount folder read-only onto itself (root ignores chmod)."""
    mounted = []

    def make(folder):
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
            mounted.append(("chmod", folder))
            return folder
        if not (_mount(["--bind", str(folder)], folder) and _mount(["-o", "remount,ro,bind"], folder)):
            pytest.skip("cannot bind-mount read-only here")
        mounted.append(("mount", folder))
        return folder

    yield make
    for how, folder in mounted:
        if how == "mount":
            subprocess.run(["umount", "-l", str(folder)])
        else:
            folder.chmod(0o755)


# --- 1. atomic writes ---------------------------------------------------------------------------------------

def test_summary_on_a_failing_rename_keeps_the_old_one_and_leaves_no_temp_file(tmp_path, monkeypatch):
    runs.write_sidecar(tmp_path / "runs" / "a.json", {"run_id": "a", "status": "ok", "config": {}})
    old = runs.write_summary(tmp_path).read_text()

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        runs.write_summary(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "summary.csv"]  # no summary.csv.tmp
    assert (tmp_path / "summary.csv").read_text() == old


def test_summary_on_a_full_disk_leaves_no_temp_file(small_disk):
    for i in range(2):
        runs.write_sidecar(small_disk / "runs" / f"r{i}.json", {"run_id": f"r{i}", "status": "ok", "config": {}})
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"x" * 1024)
                f.flush()
        except OSError:
            pass
    with pytest.raises(OSError) as e:
        runs.write_summary(small_disk)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "runs"]


def test_atomic_write_of_bytes_and_of_a_writer(tmp_path):
    from helpers.records import files

    files.atomic_write(tmp_path / "b", b"\x00\x01")
    files.atomic_write(tmp_path / "t", lambda f: f.write("ok"))
    assert (tmp_path / "b").read_bytes() == b"\x00\x01" and (tmp_path / "t").read_text() == "ok"


def test_a_finished_run_whose_notebook_is_cut_is_redone(tmp_path):
    spec = {**GOOD, "grid": {"lora_r": [4]}}
    sw = sweep.load_sweep(write(tmp_path, spec), reports_root=tmp_path)
    [cfg] = sweep.expand(sw)
    folder = Path(cfg["output_dir"])
    runs.write_sidecar(folder / f"{cfg['run_id']}.json", {"run_id": cfg["run_id"], "status": "ok", "config": cfg})
    nb = folder / f"{cfg['run_id']}.ipynb"
    assert sweep.run_state(cfg) == "incomplete"  # no notebook at all
    nb.write_text('{"cells": [{"cell_type": "code", "source": "x = 1"')  # cut by a full disk
    assert sweep.run_state(cfg) == "incomplete"
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        sweep.run_sweep(write(tmp_path, spec), dry_run=True, reports_root=tmp_path, out=f)
    assert "0 finished, 1 to run" in out.read_text()


# --- 2. every value checked before any model loads -----------------------------------------------------------

@pytest.mark.parametrize("key", ["seed", "output_dir", "run_id"])
def test_base_obeys_the_rules_of_grid(tmp_path, key):
    value = {"seed": 42, "output_dir": "x", "run_id": "x"}[key]
    with pytest.raises(sweep.SweepError, match=f"base: {key} is set by the runner"):
        sweep.load_sweep(write(tmp_path, {**GOOD, "base": {key: value}}), reports_root=tmp_path)


def test_infinite_learning_rate_in_yaml_is_refused_before_any_run(tmp_path):
    path = write(tmp_path, "name: t\nbase: {learning_rate: .inf}\ngrid: {lora_r: [4]}\n")
    with pytest.raises(sweep.SweepError, match=r"learning_rate=inf is not allowed: a finite number"):
        sweep.run_sweep(path, reports_root=tmp_path, dry_run=True)  # refused even when only listing
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"learning_rate": "abc"}, "learning_rate='abc' is a str, the notebook expects float"),
        ({"lora_dropout": "0.1"}, "lora_dropout='0.1' is a str, the notebook expects float"),
        ({"max_steps": 3.0}, "max_steps=3.0 is a float, the notebook expects int"),
        ({"learning_rat": 1e-4}, "unknown parameter(s) ['learning_rat']"),
        ({"learning_rate": float("nan")}, "learning_rate=nan is not allowed: a finite number"),
        ({"vram_budget_gib": float("inf")}, "vram_budget_gib=inf is not allowed: a finite number"),
        ({"device": "cuda:banana"}, "device='cuda:banana' is not allowed: auto, cpu, cuda or cuda:N"),
        ({"run_id": "../../somewhere"}, "run_id='../../somewhere' is not allowed"),
        ({"run_id": "a/b"}, "run_id='a/b' is not allowed"),
        ({"output_dir": "../../somewhere"}, "output_dir='../../somewhere' is not allowed"),
    ],
)
def test_values_papermill_or_yaml_can_bring_are_refused_naming_them(override, message):
    cfg = base_config(**override)
    with pytest.raises(ValueError) as e:
        runs.validate(cfg, types=TYPES)
    assert message in str(e.value)


def test_range_checks_hold_without_types():
    with pytest.raises(ValueError, match="learning_rate='abc' is not allowed"):  # not a TypeError
        runs.validate(base_config(learning_rate="abc"))


def test_a_missing_value_is_named():
    cfg = base_config()
    del cfg["learning_rate"]  # papermill -p learning_rate None: the notebook's config drops it
    with pytest.raises(ValueError, match="learning_rate has no value"):
        runs.validate(cfg, types=TYPES)


def test_absolute_output_dir_and_a_plain_run_id_are_fine(tmp_path):
    runs.validate(base_config(output_dir=str(tmp_path), run_id="my-run.1"), types=TYPES)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_on_a_machine_without_a_gpu_is_refused_here_but_listed_in_a_dry_run(device):
    with pytest.raises(ValueError, match=f"device='{device}' is not allowed: this machine has no CUDA device"):
        runs.validate(base_config(device=device))
    runs.validate(base_config(device=device), here=False)  # a GPU sweep can be listed on a laptop


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "has 0 document(s); the train/eval split needs at least 2"),
        ("one.txt", b"just one document\nof two lines\n", "has 1 document(s)"),
        ("gz.txt", b"\x1f\x8b\x08\x00binary", "is not UTF-8 text (byte 0x8b"),
        ("blank.jsonl", b'\n{"text": "  "}\n', "has 0 document(s)"),
        ("bad.jsonl", b'{"body": "no text field"}\n', "line 1: expected a JSON object with a 'text' field"),
    ],
)
def test_a_corpus_file_must_be_text_with_two_documents_and_the_error_names_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        runs.validate(base_config(corpus=str(path)))
    assert str(path) in str(e.value) and message in str(e.value)
    path.write_text("one\n\ntwo\n" if name.endswith(".txt") else '{"text": "one"}\n{"text": "two"}\n')
    runs.validate(base_config(corpus=str(path)))  # the same file, fixed, is read again (not a cached verdict)
    assert len(data.load_documents(str(path))) == 2


# --- 3. exit codes and one-line errors -----------------------------------------------------------------------

def test_a_refused_sweep_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, {**GOOD, "base": {"seed": 1}})
    assert sweep.main([str(path), "--reports", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "seed is set by the runner" in err


def test_a_read_only_reports_folder_is_one_line_and_exit_3(tmp_path, read_only, capsys):
    reports = read_only(tmp_path / "reports")
    assert sweep.main([str(write(tmp_path, GOOD)), "--reports", str(reports), "--no-report"]) == 3
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("error: cannot write ")
    assert "Traceback" not in cap.err + cap.out


def test_dead_kernel_outcomes_say_what_the_evidence_allows():
    mem = "host RAM 8.0 GiB"
    status, text = sweep.dead_kernel_outcome(-9, 3, 4, " at step 5/30", mem)
    assert status == "oom" and text.startswith("out of memory (host): the kernel was killed by the system's "
                                               "out-of-memory killer at step 5/30") and mem in text
    status, text = sweep.dead_kernel_outcome(-9, 3, 3, "", mem)
    assert status == "error" and "not by the out-of-memory killer" in text
    status, text = sweep.dead_kernel_outcome(-9, None, None, "", mem)
    assert status == "error" and "does not count its kills" in text
    assert sweep.dead_kernel_outcome(-11, 0, 0, "", mem) == ("error", f"the kernel died of SIGSEGV; {mem}")
    assert sweep.dead_kernel_outcome(1, 0, 0, "", mem)[1].startswith("the kernel exited with status 1")


def test_oom_kill_count_reads_the_system_counter():
    count = sweep.oom_kill_count()
    assert count is None or (isinstance(count, int) and count >= 0)
    if Path("/proc/vmstat").exists() and "oom_kill " in Path("/proc/vmstat").read_text():
        assert isinstance(count, int)


# --- end to end with the tiny model (papermill, fresh kernels) ------------------------------------------------

def short_corpus(tmp_path):
    """Two documents, fewer tokens than one block: passes every up-front check, fails inside the run."""
    p = tmp_path / "short.txt"
    p.write_text("a\n\nb\n")
    return p


@pytest.mark.slow
def test_a_sweep_with_a_failed_run_exits_1_and_says_so_in_one_line(tmp_path, tiny_model_dir, capsys):
    path = tiny_sweep(tmp_path, tiny_model_dir, {"corpus": [str(tmp_path / "corpus.txt"), str(short_corpus(tmp_path))]})
    assert sweep.main([str(path), "--no-report", "--reports", str(tmp_path / "r")]) == 1
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and "1 of 2 runs ended in error" in cap.err
    assert "-> ok" in cap.out and "-> error" in cap.out


@pytest.mark.slow
def test_a_notebook_cut_short_by_a_write_is_an_error_row_not_ok(tmp_path, tiny_model_dir, monkeypatch):
    """papermill writes the executed notebook itself; the last write is cut (as on a full disk) without an
    exception reaching the sweep. The run's sidecar says ok: the run must not."""
    import papermill.engines
    import papermill.execute

    real = papermill.engines.write_ipynb

    def cut(nb, path):
        real(nb, path)
        if any("runs.finish(run)" in c.source for c in nb.cells if c.get("outputs")):
            text = Path(path).read_text()
            Path(path).write_text(text[: len(text) // 2])

    monkeypatch.setattr(papermill.engines, "write_ipynb", cut)  # after each cell
    monkeypatch.setattr(papermill.execute, "write_ipynb", cut)  # the last write
    path = tiny_sweep(tmp_path, tiny_model_dir, {"lora_r": [2]})
    states = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r")
    assert list(states.values()) == ["error"]
    [record] = runs.read_all(tmp_path / "r" / "tiny" / "runs")
    assert record["status"] == "error" and "not a readable notebook" in record["error"]
    assert record["metrics"]["ppl_after"] is not None  # the measurements are kept, the verdict is not ok
    monkeypatch.undo()
    assert list(sweep.run_sweep(path, report=False, reports_root=tmp_path / "r").values()) == ["ok"]  # redone


@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_with_one_line_and_leaves_no_ok_run(tmp_path, tiny_model_dir, small_disk):
    path = tiny_sweep(tmp_path, tiny_model_dir, {"lora_r": [2, 4]})
    p = subprocess.run([sys.executable, "-m", "helpers.sweep", str(path), "--no-report", "--reports", str(small_disk)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stdout + p.stderr
    err = [line for line in p.stderr.splitlines() if "IPKernelApp" not in line]
    assert len(err) == 1 and "No space left on device" in err[0] and "0 of 2 runs done" in err[0], p.stderr
    assert "-> ok" not in p.stdout and "Traceback" not in p.stdout + p.stderr
    folder = small_disk / "tiny"
    assert all(r["status"] != "ok" for r in runs.read_all(folder / "runs"))
    assert not [f for f in folder.rglob("*.tmp")]  # no temp file left behind
    configs = sweep.expand(sweep.load_sweep(path, small_disk))
    assert [sweep.run_state(c) for c in configs] != ["ok", "ok"]  # a re-run redoes them


@pytest.mark.slow
def test_a_read_only_runs_folder_is_one_line_and_exit_3(tmp_path, tiny_model_dir, read_only):
    path = tiny_sweep(tmp_path, tiny_model_dir, {"lora_r": [2]})
    reports = tmp_path / "r"
    read_only(reports / "tiny" / "runs")
    p = subprocess.run([sys.executable, "-m", "helpers.sweep", str(path), "--no-report", "--reports", str(reports)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stdout + p.stderr
    err = [line for line in p.stderr.splitlines() if "IPKernelApp" not in line]
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and "Traceback" not in p.stdout + p.stderr


def endless_tiny_sweep(tmp_path, tiny_model_dir):
    """(sweep file, reports folder, runs folder) of two tiny runs whose step count is never reached: the test
    stops them mid-training."""
    path = tiny_sweep(tmp_path, tiny_model_dir, {"lora_r": [2, 4]})
    spec = yaml.safe_load(path.read_text())
    spec["base"]["max_steps"] = 5000
    path.write_text(yaml.safe_dump(spec))
    reports = tmp_path / "reports"
    return path, reports, reports / "tiny" / "runs"


@pytest.mark.slow
def test_ctrl_c_marks_the_run_unfinished_writes_the_summary_and_says_how_to_resume(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    path, reports, runs_dir = endless_tiny_sweep(tmp_path, tiny_model_dir)
    monkeypatch.setenv("QLORA_STUDY_PROGRESS_EVERY_S", "0")  # a progress line at every step the sweep sees
    p = start(path, reports)
    try:
        wait_for(lambda: any(runs_dir.glob("*.progress")), timeout=120)
        wait_for(lambda: json.loads(next(runs_dir.glob("*.progress")).read_text())["step"] >= 2, timeout=60)
        time.sleep(2.5)  # the sweep polls the progress file every second
        os.kill(p.pid, signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, out
    lines = [line for line in out.splitlines() if "IPKernelApp" not in line]
    assert lines[-1].startswith("interrupted: 0 of 2 runs done, re-run to resume"), out
    assert "Traceback" not in out
    assert any(line.startswith("    step ") and "left in this run" in line for line in lines), out  # progress shown
    [record] = runs.read_all(runs_dir)
    assert record["status"] == "unfinished" and record["error"].startswith("interrupted (Ctrl-C) at step ")
    summary = (reports / "tiny" / "summary.csv").read_text()
    assert "unfinished" in summary
    configs = sweep.expand(sweep.load_sweep(path, reports))
    assert sweep.run_state(configs[0]) == "unfinished"  # redone on a re-run
    assert not list(runs_dir.glob("*.progress")) and not list(runs_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_stops_side_by_side_runs_each_recorded_unfinished(tmp_path, tiny_model_dir):
    path, reports, runs_dir = endless_tiny_sweep(tmp_path, tiny_model_dir)
    p = start(path, reports, "--jobs", "2")
    out = ctrl_c(p, lambda: len(list(runs_dir.glob("*.progress"))) == 2, timeout=180)
    assert p.returncode == 130, out
    assert "Traceback" not in out and "interrupted: 0 of 2 runs done, re-run to resume" in out, out
    records = runs.read_all(runs_dir)
    assert [r["status"] for r in records] == ["unfinished", "unfinished"]
    assert not list(runs_dir.glob("*.progress"))


@pytest.mark.slow
@pytest.mark.parametrize("oom_killer", [True, False])
def test_a_kernel_killed_by_sigkill_is_out_of_memory_only_if_the_oom_killer_did_it(tmp_path, tiny_model_dir,
                                                                                   monkeypatch, oom_killer):
    """The kernel is killed with SIGKILL mid-training, as the OOM killer does; the system's kill count is
    faked (this test must not exhaust the machine's memory)."""
    import psutil

    counts = iter([7, 8] if oom_killer else [7, 7])
    monkeypatch.setattr(sweep, "oom_kill_count", lambda: next(counts), raising=False)
    path = tiny_sweep(tmp_path, tiny_model_dir, {"lora_r": [2]})
    spec = yaml.safe_load(path.read_text())
    spec["base"]["max_steps"] = 5000  # never reached: the test stops it mid-training
    path.write_text(yaml.safe_dump(spec))
    sw = sweep.load_sweep(path, tmp_path / "r")
    [cfg] = sweep.expand(sw)
    notebook = Path(cfg["output_dir"]) / f"{cfg['run_id']}.ipynb"

    def training():  # papermill saves the notebook as each cell starts, marking it running
        try:
            cells = json.loads(notebook.read_text())["cells"]
        except (OSError, ValueError):
            return False
        return any("trainer.train()" in "".join(c["source"]) and c["metadata"]["papermill"]["status"] == "running"
                   for c in cells)

    def kill_the_kernel():  # once the first steps are done (the progress file says so)
        wait_for(training, timeout=120)
        progress = Path(cfg["output_dir"]) / f"{cfg['run_id']}.progress"
        try:
            wait_for(lambda: progress.exists() and json.loads(progress.read_text() or "{}").get("step", 0) >= 1,
                     timeout=30)
        except TimeoutError:  # no progress file (code without one): kill it anyway
            pass
        for child in psutil.Process().children():
            if any("ipykernel" in part for part in child.cmdline()):
                child.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_the_kernel, daemon=True)
    killer.start()
    status = sweep.execute(sw, cfg)
    killer.join()
    record = runs.read_sidecar(Path(cfg["output_dir"]) / f"{cfg['run_id']}.json")
    assert record["status"] == status == ("oom" if oom_killer else "error")
    if oom_killer:
        assert record["error"].startswith("out of memory (host): the kernel was killed by the system's "
                                          "out-of-memory killer at step ")
    else:
        assert "killed by SIGKILL" in record["error"] and "not by the out-of-memory killer" in record["error"]
    assert "host RAM" in record["error"] and record["metrics"]["host_total_gib"] > 0
    assert record["metrics"]["kernel_rss_last_gib"] > 0  # the memory figure the kernel last reported
