"""Gradients through quantized layers after an eval pass, on every CPU (helpers/training/quantized.py).

bitsandbytes 0.50 repacks a 4-bit weight for good into an inference layout with no backward when an eval,
no-grad forward runs on a CPU with AVX512-BF16. Where this CPU has the instruction the tests use the real
thing ("native"); everywhere ("simulated") they make bitsandbytes believe the CPU has it and stand in for
its inference kernel with one that has the same flaw (no gradient for the input), so the suite catches this
class of bug on any CI machine.
"""
import copy

import pytest
import torch

from helpers.training import models
from helpers.training.evaluate import held_out_curve, perplexity
from helpers.training.quantized import dequantized_weight, gradient_check, quantized_layers
from helpers.training.telemetry import StepTelemetry
from helpers.training.train import attach_lora, make_trainer

pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402


class _InferenceOnly(torch.autograd.Function):
    """Like bitsandbytes' CPU gemv_4bit kernel: a correct forward, no gradient for the input."""

    @staticmethod
    def forward(ctx, A, weight):
        return (A.float() @ weight.t()).to(A.dtype)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _simulate_avx512bf16(monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        assert getattr(state, "packing_format_for_cpu", False), "only the repacked layout comes here"
        data, st = bnbF._convert_weight_packed_for_cpu_inverse(B.clone(), copy.copy(state))
        return _InferenceOnly.apply(A, bnbF.dequantize_4bit(data, st).float())

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnbF, "gemv_4bit", gemv_4bit)


@pytest.fixture(params=["native", "simulated"])
def avx512bf16_cpu(request, monkeypatch):
    """A CPU on which bitsandbytes repacks 4-bit weights at eval: this one if it has AVX512-BF16, or simulated."""
    if request.param == "native" and not bnbF.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16 (the simulated case covers it)")
    if request.param == "simulated":
        _simulate_avx512bf16(monkeypatch)
    return request.param


def _input_grad_error(layer) -> float:
    """Relative error of the input gradient of one quantized layer against the float32 dequantized reference;
    inf if no gradient reaches the input."""
    torch.manual_seed(1)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    up = torch.randn(3, layer.out_features)
    layer(x).backward(up)
    if x.grad is None:
        return float("inf")
    ref = up @ dequantized_weight(layer)
    return ((x.grad - ref).norm() / ref.norm()).item()


def _load_nf4(tiny_model_dir):
    net, _, info = models.load_model(str(tiny_model_dir), "nf4", "float32", True, device="cpu")
    return net, info


def test_every_4bit_layer_trains_after_an_eval_pass(avx512bf16_cpu, tiny_model_dir):
    net, info = _load_nf4(tiny_model_dir)
    blocks = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    perplexity(net, blocks, batch_size=2)  # the "perplexity before training" pass
    net.train()
    layers = quantized_layers(net)
    assert len(layers) == 2 * 7, "every attention and MLP projection of the 2 layers is 4-bit"
    errors = {name: _input_grad_error(layer) for name, layer in layers}
    assert max(errors.values()) < 1e-5, errors
    assert info["cpu_repack_disabled_layers"] == 14


def test_gradients_hold_through_eval_during_and_after_training(avx512bf16_cpu, tiny_model_dir):
    """eval_every scores the model mid-training and the run scores it after: neither may break the backward."""
    net, _ = _load_nf4(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    train, held = torch.randint(0, 128, (8, 32), generator=gen), torch.randint(0, 128, (2, 32), generator=gen)
    net = attach_lora(net, "nf4", 4, 8, 0.0)
    steps = StepTelemetry("cpu", tokens_per_step=2 * 31)
    trainer = make_trainer(net, train, device="cpu", dtype="float32", quant="nf4", max_steps=3, batch_size=2,
                           grad_accum=1, learning_rate=1e-3, warmup_steps=0, optimizer="adamw_torch", seed=0,
                           callbacks=[steps, held_out_curve(net, held, 1, steps)], progress=False)
    trainer.train()
    assert all("eval_ppl" in row for row in steps.history)  # the mid-training eval passes did run
    perplexity(net, held)  # and the one after training
    errors = {name: _input_grad_error(layer) for name, layer in quantized_layers(net)}
    assert max(errors.values()) < 1e-5, errors


def test_gradient_check_passes_on_a_sound_model(tiny_model_dir):
    net, _ = _load_nf4(tiny_model_dir)
    perplexity(net, torch.randint(0, 128, (2, 16)))
    out = gradient_check(net)
    assert out["layer"] and out["rel_error"] < out["tolerance"]


def test_gradient_check_stops_a_model_whose_4bit_backward_is_broken(avx512bf16_cpu, tiny_model_dir):
    """Undo the fix on one model (as a future library change might): the guard must refuse to train it."""
    net, _ = _load_nf4(tiny_model_dir)
    for _, layer in quantized_layers(net):
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such a CPU
    perplexity(net, torch.randint(0, 128, (2, 16)))  # repacks every layer
    with pytest.raises(RuntimeError, match="no gradient reaches the input of the quantized layer"):
        gradient_check(net)


def test_gradient_check_has_nothing_to_check_without_quantized_layers(tiny_model):
    assert gradient_check(tiny_model)["layer"] is None


def test_gradient_check_int8(tiny_model_dir):
    net, _, _ = models.load_model(str(tiny_model_dir), "int8", "float32", True, device="cpu")
    out = gradient_check(net)
    assert out["layer"] and out["rel_error"] < out["tolerance"]
