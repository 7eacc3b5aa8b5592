"""Count what happened (issue 15): a step's tokens are the loss tokens its micro-batches held, counted as the
Trainer fetched them (the last batch of an epoch holds fewer blocks), and tokens/s is given over the steady steps'
whole window (first steady step's start to the last's end: data loading, logging and telemetry between steps
included) beside the figure over the steps alone."""
import pytest
import torch

from helpers.training import models, telemetry
from helpers.training.train import attach_lora, make_trainer


def train(model_dir, n_blocks, batch_size, grad_accum, max_steps, tokens_per_step=None):
    net, _, _ = models.load_model(str(model_dir), quant="none", dtype="float32")
    net = attach_lora(net, "none", 4, 8, 0.0, gradient_checkpointing=False)
    blocks = torch.randint(0, 128, (n_blocks, 16), generator=torch.Generator().manual_seed(0))
    steps = telemetry.StepTelemetry("cpu", tokens_per_step=tokens_per_step)
    trainer = make_trainer(net, blocks, device="cpu", dtype="float32", quant="none", max_steps=max_steps,
                           batch_size=batch_size, grad_accum=grad_accum, learning_rate=1e-3, warmup_steps=0,
                           optimizer="adamw_torch", seed=0, callbacks=[steps], progress=False)
    trainer.train()
    return steps


def test_the_last_batch_of_an_epoch_counts_its_own_blocks(tiny_model_dir):
    # 5 blocks of 16 tokens (15 loss tokens each) at batch 2: each epoch is 2 + 2 + 1 blocks
    steps = train(tiny_model_dir, 5, 2, 1, 6, tokens_per_step=2 * 15)  # the old fixed count, now only a fallback
    assert [r["tokens"] for r in steps.history] == [30, 30, 15, 30, 30, 15]
    assert steps.summary(warmup_steps=0)["tokens_trained"] == 150  # not 6 x 30 = 180


def test_gradient_accumulation_counts_every_micro_batch(tiny_model_dir):
    # batch 1 x 2 micro-batches over 3 blocks: epochs of 2 + 1 blocks per optimizer step
    steps = train(tiny_model_dir, 3, 1, 2, 4)
    assert [r["tokens"] for r in steps.history] == [30, 15, 30, 15]


def test_loss_tokens_leave_out_ignored_labels_and_the_first_position():
    labels = torch.tensor([[5, 6, 7, 8], [-100, -100, 3, 4]])
    assert telemetry.loss_tokens({"labels": labels}) == 3 + 2


def test_tokens_per_s_over_the_window_and_over_the_steps(tiny_model_dir):
    steps = train(tiny_model_dir, 8, 2, 1, 5)
    s = steps.summary(warmup_steps=1)
    steady = steps.history[1:]
    step_time = sum(r["step_time_s"] for r in steady)
    window = steady[-1]["step_begin_s"] + steady[-1]["step_time_s"] - steady[0]["step_begin_s"]
    assert s["steady_window_s"] == pytest.approx(window) and window > step_time  # the gaps between steps count
    assert s["tokens_per_s_window"] == pytest.approx(4 * 30 / window)
    assert s["tokens_per_s_window"] < s["tokens_per_s"]
    assert s["tokens_per_s"] == pytest.approx(4 * 30 / step_time)


def test_window_by_hand_and_evaluations_left_out():
    s = telemetry.StepTelemetry("cpu")
    # steps of 1 s starting every 1.5 s (0.5 s between steps); an evaluation after step 2 was left out already
    s.history = [{"step": i, "step_time_s": 1.0, "step_begin_s": 1.5 * (i - 1), "tokens": 100, "power_w": None,
                  "energy_j": None} for i in range(1, 5)]
    out = s.summary(warmup_steps=1)
    assert out["steady_window_s"] == pytest.approx(4.5 + 1.0 - 1.5)  # from step 2's start to step 4's end
    assert out["tokens_per_s_window"] == pytest.approx(300 / 4.0) and out["tokens_per_s"] == pytest.approx(100)
    # a fallback-free telemetry whose Trainer counted nothing: no token figure rather than a made-up one
    s.history[0]["tokens"] = None
    assert s.summary(warmup_steps=1)["tokens_per_s"] is None and s.summary(1)["tokens_trained"] is None
