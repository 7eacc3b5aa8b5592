"""helpers.sweep --cluster on a local Ray cluster of this CPU machine (Ray is in the test extra; these tests are
skipped, saying so, only where it is not installed): files come back to the driver, a failed run is a result,
resume skips finished runs, a lost worker's run is redone, and a real training run of the tiny model comes back
whole."""
import os
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[test]' (or '.[cluster]')")

from helpers.sweeps import cluster, sweep  # noqa: E402
from helpers.records.sidecars import notebook_problem, read_all  # noqa: E402
from tests.test_devices import write_fake_notebook  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# every test but the refusal starts Ray and executes notebooks: minutes on 2 cores
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_cluster():
    """The cluster helpers.sweep --cluster local starts (connect), kept for this module's tests."""
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    cluster.connect("local")
    yield ray
    ray.shutdown()


def fake_sweep(tmp_path, notebook, ranks, name="fake"):
    spec = {"name": name, "notebook": str(notebook), "grid": {"lora_r": ranks},
            "base": {"max_steps": 2, "warmup_steps": 1, "timing_warmup_steps": 1, "quant": "none"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_runs_come_back_to_the_driver_failures_are_results_and_resume_skips_finished(tmp_path, local_cluster):
    notebook = write_fake_notebook(tmp_path / "fake.ipynb")
    path = fake_sweep(tmp_path, notebook, [2, 13, 4])  # lora_r 13: the fake run fails
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        states = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r", cluster="local", out=out)
    text = log.read_text()
    assert sorted(states.values()) == ["error", "ok", "ok"], text
    assert "Ray cluster: " in text and "one run per CPU" in text
    runs_dir = tmp_path / "r" / "fake" / "runs"
    records = {r["config"]["lora_r"]: r for r in read_all(runs_dir)}
    assert set(records) == {2, 13, 4}
    for r in records.values():  # written here, by the driver, as a local sweep writes them
        assert r["config"]["output_dir"] == str(runs_dir)
        assert notebook_problem(runs_dir / f"{r['run_id']}.ipynb") is None
    assert "a fake failing run" in records[13]["error"] and records[13]["status"] == "error"
    # CPU runs share their node: the sidecar says so, as --jobs does
    assert records[2]["environment"]["side_by_side"] == cluster._cpus_per_node(ray)
    assert not list(runs_dir.glob(".*.tmp")) and (tmp_path / "r" / "fake" / "summary.csv").exists()

    with log.open("w") as out:
        again = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r", cluster="local", out=out)
    text = log.read_text()
    assert "3 runs, 2 finished, 1 to run" in text and text.count(" skip ") == 2, text
    assert again == states  # the failing run was redone (and failed again); the finished ones were not submitted


def test_a_lost_worker_is_retried(tmp_path, local_cluster):
    marker = tmp_path / "killed-once"
    # the first attempt kills its Ray worker (the kernel's parent), as a lost node would; the retry runs
    kill_once = (f"import os, signal\nfrom pathlib import Path\nif not Path({str(marker)!r}).exists():\n"
                 f"    Path({str(marker)!r}).touch()\n    os.kill(os.getppid(), signal.SIGKILL)\n    os._exit(1)\n")
    notebook = write_fake_notebook(tmp_path / "fake.ipynb", before=kill_once)
    path = fake_sweep(tmp_path, notebook, [2], name="lost")
    states = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r", cluster="local",
                             out=open(os.devnull, "w"))
    assert marker.exists()  # the first attempt ran and took its worker down
    assert list(states.values()) == ["ok"]


def test_no_jobs_or_devices_with_a_cluster(tmp_path):
    path = fake_sweep(tmp_path, write_fake_notebook(tmp_path / "fake.ipynb"), [2])
    with pytest.raises(sweep.SweepError, match="leave out --jobs and --devices"):
        sweep.run_sweep(path, dry_run=True, reports_root=tmp_path, cluster="local", jobs=2)


def test_a_real_training_run_of_the_tiny_model_comes_back_whole(tmp_path, tiny_model_dir, local_cluster):
    from tests.test_sweep import tiny_sweep

    path = tiny_sweep(tmp_path, tiny_model_dir, {"lora_r": [2, 4]})
    states = sweep.run_sweep(path, report=False, reports_root=tmp_path / "r", cluster="local",
                             out=open(os.devnull, "w"))
    assert list(states.values()) == ["ok", "ok"]
    configs = sweep.expand(sweep.load_sweep(path, tmp_path / "r"))
    assert [sweep.run_state(c) for c in configs] == ["ok", "ok"]  # sidecar and executed notebook read back whole
    [record, _] = read_all(tmp_path / "r" / "tiny" / "runs")
    assert record["metrics"]["tokens_trained"] > 0 and record["metrics"]["ppl_after"] > 0 and record["history"]


def test_ctrl_c_from_the_command_line_cancels_the_runs_each_recorded_unfinished(tmp_path):
    """The CLI (helpers.sweep as __main__: what Ray sends to the nodes must still be found by its module name)."""
    from tests.test_sweep import ctrl_c, start

    started = tmp_path / "started"
    started.mkdir()
    path = fake_sweep(tmp_path, write_fake_notebook(tmp_path / "fake.ipynb"), [2, 3, 4])
    env = {"FAKE_RUN_S": "600", "FAKE_STARTED_DIR": str(started)}
    p = start(path, tmp_path / "r", "--cluster", "local", env=env)
    out = ctrl_c(p, lambda: len(list(started.iterdir())) >= 2, timeout=180)  # two runs training on the two CPUs
    assert p.returncode == 130, out
    assert "interrupted: 0 of 3 runs done, re-run to resume" in out and "Traceback" not in out, out
    records = read_all(tmp_path / "r" / "fake" / "runs")
    assert {r["status"] for r in records} == {"unfinished"} and len(records) >= 2
