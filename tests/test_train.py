import math

import pytest
import torch

from helpers.training import models, telemetry
from helpers.training.train import attach_lora, make_trainer


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_lora_trains_with_telemetry_and_checkpointing_on(tiny_model_dir, quant):
    net, _, _ = models.load_model(str(tiny_model_dir), quant=quant, dtype="float32")
    assert not net.training  # from_pretrained returns eval mode...
    net = attach_lora(net, quant, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assert net.training and net.base_model.model.is_gradient_checkpointing  # ...so attach_lora switches it on
    trainable, total = models.count_parameters(net)
    assert 0 < trainable < total
    assert all(not p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)

    torch.manual_seed(0)
    blocks = torch.randint(0, 128, (16, 32))
    steps = telemetry.StepTelemetry("cpu", tokens_per_step=2 * 1 * 31)
    trainer = make_trainer(net, blocks, device="cpu", dtype="float32", quant=quant, max_steps=5, batch_size=2,
                           grad_accum=1, learning_rate=1e-2, warmup_steps=1, optimizer="adamw_torch", seed=0,
                           callbacks=[steps], progress=False)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    trainer.train()
    assert [r["step"] for r in steps.history] == [1, 2, 3, 4, 5]
    keys = set(steps.history[0])
    assert all(set(r) == keys for r in steps.history)  # same keys every step
    assert all(r["step_time_s"] > 0 and math.isfinite(r["loss"]) and r["rss_gib"] > 0 for r in steps.history)
    assert all(r["allocated_gib"] is None and r["power_w"] is None for r in steps.history)  # absent on CPU, not 0
    s = steps.summary(warmup_steps=2)
    assert s["steps"] == 5 and s["tokens_trained"] == 5 * 62
    steady = sum(r["step_time_s"] for r in steps.history[2:])
    assert math.isclose(s["tokens_per_s"], 3 * 62 / steady)
    assert s["energy_j"] is None and s["energy_j_per_1k_tokens"] is None  # no counter on CPU: absent
    changed = [n for n, p in net.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # the adapters learned something


def test_target_modules_by_name(tiny_model_dir):
    net, _, _ = models.load_model(str(tiny_model_dir), quant="none", dtype="float32")
    net = attach_lora(net, "none", 4, 8, 0.0, target_modules="q_proj, v_proj")
    names = {n.split(".")[-4] for n, _ in net.named_parameters() if "lora_A" in n}
    assert names == {"q_proj", "v_proj"}


def test_phase_timer_records_seconds():
    t = {}
    with telemetry.phase("load", t):
        sum(range(10000))
    assert t["load_s"] > 0
    with pytest.raises(ZeroDivisionError), telemetry.phase("boom", t):
        1 / 0
    assert "boom_s" in t


def test_one_process_trains_on_one_gpu_where_the_machine_shows_several(tiny_model, monkeypatch):
    """On 2 H200s a num_gpus=1 run (a sweep of several num_gpus leaves runs unpinned) trained 2 blocks a step at
    batch_size 1: the Trainer saw 2 GPUs, wrapped the model in DataParallel and doubled the batch. A one-process
    run is one GPU (several are num_gpus > 1, FSDP). Faked here: the CPU reports two CUDA devices."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    net = attach_lora(tiny_model, "none", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    trainer = make_trainer(net, torch.randint(0, 128, (8, 16)), device="cuda", dtype="float32", quant="none",
                           max_steps=1, batch_size=1, grad_accum=1, learning_rate=1e-3, warmup_steps=0,
                           optimizer="adamw_torch", seed=0, progress=False)
    assert trainer.args.n_gpu == 1 and trainer.args.train_batch_size == 1
