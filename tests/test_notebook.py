"""Executes the training notebook with papermill on the real default model (a handful of steps)."""
import json
import math

import papermill
import pytest

from helpers.sweeps.sweep import TRAIN_NOTEBOOK

FAST = dict(max_steps=3, seq_len=64, batch_size=2, eval_blocks=4, timing_warmup_steps=1, warmup_steps=1)


@pytest.mark.slow
def test_notebook_runs_default_model_and_writes_sidecar(tmp_path):
    out = tmp_path / "runs"
    papermill.execute_notebook(str(TRAIN_NOTEBOOK), str(tmp_path / "run.ipynb"),
                               parameters=dict(FAST, quant="nf4", lora_r=8, output_dir=str(out)), progress_bar=False)
    [sidecar] = list(out.glob("*.json"))
    r = json.loads(sidecar.read_text())
    assert r["status"] == "ok" and r["error"] is None
    assert r["config"]["quant"] == "nf4" and r["config"]["lora_r"] == 8 and len(r["config"]) == 36
    assert r["config"]["stack"] == "hf" and not [k for k in (*r["metrics"], *r["environment"]) if "unsloth" in k]
    m = r["metrics"]
    for k in ("ppl_before", "ppl_after", "tokens_per_s", "tokens_per_s_window", "peak_rss_gib", "weights_gib", "load_s",
              "train_s"):
        assert m[k] is not None and math.isfinite(m[k]) and m[k] > 0, k
    assert 0 < m["params_trainable"] < m["params_total"]
    assert m["grad_check_rel_error"] < 1e-4 and m["grad_check_s"] > 0  # the guard ran, on a 4-bit layer
    assert len(r["history"]) == 3 and all(h["step_time_s"] > 0 for h in r["history"])
    assert r["environment"]["bitsandbytes"] and r["environment"]["device"] == "cpu"
    # the Trainer's progress bar (steps, elapsed, and time left while it runs) is in the executed notebook;
    # the progress file the sweep polls is gone once the sidecar holds the history
    assert "<progress value='3' max='3'" in (tmp_path / "run.ipynb").read_text()
    assert not list(out.glob("*.progress"))


@pytest.mark.slow
@pytest.mark.parametrize("bad, message", [
    (dict(quant="int4"), "quant='int4'"),
    # what `papermill -p learning_rate abc` passes: a str, refused by the parameters cell's declared type
    (dict(learning_rate="abc"), "learning_rate='abc' is a str, the notebook expects float"),
    (dict(run_id="../../somewhere"), "run_id='../../somewhere' is not allowed"),
])
def test_notebook_refuses_bad_value_before_loading(tmp_path, bad, message):
    out = tmp_path / "runs"
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(TRAIN_NOTEBOOK), str(tmp_path / "bad.ipynb"),
                                   parameters=dict(bad, output_dir=str(out)), progress_bar=False)
    assert "ValueError" in str(e.value) and message in str(e.value)
    assert e.value.exec_count == 3  # the cell right after the parameters
    assert not out.exists()  # no sidecar, let alone one claiming success


@pytest.mark.slow
def test_notebook_runs_with_the_cpu_levers_on_and_a_held_out_curve(tmp_path):
    out = tmp_path / "runs"
    on = dict(chunked_loss=4, offload_activations=True, keep_16bit=True)
    nb = tmp_path / "levers.ipynb"
    papermill.execute_notebook(str(TRAIN_NOTEBOOK), str(nb), progress_bar=False,
                               parameters=dict(FAST, quant="nf4", output_dir=str(out), eval_every=2, **on))
    [sidecar] = list(out.glob("*.json"))
    r = json.loads(sidecar.read_text())
    assert r["status"] == "ok" and all(r["config"][k] == v for k, v in on.items())
    assert all(math.isfinite(h["loss"]) for h in r["history"])
    # the held-out curve: steps 2 and 3 (the last); the last point is the model ppl_after scores
    assert [h["step"] for h in r["history"] if h.get("eval_ppl")] == [2, 3]
    assert math.isclose(r["history"][-1]["eval_ppl"], r["metrics"]["ppl_after"], rel_tol=1e-6)
    assert "levers: {'offload_activations': True, 'keep_16bit': True, 'chunked_loss': 4}" in nb.read_text()
