"""eval_every: held-out perplexity during training, kept out of the training time and energy, and the analysis
that says whether it has settled."""
import time

import pandas as pd
import pytest
import torch

from helpers import analysis
from helpers.training import evaluate, models, runs, telemetry
from helpers.training.train import attach_lora, make_trainer


def test_curve_is_scored_at_every_nth_and_last_step_and_left_out_of_step_times(tiny_model_dir, monkeypatch):
    torch.manual_seed(0)
    net, _, _ = models.load_model(str(tiny_model_dir), quant="none", dtype="float32")
    net = attach_lora(net, "none", 4, 8, 0.0)
    blocks = torch.randint(0, 128, (16, 32))
    held_out = torch.randint(0, 128, (4, 32))
    steps = telemetry.StepTelemetry("cpu", tokens_per_step=2 * 31)
    real = evaluate.perplexity

    def slow_perplexity(*a, **kw):  # an evaluation far longer than a tiny step: it must not land in step times
        time.sleep(0.5)
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "perplexity", slow_perplexity)
    curve = evaluate.held_out_curve(net, held_out, every=2, steps=steps)
    trainer = make_trainer(net, blocks, device="cpu", dtype="float32", quant="none", max_steps=5, batch_size=2,
                           grad_accum=1, learning_rate=1e-2, warmup_steps=1, optimizer="adamw_torch", seed=0,
                           callbacks=[steps, curve], progress=False)
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    scored = [r["step"] for r in steps.history if "eval_ppl" in r]
    assert scored == [2, 4, 5]
    assert all(r["step_time_s"] < 0.5 for r in steps.history)
    assert steps.excluded_s >= 1.5 and steps.window_s <= wall - 1.5
    monkeypatch.setattr(evaluate, "perplexity", real)
    assert steps.history[-1]["eval_ppl"] == pytest.approx(real(net, held_out, batch_size=8)["ppl"], rel=1e-6)


def test_excluded_energy_comes_off_the_counter_figure():
    s = telemetry.StepTelemetry("cpu", tokens_per_step=10)
    s.history = [{"step": 1, "step_time_s": 1.0, "tokens": 10, "power_w": None}]
    s.energy_start_j, s.energy_end_j = 100.0, 160.0
    s.exclude(2.0, 15.0)
    assert s.summary(0)["energy_j"] == 45.0


BASE = dict(model="smollm2-135m", quant="nf4", dtype="auto", corpus="pydoc", optimizer="adamw_torch", lora_r=8,
            max_steps=5, batch_size=2, grad_accum=1, lora_alpha=16, lora_dropout=0.05, learning_rate=1e-4,
            warmup_steps=1, timing_warmup_steps=1, vram_budget_gib=0.0, eval_fraction=0.1, eval_blocks=2,
            device="cpu", seq_len=128, seed=0, output_dir="x", run_id="")


@pytest.mark.parametrize("every", [-1, 6, True, 1.5])
def test_bad_eval_every_is_refused_by_name(every):
    with pytest.raises(ValueError, match=f"eval_every={every!r} is not allowed: a whole number of steps in 0 .. max_steps"):
        runs.validate({**BASE, "eval_every": every})


def test_eval_every_off_keeps_run_ids():
    assert runs.run_id({**BASE, "eval_every": 0}) == runs.run_id(BASE)
    assert runs.run_id({**BASE, "eval_every": 2}) != runs.run_id(BASE)


def history(curves: dict) -> pd.DataFrame:
    rows = [{"run_id": f"{c}-{i}", "config": c, "step": s, "eval_ppl": v, "status": "ok", "synthetic": False}
            for c, seeds in curves.items() for i, curve in enumerate(seeds) for s, v in curve]
    return pd.DataFrame(rows)


def test_held_out_curves_say_which_configurations_settled():
    flat = [[(100, 20.0), (200, 15.0), (300, 12.05), (400, 12.0)]] * 2
    falling = [[(100, 20.0), (200, 16.0), (300, 14.0), (400, 13.0)], [(100, 20.0), (200, 16.0), (300, 14.0), (400, 13.2)]]
    fig, line = analysis.held_out_curves(history({"none · r8": flat, "nf4 · r8": falling}))
    assert len(fig.data) == 2
    # the mean of the two nf4 seeds goes 14.0 -> 13.1 from step 300 to 400: -6.43%; none moves -0.41%
    assert line.startswith("1 of 2 configurations settled") and "nf4 · r8, -6.43% from step 300 to 400" in line


def test_held_out_curves_absent_without_eval_every():
    fig, line = analysis.held_out_curves(pd.DataFrame({"run_id": ["a"], "step": [1], "loss": [2.0]}))
    assert fig is None and "eval_every 0" in line
