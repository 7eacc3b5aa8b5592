"""What bitsandbytes does to a quantized layer between loading and training, and the check that it still trains.

Two things, in the order a run meets them:

1. `keep_training_layout(model)`, at load. bitsandbytes 0.50's `Linear4bit.forward`
   (bitsandbytes/nn/modules.py) repacks a 4-bit weight, in place and for good, into a CPU inference layout
   (`quant_state.packing_format_for_cpu`) the first time the layer runs on a CPU that has AVX512-BF16, in
   eval mode, on an input that needs no gradient: exactly our "perplexity before training". Every later
   forward, training included, then goes through `gemv_4bit` (bitsandbytes/autograd/_functions.py
   `matmul_4bit`), an op with no autograd formula: the gradient with respect to the layer's input is
   silently `None`, and LoRA trains on what reaches it through the residual stream alone. On a CPU without
   the instruction none of this happens, so the same study gives another answer there. We switch the
   repacking off on every 4-bit layer (its `support_avx512bf16_for_cpu` flag, read only by that branch), so
   every eval pass (before, during with eval_every, after) and training use the one dequantize-and-matmul
   path that every CPU and GPU use. The cost: eval on such a CPU forgoes the faster inference kernel.
2. `gradient_check(model)`, right before training: one small batch through one quantized layer, the
   gradient with respect to its input against a float32 reference computed from the dequantized weight.
   A library change that breaks the backward of quantized layers on some CPU or GPU then stops the run
   instead of publishing a wrong number.
"""
import copy
import logging
import time

import torch

def _no_hub_kernel_warning(record) -> bool:
    """On a CPU with AVX512-BF16, importing bitsandbytes tries to fetch an optional inference kernel from a model
    hub's "kernels-community" (bitsandbytes/backends/cpu/ops.py) and warns when it cannot, in every kernel of a
    sweep. This study runs without a hub by design, and its training path never uses that inference kernel
    (keep_training_layout below), so the warning says nothing about our figures: it is dropped, once, here."""
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_hub_kernel_warning)

# relative error of the input gradient against the float32 reference: the compute dtype's rounding passes,
# a missing or wrong backward (error ~1) does not
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def quantized_layers(model) -> list:
    """(name, module) of every bitsandbytes 4-bit or 8-bit linear layer in the model (LoRA's base layers)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def keep_training_layout(model) -> int:
    """Switch off bitsandbytes' CPU inference repacking on every 4-bit layer (see the module docstring).

    Returns how many layers it switched off (0 where the CPU lacks AVX512-BF16 or nothing is 4-bit)."""
    switched = 0
    for _, m in quantized_layers(model):
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def dequantized_weight(layer) -> torch.Tensor:
    """The float32 [out, in] weight a quantized layer stands for, from its stored codes and constants."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        state = w.quant_state
        data = w.data
        if getattr(state, "packing_format_for_cpu", False):  # undo a repack on a copy, to read the values
            data, state = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.copy(state))
        return F.dequantize_4bit(data, state).float()
    # Linear8bitLt: int8 codes per output row, scaled by the row's absmax / 127
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    return w.data.float() * scb.float().unsqueeze(1) / 127.0


def gradient_check(model, rows: int = 4, seed: int = 0) -> dict:
    """One small batch's input gradient through the first quantized layer against a float32 reference.

    Returns {"layer", "rel_error", "tolerance", "seconds"}; raises RuntimeError naming the layer if the
    gradient is missing or off. Leaves the model as it found it (mode, parameters' gradients); where the model
    has no quantized layer, returns {"layer": None, ...} without checking anything."""
    t0 = time.perf_counter()
    layers = quantized_layers(model)
    if not layers:
        return {"layer": None, "rel_error": None, "tolerance": None, "seconds": time.perf_counter() - t0}
    name, layer = layers[0]
    was_training = layer.training
    weight = layer.weight
    device = weight.device
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    if dtype not in GRAD_TOLERANCE:
        dtype = torch.float32
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(rows, layer.in_features, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    upstream = torch.randn(rows, layer.out_features, generator=g).to(device=device, dtype=dtype)
    layer.train()
    try:
        with torch.enable_grad():
            y = layer(x)
            if y.requires_grad:  # else nothing in the layer's forward is differentiable: x.grad stays None
                y.backward(upstream.to(y.dtype))
    finally:
        layer.train(was_training)
    w_ref = dequantized_weight(layer).to(device)
    ref = upstream.float() @ w_ref  # d(sum(upstream * x @ W^T)) / dx
    if x.grad is None:
        raise RuntimeError(
            f"gradient check failed: no gradient reaches the input of the quantized layer {name!r} "
            f"({type(layer).__name__}, bitsandbytes): LoRA would train on wrong gradients here. "
            "A bitsandbytes kernel without a backward is in the path (see helpers/training/quantized.py); "
            "stopping before training rather than publishing a wrong number.")
    err = ((x.grad.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = GRAD_TOLERANCE[dtype]
    if not hasattr(layer, "compute_dtype"):  # int8 layers compute their matmuls in float16 on a GPU
        tol = max(tol, GRAD_TOLERANCE[torch.float16])
    if not err <= tol:
        raise RuntimeError(
            f"gradient check failed: the input gradient of the quantized layer {name!r} differs from the "
            f"dequantized float32 reference by {err:.3g} (relative; allowed {tol:g} in {str(dtype)[6:]}): "
            "this bitsandbytes build computes a wrong backward here; stopping before training.")
    return {"layer": name, "rel_error": err, "tolerance": tol, "seconds": time.perf_counter() - t0}
