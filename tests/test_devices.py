"""helpers.sweep --devices on a CPU machine: a fake GPU list (CUDA_VISIBLE_DEVICES=0,1 in the runner's environment)
and a fake training notebook (the real parameters cell, then a cell that records what its kernel saw and writes a
sidecar in a second), so the queue, the pinning, a failing GPU, resume and Ctrl-C are tested in seconds."""
import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml

from helpers.sweeps import sweep
from helpers.records.sidecars import read_all
from tests.test_sweep import ctrl_c, start

ROOT = Path(__file__).resolve().parents[1]

# Records the pinning its kernel got, and when it ran; fails with lora_r 13, and on the GPU named by FAKE_BROKEN_GPU
# (a broken card);
# with FAKE_STARTED_DIR, leaves a file there once running (the Ctrl-C test waits for them).
FAKE_RUN = '''
import json, os, time
from pathlib import Path
from helpers.records.sidecars import write_sidecar
t0 = time.time()
if os.environ.get("FAKE_STARTED_DIR"):
    Path(os.environ["FAKE_STARTED_DIR"], run_id).touch()
if lora_r == 13:
    raise RuntimeError("a fake failing run")
if os.environ.get("FAKE_BROKEN_GPU") and os.environ.get("CUDA_VISIBLE_DEVICES") == os.environ["FAKE_BROKEN_GPU"]:
    raise RuntimeError("CUDA error: an illegal memory access was encountered (a fake broken GPU)")
time.sleep(float(os.environ.get("FAKE_RUN_S", "1")))
config = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
env = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
       "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
       "side_by_side": int(os.environ.get("QLORA_STUDY_SIDE_BY_SIDE", "1")), "host": "fake", "boot_id": "fake"}
write_sidecar(Path(output_dir) / f"{run_id}.json", {"run_id": run_id, "status": "ok", "error": None, "config": config,
              "environment": env, "metrics": {"started": t0, "ended": time.time()}, "history": []})
'''


def write_fake_notebook(path, before: str = "") -> Path:
    """The training notebook's parameters cell (the sweep checks parameters against it), then `before` + FAKE_RUN."""
    train = nbformat.read(str(ROOT / "notebooks" / "01_train.ipynb"), as_version=4)
    params = next(c for c in train.cells if "parameters" in c.metadata.get("tags", []))
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(before + FAKE_RUN)])
    nb.metadata = train.metadata
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def fake_notebook(tmp_path):
    return write_fake_notebook(tmp_path / "fake_train.ipynb")


def fake_sweep(tmp_path, notebook, ranks, **base):
    spec = {"name": "fake", "notebook": str(notebook), "base": {"max_steps": 2, "warmup_steps": 1, "timing_warmup_steps": 1, "quant": "none", **base}, "grid": {"lora_r": ranks}}
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def two_fake_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


# --- which devices --------------------------------------------------------------------------------------------

CONFIGS = [{"device": "auto"}]


def test_no_gpu_keeps_the_one_at_a_time_runner(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(sweep, "visible_gpus", lambda: [])
    assert sweep.choose_devices(None, CONFIGS) is None


def test_default_is_every_visible_gpu_and_none_opts_out(two_fake_gpus):
    assert sweep.visible_gpus() == ["0", "1"]
    assert sweep.choose_devices(None, CONFIGS) == ["0", "1"]
    assert sweep.choose_devices("1", CONFIGS) == ["1"]
    assert sweep.choose_devices("none", CONFIGS) is None
    assert sweep.choose_devices(None, [{"device": "cpu"}]) is None  # CPU runs: as before


@pytest.mark.parametrize("value, expected", [("0,1", ["0", "1"]), ("GPU-ab12,1", ["GPU-ab12", "1"]), ("-1", []),
                                             ("", []), ("0,-1,1", ["0"])])
def test_cuda_visible_devices_is_read_as_cuda_reads_it(monkeypatch, value, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert sweep.visible_gpus() == expected


@pytest.mark.parametrize("devices, configs, message", [
    ("2", CONFIGS, "--devices: 2 not found; this machine's GPUs are 0,1"),
    ("0,0", CONFIGS, "names a GPU twice"),
    ("0", [{"device": "cpu"}], "this sweep's runs ask for device ['cpu']"),
    ("0", [{"device": "cuda:1"}], "this sweep's runs ask for device ['cuda:1']"),
    ("0,1", [{"device": "auto", "num_gpus": 2}], "runs with num_gpus [2]"),
    (",", CONFIGS, "--devices is empty"),
])
def test_bad_devices_are_refused_naming_the_problem(two_fake_gpus, devices, configs, message):
    with pytest.raises(sweep.SweepError) as e:
        sweep.choose_devices(devices, configs)
    assert message in str(e.value)


def test_fsdp_runs_take_every_gpu_one_run_at_a_time(two_fake_gpus):
    assert sweep.choose_devices(None, [{"device": "auto", "num_gpus": 2}]) is None


def test_a_machine_without_gpus_refuses_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(sweep, "visible_gpus", lambda: [])
    with pytest.raises(sweep.SweepError, match="this machine shows no GPU"):
        sweep.choose_devices("0", CONFIGS)


def test_pinned_sets_and_restores_the_environment(two_fake_gpus):
    with sweep.pinned("1"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and "CUDA_DEVICE_ORDER" not in os.environ


# --- the queue, end to end with fresh kernels ------------------------------------------------------------------

def _runs(folder):
    return {r["config"]["lora_r"]: r for r in read_all(folder / "fake" / "runs")}


@pytest.mark.slow  # fresh kernels (seconds each)
def test_one_run_per_gpu_every_gpu_busy(tmp_path, fake_notebook, two_fake_gpus):
    from helpers import analysis

    path = fake_sweep(tmp_path, fake_notebook, [2, 3, 4, 5, 6])  # more runs than GPUs: they queue
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        states = sweep.run_sweep(path, report=False, reports_root=tmp_path, out=out)
    text = log.read_text()
    assert set(states.values()) == {"ok"}, text
    assert "2 GPU(s) (0,1): 1 run(s) per GPU at a time" in text
    runs = _runs(tmp_path)
    assert len(runs) == 5
    gpus = {r: rec["environment"]["cuda_visible_devices"] for r, rec in runs.items()}
    assert set(gpus.values()) == {"0", "1"}, gpus  # both GPUs got runs
    assert gpus[2] == "0" and gpus[3] == "1"  # the first runs go to the GPUs in order
    assert all(rec["environment"]["cuda_device_order"] == "PCI_BUS_ID" for rec in runs.values())
    for gpu in ("0", "1"):  # one run at a time on each GPU
        spans = sorted((rec["metrics"]["started"], rec["metrics"]["ended"]) for rec in runs.values()
                       if rec["environment"]["cuda_visible_devices"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    spans = sorted((rec["metrics"]["started"], rec["metrics"]["ended"]) for rec in runs.values())
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:]))  # ... and the two GPUs at the same time
    # each run had its GPU alone: its costs are its own, and the analysis does not mark them shared
    assert {rec["environment"]["side_by_side"] for rec in runs.values()} == {1}
    summary, _ = analysis.load_sweep(tmp_path / "fake")
    assert not analysis.side_by_side(summary).any()
    assert text.count(" on GPU 0") >= 2 and text.count(" on GPU 1") >= 2


@pytest.mark.slow  # fresh kernels (seconds each)
def test_jobs_per_gpu_share_each_gpu_and_say_so(tmp_path, fake_notebook, two_fake_gpus):
    path = fake_sweep(tmp_path, fake_notebook, [2, 3, 4, 5])
    states = sweep.run_sweep(path, report=False, reports_root=tmp_path, jobs=2, devices="0", out=open(os.devnull, "w"))
    assert set(states.values()) == {"ok"}
    runs = _runs(tmp_path)
    assert {rec["environment"]["cuda_visible_devices"] for rec in runs.values()} == {"0"}
    assert {rec["environment"]["side_by_side"] for rec in runs.values()} == {2}


@pytest.mark.slow  # fresh kernels (seconds each)
def test_a_broken_gpu_fails_its_runs_the_others_go_on_and_a_rerun_redoes_only_those(tmp_path, fake_notebook,
                                                                                    two_fake_gpus, monkeypatch):
    monkeypatch.setenv("FAKE_BROKEN_GPU", "1")
    path = fake_sweep(tmp_path, fake_notebook, [2, 3, 4, 5])
    states = sweep.run_sweep(path, report=False, reports_root=tmp_path, out=open(os.devnull, "w"))
    runs = _runs(tmp_path)
    failed = {r for r, rec in runs.items() if rec["status"] == "error"}
    assert failed and len(failed) < 4, states  # GPU 1 failed its runs, GPU 0 did the rest
    assert all("fake broken GPU" in runs[r]["error"] for r in failed)
    assert {rec["environment"]["cuda_visible_devices"] for r, rec in runs.items() if r not in failed} == {"0"}
    assert sorted(states.values()).count("ok") == 4 - len(failed)

    monkeypatch.delenv("FAKE_BROKEN_GPU")  # the card is replaced: resume redoes the failed runs only
    log = tmp_path / "again.txt"
    with log.open("w") as out:
        again = sweep.run_sweep(path, report=False, reports_root=tmp_path, out=out)
    assert set(again.values()) == {"ok"}
    text = log.read_text()
    assert text.count(" skip ") == 4 - len(failed) and f"{len(failed)} to run" in text


@pytest.mark.slow  # fresh kernels (seconds each)
def test_ctrl_c_stops_the_runs_on_every_gpu_each_recorded_unfinished(tmp_path, fake_notebook):
    started = tmp_path / "started"
    started.mkdir()
    path = fake_sweep(tmp_path, fake_notebook, [2, 3, 4])
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "FAKE_RUN_S": "600", "FAKE_STARTED_DIR": str(started)}
    p = start(path, tmp_path, env=env)
    out = ctrl_c(p, lambda: len(list(started.iterdir())) >= 2, timeout=120)  # a run on each GPU
    assert p.returncode == 130, out
    assert "Traceback" not in out and "interrupted: 0 of 3 runs done, re-run to resume" in out, out
    records = read_all(tmp_path / "fake" / "runs")
    assert [r["status"] for r in records] == ["unfinished", "unfinished"]
    assert json.loads((tmp_path / "fake" / "runs" / f"{records[0]['run_id']}.json").read_text())["error"].startswith(
        "interrupted (Ctrl-C)")
