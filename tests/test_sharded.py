"""FSDP-QLoRA (helpers/training/sharded.py): num_gpus > 1 checked before anything runs, and 2 processes on the CPU (gloo)
training the default model to the same losses as 1 process given the same global batch."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.training import runs, sharded
from tests.conftest import base_config


def test_num_gpus_beyond_the_visible_gpus_is_refused_naming_both():
    have = len(runs.visible_gpus())
    with pytest.raises(ValueError, match=f"num_gpus={have + 2} is not allowed: at most the {have} GPU\\(s\\) visible"):
        runs.validate(base_config(num_gpus=have + 2))


@pytest.mark.parametrize("change, match", [
    (dict(num_gpus=0), "num_gpus=0 is not allowed: a whole number >= 1"),
    (dict(num_gpus=True), "num_gpus=True is not allowed"),
    (dict(fsdp_cpu_offload=True), "fsdp_cpu_offload=True is not allowed: False with num_gpus 1"),
    (dict(num_gpus=2, quant="int8"), "quant='int8' is not allowed: one of \\['none', 'nf4', 'fp4'\\] with num_gpus > 1"),
    (dict(num_gpus=2, optimizer="paged_adamw_8bit"), "optimizer='paged_adamw_8bit' is not allowed"),
    (dict(num_gpus=2, chunked_loss=4), "chunked_loss=4 is not allowed: off with num_gpus > 1"),
    (dict(num_gpus=2, device="cuda:1"), "device='cuda:1' is not allowed: auto or cuda with num_gpus > 1"),
    (dict(num_gpus=2, stack="unsloth"), "stack=.unsloth. is not allowed: .hf. with num_gpus > 1"),
])
def test_sharded_settings_are_checked(change, match):
    problems = runs.sharding_problems(base_config(**{"device": "cpu", **change}), here=False)
    assert problems, change
    name, value, allowed = problems[0]
    assert re.search(match, f"{name}={value!r} is not allowed: {allowed}")


def test_defaults_keep_every_run_id():
    """num_gpus 1 and no offload are today's runs: their ids do not change (published sidecars keep matching)."""
    old = {k: v for k, v in base_config().items() if k not in ("num_gpus", "fsdp_cpu_offload")}
    assert runs.run_id(base_config()) == runs.run_id(old)
    assert runs.run_id(base_config(num_gpus=2)) != runs.run_id(old)


def test_processes_split_the_global_batch_one_process_would_take():
    """Rank r's rows of each micro-batch, concatenated over ranks, are the rows of one process with the batch
    of all of them: the same blocks, in the same order, every step and micro-batch, across epochs."""
    for step in range(7):
        for micro in range(2):
            two = sum((sharded.batch_rows(step, micro, r, 2, 3, 2, 20, seed=5) for r in range(2)), [])
            assert two == sharded.batch_rows(step, micro, 0, 1, 6, 2, 20, seed=5)


# 2 processes of batch_size 2 against 1 process of batch_size 4 (the same global batch), on the default model
# (smollm2-135m, float32 on the CPU), 4 optimizer steps at a learning rate high enough that a wrong step shows.
# Run in a fresh interpreter: notebook_launcher refuses a process that imported bitsandbytes (pytest's may have),
# and the script also checks that the notebook's parent side never imports it.
SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    from helpers.training import data, runs, sharded
    from tests.conftest import base_config
    quant, out = sys.argv[1], sys.argv[2]
    common = dict(device="cpu", quant=quant, seq_len=32, max_steps=4, warmup_steps=1, eval_blocks=2,
                  learning_rate=2e-3, lora_r=4, lora_dropout=0.0, timing_warmup_steps=1, output_dir=out)
    two = base_config(num_gpus=2, batch_size=2, **common)
    runs.validate(two)
    run = runs.start(two)
    train, evals = data.prepare(two, sharded.fetch(two["model"], run["metrics"]), run)
    assert "bitsandbytes" not in sys.modules, "the parent imported bitsandbytes"
    sharded.launch(run, train, evals)
    one = base_config(num_gpus=1, batch_size=4, **common)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sharded.rank_main(one, train, evals, out)
    ref = json.load(open(os.path.join(out, "rank0.json")))
    print(json.dumps({"two": [r["loss"] for r in run["history"]], "one": [r["loss"] for r in ref["history"]],
                      "metrics": run["metrics"], "ref_ppl_after": ref["metrics"]["ppl_after"]}, default=str))
""")

# float32 on both sides, no dropout (its masks would differ: each process draws its own); what differs is only the
# order of additions: the gradient is reduced over 2 shards and averaged instead of summed over one batch, which
# Adam's normalised steps carry into the next losses. Measured: ~2e-7 relative over 4 steps, for 16-bit and NF4
# alike; 1e-5 leaves room for other CPUs' kernels. What it catches: another split of the batch (step 0's loss
# already differs), unequal adapters, gradients not reduced across processes (each would step on half the batch);
# the learning rate is 10x the default so that a wrong step shows. Not a gradient off by a constant factor: Adam's
# step does not see the scale.
LOSS_RTOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, quant):
    r = subprocess.run([sys.executable, "-c", SCRIPT, quant, str(tmp_path)], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    two, one = got["two"], got["one"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(two, one))
    print(f"\n{quant}: 2 processes {two}\n{quant}: 1 process  {one}\nlargest relative difference {worst:.2e}")
    assert len(two) == len(one) == 4 and two[0] != two[-1]  # it trained
    assert worst < LOSS_RTOL
    m = got["metrics"]
    assert m["num_processes"] == 2 and len(m["peak_rss_gib_per_process"]) == 2
    assert m["peak_rss_gib"] == pytest.approx(sum(m["peak_rss_gib_per_process"]))
    assert m["tokens_trained"] == 4 * 4 * 31  # 4 steps x 4 blocks of 32 tokens, 31 carrying loss: summed over ranks
    assert m["ppl_after"] == pytest.approx(got["ref_ppl_after"], rel=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", [2, 1])
def test_notebook_runs_sharded_and_one_process(tmp_path, monkeypatch, capfd, num_gpus):
    """The notebook end to end with 2 processes on the CPU (a tiny synthetic shape, NF4): one sidecar, ok, with each
    process's figures aggregated; and with num_gpus 1, the one-process path of before (no per-GPU lists)."""
    import papermill

    from helpers.sweeps.sweep import TRAIN_NOTEBOOK

    monkeypatch.setenv("QLORA_STUDY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    papermill.execute_notebook(
        str(TRAIN_NOTEBOOK), str(tmp_path / "run.ipynb"), progress_bar=False,
        parameters=dict(model="tiny-llama-shape", corpus="random-tokens", quant="nf4", max_steps=3, seq_len=32,
                        batch_size=2, eval_blocks=2, timing_warmup_steps=1, warmup_steps=1, device="cpu",
                        num_gpus=num_gpus, output_dir=str(out)))
    [sidecar] = list(out.glob("*.json"))
    r = json.loads(sidecar.read_text())
    m = r["metrics"]
    assert r["status"] == "ok" and len(r["history"]) == 3 and m["ppl_after"] > 0
    assert "send message from fork" not in capfd.readouterr().err  # no progress widget drawn from a forked process
    assert not list(out.glob(".*"))  # the processes' files are gone
    if num_gpus == 2:
        assert m["num_processes"] == 2 and m["tokens_trained"] == 3 * 2 * 2 * 31
        assert len(m["peak_reserved_gib_per_gpu"]) == 2 and len(r["environment"]["devices"]) == 2
    else:
        assert "num_processes" not in m and "peak_reserved_gib_per_gpu" not in m and m["tokens_trained"] == 3 * 2 * 31


def _rank(peak, energy, tokens, step_time, rss, uuid):
    rows = [{"step": s + 1, "step_time_s": step_time, "step_begin_s": s * step_time, "tokens": tokens,
             "loss": 2.0 - s / 10, "learning_rate": 1e-4, "power_w": 300.0, "energy_j": energy / 4} for s in range(4)]
    metrics = {"peak_rss_gib": rss, "load_s": 10 + step_time, "eval_before_s": 1.0, "train_s": 4 * step_time,
               "eval_after_s": 1.0, "ppl_after": 9.0, **{k: peak for k in sharded.PER_GPU}}
    env = {"device_name": "H200", "device_total_gib": 139.8, "gpu_uuid": uuid}
    return {"metrics": metrics, "history": rows, "energy_window": [1000.0, 1000.0 + energy], "sampled_energy_j": energy,
            "window_s": 4 * step_time, "timing_warmup_steps": 1, "environment": env, "device": f"cuda:{uuid[-1]}"}


def test_aggregate_says_per_gpu_peaks_summed_energy_and_tokens_slowest_time():
    """What the sidecar of a sharded run means, on made-up figures of 2 GPUs (the CPU test has no GPU figures)."""
    m, history, env = sharded.aggregate([_rank(20.0, 400.0, 1000, 1.0, 30.0, "GPU-0"),
                                         _rank(22.0, 600.0, 1000, 1.5, 31.0, "GPU-1")])
    assert m["peak_reserved_gib_per_gpu"] == [20.0, 22.0] and m["peak_reserved_gib"] == 22.0  # the fullest card
    assert m["peak_rss_gib"] == 61.0 and m["peak_rss_gib_per_process"] == [30.0, 31.0]
    assert m["train_s"] == 6.0 and m["load_s"] == 11.5  # the slowest process
    assert m["energy_j"] == 1000.0 and m["tokens_trained"] == 8000  # summed over GPUs / processes
    assert m["energy_j_per_1k_tokens"] == pytest.approx(1000.0 / 8000 * 1000)
    assert m["tokens_per_s"] == pytest.approx(3 * 2000 / (3 * 1.5))  # steady steps: all tokens / slowest step times
    assert m["mean_power_w"] == pytest.approx(1000.0 / 6.0)  # both GPUs together over the longest window
    assert [r["tokens"] for r in history] == [2000] * 4 and history[0]["energy_j"] == 250.0
    assert env["gpu_uuids"] == ["GPU-0", "GPU-1"] and env["gpu_uuid"] == "GPU-0" and env["device_name"] == "H200"
    no_counter = _rank(20.0, 400.0, 1000, 1.0, 30.0, "GPU-1")
    no_counter["energy_window"] = [None, None]
    no_counter["history"] = [{**r, "energy_j": None, "power_w": None} for r in no_counter["history"]]
    m2, _, _ = sharded.aggregate([_rank(20.0, 400.0, 1000, 1.0, 30.0, "GPU-0"), no_counter])
    assert m2["energy_j"] is None  # absent, not half of it
    no_counter["history"] = [{**r, "power_w": 300.0} for r in no_counter["history"]]  # power read, no counter
    m3, _, _ = sharded.aggregate([_rank(20.0, 400.0, 1000, 1.0, 30.0, "GPU-0"), no_counter])
    assert m3["energy_source"] == "nvml_power_sampled" and m3["energy_j"] == 800.0  # both GPUs' sampled energy


def test_a_failed_run_reports_the_process_that_failed_first_not_the_one_stopped_for_it(monkeypatch):
    """On 2 H200s the 70B run without offload ran out of memory in rank 1; the launcher then stopped rank 0 with
    SIGTERM, and the sidecar said 'error: SignalException' (rank 0's) instead of 'oom'."""
    import accelerate

    from helpers.records.files import atomic_write
    from helpers.records.sidecars import is_oom

    def launcher(fn, args, num_processes, use_port):
        folder = Path(args[3])
        atomic_write(folder / "rank0.json", json.dumps({"rank": 0, "error": "SignalException: Process 7 got signal: 15",
                                                        "failed_at": 1001.0}))
        atomic_write(folder / "rank1.json", json.dumps({"rank": 1, "error": "OutOfMemoryError: CUDA out of memory. "
                                                        "Tried to allocate 3.92 GiB", "failed_at": 1000.0}))
        raise RuntimeError("ChildFailedError: the launcher's summary")

    monkeypatch.setattr(accelerate, "notebook_launcher", launcher)
    run = {"run_id": "r", "sidecar": None, "config": {"num_gpus": 2}}
    with pytest.raises(RuntimeError) as e:
        sharded.launch(run, [], [])
    assert str(e.value).startswith("2 processes: rank 1: OutOfMemoryError: CUDA out of memory")
    assert is_oom(str(e.value))


def test_a_sharded_run_says_whether_its_fullest_gpu_fits_the_budget():
    """The 70B shape at 4,096 tokens on 2 H200s capped at 24 GiB: torch's reserve stayed under the cap (23.2 GiB)
    but the whole process (24.76 GiB, context included) would not fit a real 24 GiB card; the sidecar must say so."""
    ranks = [_rank(23.2, 400.0, 1000, 1.0, 60.0, "GPU-0"), _rank(23.0, 400.0, 1000, 1.0, 60.0, "GPU-1")]
    ranks[0]["metrics"]["peak_process_est_gib"], ranks[1]["metrics"]["peak_process_est_gib"] = 24.76, 24.5
    m, _, _ = sharded.aggregate(ranks)
    run = {"metrics": m, "config": {"vram_budget_gib": 24.0}}
    runs.record_budget(run)
    assert run["metrics"]["peak_reserved_within_budget"] is True and run["metrics"]["process_within_budget"] is False
