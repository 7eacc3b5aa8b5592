"""Will it fit? The peak GPU memory of one LoRA/QLoRA training run, predicted from the model's shape, without torch.

    python -m helpers.fit --model llama-3.1-8b-shape --card 12 --quant nf4 --seq-len 2048
    python -m helpers.fit --model Qwen/Qwen2.5-7B --card 8 --max-seq-len        # a hub id needs the hub

The run is the training notebook's (notebooks/01_train.ipynb): its parameter names, its defaults, its order of
work (load -> perplexity before -> train -> perplexity after), transformers' Trainer with bf16 autocast, LoRA on
the linear layers, every lever of helpers/training/levers.py. The peak is the largest of four moments (the loss, the
backward of a layer, the optimizer step, the evaluation), each the sum of what is alive then (per micro-batch of
T = batch_size x seq_len tokens):

    weights        base weights as held on the GPU. 16-bit: 2 B/param. NF4/FP4: 0.5 B per linear weight plus
                   bitsandbytes' blockwise constants (one fp32 absmax per 64 weights = 0.5 bit/param; with
                   double quant an 8-bit absmax per 64 and an fp32 one per 256 blocks = 0.127 bit/param). int8:
                   1 B per linear weight + one fp32 scale per output row. Embeddings, head, norms and biases
                   stay 16-bit, and peft's prepare_model_for_kbit_training upcasts them to fp32 (not with
                   keep_16bit). The output head is never quantized.
    adapters       LoRA A and B (r x (in + out) per targeted linear), fp32 (peft's autocast_adapter_dtype),
                   their fp32 gradients, and the optimizer's state (AdamW: 8 B/param; 8-bit AdamW 2 B/param;
                   paged optimizers keep theirs in CUDA unified memory, outside torch's allocator).
    activations    what autograd keeps for backward. Without checkpointing, every layer's saved tensors
                   (layer_bytes_per_token, enumerated below); with checkpointing, each layer's input (the
                   residual stream: fp32 after peft's upcast, else 16-bit) plus one layer rebuilt in backward.
                   offload_activations moves the checkpoints to host memory; tiled_mlp keeps one sequence
                   slice's MLP tensors; fused_kernels (Liger) keeps no normalised copies and no SiLU output.
    logits/loss    the head and cross-entropy: T x vocab in bf16, its fp32 copy, log-softmax and their
                   gradients (LOGITS_BYTES per token per vocab entry, fitted in a derived bracket), plus a bf16
                   copy of an fp32 head that autocast keeps for backward. chunked_loss N: one chunk's worth.
                   fused_kernels: Liger's fused linear cross-entropy, chunks of the logits only.
    eval           perplexity before training runs at batch 2 x batch_size (at most the eval blocks) without
                   autocast or grad (the peak counters are read before the pass after training): its logits and
                   their fp32 copies (EVAL_LOGITS_BYTES); it sets the peak of small models with big vocabularies.
    reserve        torch's caching allocator holds more than it has allocated: a share of one layer's
                   intermediate tensors (RESERVE_TRANSIENT) and of the kept activations (RESERVE_KEPT);
                   evaluation runs first on an empty cache and training reuses its blocks, but with eval_every
                   the evaluations' blocks are cached beside training's. An uncapped allocator also keeps what
                   a moment's allocations cannot reuse: at the loss, the 16-bit logits' segment (freed before
                   backward makes its fp32 buffers, which are twice its size). Under an allocator cap (or on a full
                   card) the allocator frees its cache before it fails: a run fails when a moment's allocated
                   memory plus CAP_HEADROOM (the loss) or CAP_HEADROOM_LAYER (the others) times its transient
                   tensors exceeds the cap.
    outside torch  the CUDA context, cuBLAS/cuBLASLt handles and kernels loaded by bitsandbytes: NVML's
                   process figure minus torch's reserved, measured at 0.74 GiB (0.80 with int8) on an H200
                   with CUDA 12 (OUTSIDE_TORCH_GIB). A consumer card's context is often smaller (0.3-0.5 GiB):
                   the prediction errs on the safe side there.

Derived from shapes and documented library behaviour: every byte count above, the per-layer enumeration in
layer_bytes_per_token included. Measured, not fitted (3): OUTSIDE_TORCH_GIB and OUTSIDE_TORCH_INT8_GIB (NVML
minus torch, the same in every run of its kind) and WORKSPACE_GIB (allocated after a step minus what it should
hold). Fitted (10 parameters, by tools/fit_constants.py on the committed H200 runs of reports/gpu-7b, levers,
fast-arm, quality, quality-steps and the max-context probes; the pre-registered runs of parameters/fit-check.yaml
are never used): LOGITS_BYTES and EVAL_LOGITS_BYTES (how many T x vocab buffers are alive at the loss and in
evaluation; derivation brackets them, freeing order decides), ACT_SCALE (share of the enumerated per-layer tensors
autograd keeps: 1.12, so the enumeration is within 12%), COMPILE_SCALE (what torch.compile's partitioner keeps),
INT8_EXTRA (bitsandbytes' int8 backward: not derivable from its documentation, from one 7B run and the quality
sweep's 135M ones), RESERVE_TRANSIENT, RESERVE_KEPT and EVAL_EVERY_RESERVE (the caching allocator's
fragmentation), CAP_HEADROOM and CAP_HEADROOM_LAYER (what still has to fit under a cap).

No torch import: the CLI answers in well under a second on any machine (tests check sys.modules).
"""
import argparse
import json
import math
from pathlib import Path

from helpers.records import registry
from helpers.records.files import atomic_write
from helpers.records.paths import PROJECT_ROOT
from helpers.records.sidecars import read_sidecar

GIB = 2**30

# The notebook's choices, by name (tests check these agree with helpers.train, helpers.levers, helpers.models).
OPTIMIZER_STATE_BYTES = {  # bytes of optimizer state per trainable parameter, and where it lives
    "adamw_torch": 8, "adamw_torch_fused": 8,  # exp_avg + exp_avg_sq, fp32
    "adamw_8bit": 2, "paged_adamw_8bit": 2,    # two 8-bit states (+ blockwise constants, < 1%)
    "paged_adamw_32bit": 8, "sgd": 0,          # the Trainer's "sgd": torch SGD without momentum
}
PAGED = ("paged_adamw_8bit", "paged_adamw_32bit")  # state in CUDA unified memory: outside torch's allocator
OPTIMIZER_TEMP_BYTES = {"adamw_torch": 4}  # foreach AdamW: one fp32 temporary per parameter (sqrt of exp_avg_sq)
LEVERS, COUNT_LEVERS = registry.LEVERS, tuple(registry.COUNT_LEVERS)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}  # auto: bfloat16 on a GPU
QUANT_BLOCK = 64          # bitsandbytes 4-bit blocksize (weights per absmax)
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level fp32 constant with double quant

# The notebook's defaults for what the predictor needs (notebooks/01_train.ipynb parameters cell).
DEFAULTS = dict(model=registry.DEFAULT_MODEL, quant="nf4", dtype="auto", double_quant=True, lora_r=8,
                lora_dropout=0.05, target_modules="all-linear", batch_size=2, seq_len=256, grad_accum=1,
                gradient_checkpointing=True, optimizer="adamw_torch", eval_blocks=16, eval_every=0,
                vram_budget_gib=0.0, fp32_upcast=False, fused_kernels=False, torch_compile=False, offload_activations=False,
                keep_16bit=False, chunked_loss=0, tiled_mlp=0)

# --- fitted and measured constants (see the module docstring; values from tools/fit_constants.py) -----------
LOGITS_BYTES = 12.0         # per token per vocab entry at the loss's peak; derived bracket 12 (fp32 log-softmax,
#                             its gradient and the gradient of its input) .. 18 (and the bf16 logits and fp32 copy)
EVAL_LOGITS_BYTES = 9.0     # per token per vocab entry in evaluate.perplexity; derived 10 (16-bit logits, an fp32
#                             copy, log-softmax) .. 12 (fp32 logits after the upcast, and a contiguous copy): the
#                             fit says one buffer fewer than derived; we do not know which
ACT_SCALE = 1.12            # share of the enumerated per-layer tensors that autograd keeps
COMPILE_SCALE = 0.56        # torch.compile (regional) without checkpointing: share of a layer's tensors it keeps
INT8_EXTRA = 26.0           # int8: bytes per token per layer per hidden unit kept by bitsandbytes' int8 path
RESERVE_TRANSIENT = 1.25    # reserved over allocated: share of one layer's intermediate tensors (the forward pass
RESERVE_KEPT = 0.09         # frees them between kept ones) and of the kept activations
EVAL_EVERY_RESERVE = 1.9    # with eval_every: reserved grows by this many times the evaluation's transient
CAP_HEADROOM = 0.76         # under an allocator cap, fragmentation that still has to fit: share of the loss's
CAP_HEADROOM_LAYER = 0.24   # transient (a few logit-sized blocks), and of the other moments' (many smaller ones)
OUTSIDE_TORCH_GIB = 0.74    # measured: CUDA context + cuBLAS + libraries, NVML minus torch reserved (H200, CUDA 12)
OUTSIDE_TORCH_INT8_GIB = 0.80  # measured: the same with bitsandbytes' int8 kernels loaded
WORKSPACE_GIB = 0.07        # measured: allocated after a step minus weights + adapters + AdamW state (4.61 - 4.54
#                             GiB for the 7B shape): cuBLAS workspaces torch allocates through its own allocator


# --- the model's shape ---------------------------------------------------------------------------------------

def read_config(model: str) -> dict:
    """A model's config.json as a dict: a synthetic shape or the embedded default from the registry (the
    converted folder's config.json if the cache has it), a local folder's config.json, or a hub id's (needs the
    hub). Raises ValueError naming what is allowed, or OSError when a hub id cannot be reached."""
    if model in registry.SYNTHETIC:
        return dict(registry.SYNTHETIC[model]["config"])
    if model in registry.EMBEDDED:
        cached = registry.cache_dir() / model / "config.json"
        return json.loads(cached.read_text()) if cached.exists() else dict(registry.EMBEDDED[model]["config"])
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json: is it a transformers model folder?")
        return json.loads((path / "config.json").read_text())
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    if registry.looks_like_hub_id(model):
        try:
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(model, "config.json")).read_text())
        except Exception as e:  # offline, gated, or no such repo
            raise OSError(f"could not read config.json of {model!r} from the Hugging Face hub "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass a local folder instead") from e
    raise ValueError(f"model={model!r} is not a known model: use one of {sorted(registry.EMBEDDED)} (embedded), "
                     f"{sorted(registry.SYNTHETIC)} (synthetic shapes), a local folder with config.json, "
                     "a config.json file, or a Hugging Face id ('owner/name')")


def shape(config: dict) -> dict:
    """The numbers the predictor needs from a config.json (a multimodal config's text part)."""
    c = config.get("text_config") or config
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in c]
    if missing:
        raise ValueError(f"config has no {missing}: not a decoder-only transformer config this predictor knows")
    h, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads") or heads
    qkv_bias = c.get("attention_bias", False) or c.get("model_type") in ("qwen2", "qwen2_moe")  # Qwen2: always
    return dict(model_type=c.get("model_type", "?"), vocab=c["vocab_size"], hidden=h, inter=c["intermediate_size"],
                layers=c["num_hidden_layers"], q_dim=heads * head_dim, kv_dim=kv * head_dim,
                tied=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
                qkv_bias=bool(qkv_bias), context=c.get("max_position_embeddings"))


def linear_dims(s: dict) -> dict:
    """(in, out) of each linear layer of one decoder layer."""
    h, q, kv, i = s["hidden"], s["q_dim"], s["kv_dim"], s["inter"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def targets(target_modules: str) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return registry.LINEARS
    names = tuple(t.strip() for t in target_modules.split(",") if t.strip())
    bad = [n for n in names if n not in registry.LINEARS]
    if bad or not names:
        raise ValueError(f"target_modules={target_modules!r} is not allowed: 'all-linear' or a comma-separated "
                         f"list of {list(registry.LINEARS)}")
    return names


def param_counts(s: dict) -> dict:
    """Parameters by kind: quantizable linear weights, and what stays 16-bit (embeddings, head, norms, biases)."""
    dims = linear_dims(s)
    linear = s["layers"] * sum(a * b for a, b in dims.values())
    bias = s["layers"] * (s["q_dim"] + 2 * s["kv_dim"]) if s["qkv_bias"] else 0
    embed = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
    norms = (2 * s["layers"] + 1) * s["hidden"]
    rows = s["layers"] * sum(b for _, b in dims.values())  # output rows of the linears (int8 scales)
    return dict(linear=linear, other=embed + norms + bias, embed=embed, rows=rows,
                total=linear + embed + norms + bias)


# --- the configuration ---------------------------------------------------------------------------------------

def check(cfg: dict) -> dict:
    """The configuration with defaults filled in; ValueError naming the bad value and what is allowed."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}: use the training notebook's names {sorted(DEFAULTS)}")
    c = {**DEFAULTS, **cfg}

    def need(ok, name, allowed):
        if not ok:
            raise ValueError(f"{name}={c[name]!r} is not allowed: {allowed}")

    def whole(name, lo):
        v = c[name]
        need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name, f"a whole number >= {lo}")

    need(c["quant"] in registry.QUANTS, "quant", f"use one of {list(registry.QUANTS)}")
    need(c["dtype"] in DTYPE_BYTES, "dtype", f"use one of {list(DTYPE_BYTES)}")
    need(c["optimizer"] in OPTIMIZER_STATE_BYTES, "optimizer", f"use one of {list(OPTIMIZER_STATE_BYTES)}")
    for name in ("lora_r", "batch_size", "grad_accum"):
        whole(name, 1)
    whole("seq_len", 2)
    whole("eval_blocks", 0)
    whole("eval_every", 0)
    for name in COUNT_LEVERS:
        whole(name, 0)
    need(0 <= c["lora_dropout"] < 1, "lora_dropout", "a number in [0, 1)")
    need(c["vram_budget_gib"] >= 0, "vram_budget_gib", "GiB >= 0 (0 = whole card)")
    need(not (c["keep_16bit"] and c["quant"] == "none"), "keep_16bit",
         "False for quant none (only QLoRA upcasts norms, embeddings and head)")
    need(not (c["fp32_upcast"] and c["quant"] != "none"), "fp32_upcast",
         "False for a quantized base (peft upcasts it already; keep_16bit turns that off)")
    need(not (c["fused_kernels"] and c["chunked_loss"]), "chunked_loss",
         "0 with fused_kernels (both replace the head's loss)")
    targets(c["target_modules"])
    return c


# --- the prediction ------------------------------------------------------------------------------------------

def layer_bytes_per_token(s: dict, c: dict, resid: int, compute: int) -> float:
    """Bytes per token that one decoder layer keeps for backward (its input included), enumerated from what
    each op saves in transformers' Llama/Qwen2/Mistral layers under autocast, with peft's LoRA on `targets`:

      RMSNorm (transformers): its fp32 input (a copy when the stream is 16-bit) and the normalised fp32 tensor;
      LoRA on a linear of input d: dropout's 1-byte mask and lora_A's 16-bit input (3d; 2d without dropout),
      and the r-wide 16-bit output of lora_A; frozen base linears keep no input (their weight needs no grad);
      SDPA (flash / memory-efficient): rotated q and k, v and the output, 16-bit; no seq x seq matrix;
      SwiGLU: gate, SiLU(gate) and up, 16-bit (Liger's kernel recomputes SiLU: gate and up only).
    """
    h, i, q, kv, r = s["hidden"], s["inter"], s["q_dim"], s["kv_dim"], c["lora_r"]
    liger = c["fused_kernels"]
    norm = 0 if liger else 4 * h  # Liger's RMSNorm keeps its input and 1/rms only
    per_in = 3 if c["lora_dropout"] > 0 else 2
    lora = sum(per_in * linear_dims(s)[m][0] + compute * r for m in targets(c["target_modules"]))
    attn = 2 * compute * q + 2 * compute * kv
    mlp = (2 if liger else 3) * compute * i
    if c["tiled_mlp"]:  # each slice's MLP is checkpointed: only its input, and one slice rebuilt at a time
        mlp_lora = sum(per_in * linear_dims(s)[m][0] + compute * r for m in targets(c["target_modules"])
                       if m in ("gate_proj", "up_proj", "down_proj"))
        lora -= mlp_lora
        mlp = (mlp + mlp_lora) / c["tiled_mlp"]
    total = resid * h + norm + resid * h + norm + lora + attn + mlp  # layer input, norm 1, residual, norm 2, ...
    # torch.compile's partitioner keeps fewer tensors when the layer's forward is saved for backward; a
    # checkpointed layer is rebuilt eagerly enough that the measured peak did not move (levers report)
    scale = ACT_SCALE * (COMPILE_SCALE if c["torch_compile"] and not c["gradient_checkpointing"] else 1.0)
    return total * scale


def predict(cfg: dict, config: dict | None = None, evaluation: bool = True) -> dict:
    """Peak GPU memory of one training run, as a breakdown in GiB (keys end in _gib), with the moment that sets
    the peak, the transient share that drives the allocator's reserve, and whether it fits a budget.
    cfg: the training notebook's parameters (missing ones take the notebook's defaults); config: the model's
    config.json as a dict (default: read_config(cfg['model'])); evaluation False: no perplexity passes (a bare
    training step, as benchmarks/max_context.py probes)."""
    c = check(cfg)
    s = shape(config if config is not None else read_config(c["model"]))
    p = param_counts(s)
    compute = DTYPE_BYTES[c["dtype"]]
    # norms, embeddings and head in float32: peft's upcast of the QLoRA arms, or fp32_upcast's of the 16-bit arm
    quant, upcast = c["quant"], registry.upcasts_to_fp32(c["quant"], c["keep_16bit"], c["fp32_upcast"])
    other_bytes = 4 if (upcast or compute == 4) else compute  # embeddings, head, norms, biases
    # the residual stream: fp32 when the embedding was upcast (its output is fp32 and stays so through adds)
    resid = 4 if (upcast or compute == 4) else compute

    # weights
    if quant == "none":
        linear_b = p["linear"] * compute
    elif quant == "int8":
        linear_b = p["linear"] * 1 + p["rows"] * 4
    else:
        consts = (p["linear"] / QUANT_BLOCK * 1 + p["linear"] / QUANT_BLOCK / DOUBLE_QUANT_BLOCK * 4
                  if c["double_quant"] else p["linear"] / QUANT_BLOCK * 4)
        linear_b = p["linear"] * 0.5 + consts
    weights = linear_b + p["other"] * other_bytes

    # adapters
    dims = linear_dims(s)
    lora_params = s["layers"] * c["lora_r"] * sum(a + b for m, (a, b) in dims.items() if m in targets(c["target_modules"]))
    lora = lora_params * 4
    grads = lora_params * 4
    state = lora_params * OPTIMIZER_STATE_BYTES[c["optimizer"]]
    state_in_torch = 0 if c["optimizer"] in PAGED else state
    temp = lora_params * OPTIMIZER_TEMP_BYTES.get(c["optimizer"], 0)
    workspace = WORKSPACE_GIB * GIB

    # activations of one micro-batch
    T = c["batch_size"] * c["seq_len"]
    per_layer = layer_bytes_per_token(s, c, resid, compute)
    h, V = s["hidden"], s["vocab"]
    if c["gradient_checkpointing"]:
        kept = 0 if c["offload_activations"] else s["layers"] * T * resid * h  # each layer's input, exactly
        rebuilt = T * per_layer  # one layer's tensors, rebuilt in backward
    else:
        kept = (0 if c["offload_activations"] else s["layers"] * T * per_layer)
        rebuilt = 0 if not c["offload_activations"] else T * per_layer  # the layer brought back from the host
    if quant == "int8":  # kept in every layer whether checkpointed or not (measured, not derived)
        kept += s["layers"] * T * h * INT8_EXTRA
    # backward of one layer: its output gradient and the largest 16-bit gradient, and a dequantized weight
    big = max(a * b for a, b in dims.values())
    layer_bwd = T * (resid * h + 2 * compute * max(s["inter"] / max(1, c["tiled_mlp"]), h)) \
        + (big * compute if quant != "none" else 0)
    final_norm = 0 if c["offload_activations"] else T * resid * h  # the last layer's output, kept by the final norm
    if c["fused_kernels"]:  # Liger's fused linear cross-entropy: grad of the input, then chunks of the logits
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(T / max(1, math.ceil(V / h))))))
        head = T * h * 4 + min(chunk, T) * V * (compute + 4 + 4)
        logits_segment = 0
    else:
        tokens = math.ceil(T / c["chunked_loss"]) if c["chunked_loss"] else T
        head = tokens * V * LOGITS_BYTES + (V * h * compute if upcast and compute != 4 else 0)
        # the 16-bit logits' own segment: freed before backward's fp32 buffers are made, which cannot reuse it
        # (they are twice its size), so an uncapped allocator keeps it cached beside them
        logits_segment = tokens * V * compute
    grads_live = grads if c["grad_accum"] > 1 else 0  # accumulated across micro-batches; else made in backward

    static = weights + lora + state_in_torch + workspace + grads_live
    moments = {
        "loss": (kept + final_norm, head),
        "layer backward": (kept, rebuilt + layer_bwd + grads * (0 if c["grad_accum"] > 1 else 1) / s["layers"]),
        "optimizer step": (0, grads * (0 if c["grad_accum"] > 1 else 1) + temp),
    }
    # perplexity before training (the peak counters are read before the one after): no grad, no autocast,
    # batch 2 x batch_size, at most the eval blocks (random tokens with eval_blocks 0: 16 blocks)
    if evaluation:
        blocks = c["eval_blocks"] or (registry.SYNTHETIC_EVAL_BLOCKS if c["model"] in registry.SYNTHETIC else 2 * c["batch_size"])
        Te = min(2 * c["batch_size"], blocks) * c["seq_len"]
        eval_t = Te * V * EVAL_LOGITS_BYTES + Te * (resid * h * 3 + compute * s["inter"] * 3)
        # before training there is no optimizer state yet; with eval_every the evaluations come between steps
        moments["evaluation"] = (0, eval_t - (0 if c["eval_every"] else state_in_torch))
    name, (kept_m, transient) = max(moments.items(), key=lambda kv: sum(kv[1]))
    allocated = static + kept_m + transient

    # the caching allocator's reserve: the forward pass frees each layer's intermediate tensors while the kept
    # ones (checkpoints, or everything without checkpointing) pile up between them, so cached blocks are split
    # and left; evaluation runs first on an empty cache and training reuses its blocks
    layer_transient = T * per_layer + layer_bwd
    train_reserve = RESERVE_TRANSIENT * layer_transient + RESERVE_KEPT * kept
    reserved = static + max(sum(kt) + (0 if m == "evaluation" else train_reserve) for m, kt in moments.items())
    if evaluation and c["eval_every"]:  # evaluations between steps: their blocks are cached beside training's
        reserved += EVAL_EVERY_RESERVE * moments["evaluation"][1]
    outside = (OUTSIDE_TORCH_INT8_GIB if quant == "int8" else OUTSIDE_TORCH_GIB) * GIB
    if c["optimizer"] in PAGED:
        outside += state
    budget = c["vram_budget_gib"] * GIB
    # under an allocator cap the cache is freed before an allocation fails: what has to fit is each moment's
    # allocated memory plus the fragmentation its transient tensors leave
    need_capped = static + max(k + t * (1 + (CAP_HEADROOM if m == "loss" else CAP_HEADROOM_LAYER))
                               for m, (k, t) in moments.items())
    # uncapped, the allocator never gives its cache back: it holds at least every moment's allocated memory plus
    # what that moment's sequence of allocations cannot reuse (the loss: its 16-bit logits' segment; the others:
    # the layer share). Before the pre-registered check this floor was need_capped itself (CAP_HEADROOM, fitted
    # on 32k-49k vocabularies), which over-predicted 128k-152k vocabularies by up to 25% (reports/results.md)
    reserved = max(reserved, static + max(k + t + (logits_segment if m == "loss" else t * CAP_HEADROOM_LAYER)
                                          for m, (k, t) in moments.items()))
    # One physical model of "fits": a process whose uncapped reserve never reaches the cap never meets it, so what
    # a cap (or a card) must hold is the smaller of the two; the capped need can never exceed the uncapped peak
    need_capped = min(need_capped, reserved)
    fits = True
    if budget:
        fits = need_capped <= budget
        reserved = min(reserved, budget)
    g = lambda b: b / GIB  # noqa: E731
    return {
        "weights_gib": g(weights), "adapters_gib": g(lora), "adapter_grads_gib": g(grads_live),
        "optimizer_state_gib": g(state_in_torch), "workspace_gib": g(workspace),
        "activations_gib": g(kept_m), "transient_gib": g(transient), "peak_moment": name,
        "peak_allocated_gib": g(allocated), "reserve_gib": g(reserved - allocated), "peak_reserved_gib": g(reserved),
        "outside_torch_gib": g(outside), "peak_process_gib": g(reserved + outside),
        "needs_under_cap_gib": g(need_capped), "needs_on_card_gib": g(need_capped + outside),
        "fits_budget": fits, "params_total": p["total"], "params_trainable": lora_params,
        "tokens_per_micro_batch": T, "context": s["context"],
    }


# --- every measurement we have ---------------------------------------------------------------------------------

SIDECAR_KEYS = ("peak_allocated_gib", "peak_reserved_gib", "peak_process_est_gib")


# Sources (reports/<name>/) measured after the predictor's constants were fitted: tools/fit_constants.py never fits on
# them, and the bars of the fit issue are held on the rest (tests/test_fit.py); their errors are published beside.
# fit-check: the pre-registered grid; precision, lever-check: real-weight runs of the fair-comparisons issue;
# multi-gpu: FSDP runs, which predict_per_gpu extends the one-GPU model to without fitting anything.
MEASURED_AFTER_FIT = ("fit-check", "precision", "lever-check", "multi-gpu", "fit-check-2")


def measured_runs(reports: str | Path = "reports") -> list[dict]:
    """One row per committed GPU measurement: every sidecar under reports/*/runs/ (sub-folders too) whose device
    is cuda, and every probe of the max-context searches (reports/*/max_context*.json). Each row: source, id,
    the configuration the predictor takes (cfg), evaluation (False for probes), status ok|oom|error, the
    measured peaks, the budget and side_by_side."""
    root = Path(reports) if Path(reports).is_absolute() else PROJECT_ROOT / reports  # not the kernel's folder
    rows = []
    for f in sorted(root.glob("*/runs/**/*.json")):
        try:
            d = read_sidecar(f)
        except ValueError:  # not a run record (or a broken one): nothing measured to check against
            continue
        # a run that ran out of memory outside the notebook's guarded steps has its record from the sweep, which
        # does not know the device; CUDA's own error text says where it ran
        on_cuda = d.get("device") == "cuda" or "CUDA out of memory" in (d.get("error") or "")
        if not on_cuda:
            continue
        m, conf = d.get("metrics", {}), d["config"]
        cfg = {k: conf[k] for k in DEFAULTS if k in conf}
        rows.append({"source": f"{f.parent.relative_to(root)}".replace("/runs", ""), "id": d["run_id"], "cfg": cfg,
                     "evaluation": True, "status": d["status"],
                     "side_by_side": d.get("environment", {}).get("side_by_side", 1),
                     "budget_gib": conf.get("vram_budget_gib", 0.0),
                     "num_gpus": conf.get("num_gpus", 1), "cpu_offload": conf.get("fsdp_cpu_offload", False),
                     "allocated_gib": m.get("peak_allocated_gib"), "reserved_gib": m.get("peak_reserved_gib"),
                     "process_gib": m.get("peak_process_est_gib")})  # a sharded run's: its fullest GPU's
    for f in sorted(root.glob("*/max_context*.json")):
        d = json.loads(f.read_text())
        if d.get("device") != "cuda":
            continue
        lever_cfg = {k: v for k, v in (d.get("levers") or {}).items() if k in LEVERS}
        base = dict(model=d["model"], quant=d["quant"], lora_r=d["lora_r"], lora_dropout=0.05, batch_size=1,
                    gradient_checkpointing=d.get("gradient_checkpointing", True), optimizer="adamw_torch",
                    **lever_cfg)
        for k, pr in enumerate(d["probes"]):
            budget = pr.get("budget_gib") or 0.0
            ok = pr["ok"]
            rows.append({"source": f"{f.parent.name}/{f.stem}", "id": f"{f.stem}-p{k}-s{pr['seq_len']}-b{budget:g}",
                         "cfg": {**base, "seq_len": pr["seq_len"], "vram_budget_gib": budget},
                         "evaluation": False, "status": "ok" if ok else ("oom" if pr.get("error") else "error"),
                         "side_by_side": 1, "budget_gib": budget, "num_gpus": 1, "cpu_offload": False,
                         "allocated_gib": pr.get("peak_allocated_gib"), "reserved_gib": pr.get("peak_reserved_gib"),
                         "process_gib": pr.get("process_peak_est_gib")})
    return rows


def largest_measured(model: str, reports: str | Path = "reports") -> dict | None:
    """The largest seq_len and batch_size of any finished committed GPU run (or probe) of this model, or None: an
    answer past them is an extrapolation, and the CLI says so."""
    runs = [r for r in measured_runs(reports) if r["cfg"].get("model") == model and r["status"] == "ok"]
    if not runs:
        return None
    return {"seq_len": max(r["cfg"].get("seq_len", DEFAULTS["seq_len"]) for r in runs),
            "batch_size": max(r["cfg"].get("batch_size", DEFAULTS["batch_size"]) for r in runs), "runs": len(runs)}


def validation_table(rows: list[dict] | None = None) -> list[dict]:
    """Predicted against measured for every row of measured_runs(): peaks (for runs that finished), ok/OOM
    (for budgeted runs that ended ok or oom: an error says nothing of memory), and the relative error of each peak
    (predicted / measured - 1). A sharded run (num_gpus > 1, or CPU offload) is predicted per GPU
    (predict_per_gpu) against its fullest GPU."""
    out = []
    for r in rows if rows is not None else measured_runs():
        n, offload = r.get("num_gpus", 1), r.get("cpu_offload", False)
        pred = (predict_per_gpu(r["cfg"], n, offload) if n > 1 or offload
                else predict(r["cfg"], evaluation=r["evaluation"]))
        row = {k: r[k] for k in ("source", "id", "status", "side_by_side", "budget_gib")}
        c = check(r["cfg"])
        row.update(model=c["model"], quant=c["quant"], batch_size=c["batch_size"], seq_len=c["seq_len"],
                   gradient_checkpointing=c["gradient_checkpointing"],
                   levers="+".join(k if k not in COUNT_LEVERS else f"{k}={c[k]}" for k in LEVERS if c[k]) or "-",
                   num_gpus=n, fsdp_cpu_offload=offload)
        for key, mkey in (("peak_allocated_gib", "allocated_gib"), ("peak_reserved_gib", "reserved_gib"),
                          ("peak_process_gib", "process_gib")):
            row[f"measured_{mkey}"] = r[mkey]
            row[f"predicted_{mkey}"] = pred[key]
            ok = r["status"] == "ok" and r[mkey]
            row[f"error_{mkey.removesuffix('_gib')}"] = (pred[key] / r[mkey] - 1) if ok else None
        row["peak_moment"] = pred["peak_moment"]
        row["predicted_status"] = "ok" if pred["fits_budget"] else "oom"
        row["status_right"] = (row["predicted_status"] == r["status"]) if r["budget_gib"] and r["status"] in (
            "ok", "oom") else None
        out.append(row)
    return out


def validation_summary(rows: list[dict]) -> dict:
    """The numbers the issue's bars are judged by, over validation_table() rows: median and largest absolute
    error of each peak (all runs that finished, and those that ran alone on the GPU), and ok/OOM right for
    budgeted runs, overall and for the Trainer runs and the max-context probes apart."""
    import statistics

    def given(x):  # None, or NaN after a trip through pandas: not measured
        return x is not None and x == x

    out = {}
    for key in ("allocated", "reserved", "process"):
        for who, sel in (("all", lambda r: True), ("alone", lambda r: r["side_by_side"] == 1)):
            errs = [abs(r[f"error_{key}"]) for r in rows if given(r[f"error_{key}"]) and sel(r)]
            out[f"{key}_{who}_n"] = len(errs)
            out[f"{key}_{who}_median"] = statistics.median(errs) if errs else None
            out[f"{key}_{who}_max"] = max(errs) if errs else None
    for who, sel in (("all", lambda r: True), ("runs", lambda r: "max_context" not in r["source"]),
                     ("probes", lambda r: "max_context" in r["source"])):
        right = [bool(r["status_right"]) for r in rows if given(r["status_right"]) and sel(r)]
        out[f"status_{who}_n"], out[f"status_{who}_right"] = len(right), sum(right)
    return out


def write_validation(path: str | Path = "reports/fit/validation.csv", rows: list[dict] | None = None) -> Path:
    """validation_table() as a CSV, written atomically (files.atomic_write), relative paths against the project
    root. A value not measured is an empty cell whether it comes as None (the CLI's dicts) or NaN (notebook 03's
    DataFrame records), so both callers write the same bytes and --validate leaves a clean checkout clean."""
    import csv

    rows = rows if rows is not None else validation_table()
    if not rows:
        raise ValueError("no committed GPU measurement to validate against (no reports/*/runs/*.json on cuda)")
    path = Path(path) if Path(path).is_absolute() else PROJECT_ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)

    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else round(v, 4)
        return "" if v is None else v

    def write(f):
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: cell(v) for k, v in r.items()})
    return atomic_write(path, write)


# --- the inverse: what fits a card -------------------------------------------------------------------------------

# Memory outside torch on the card a user has (CUDA context, cuBLAS, bitsandbytes' kernels): measured 0.74 GiB (0.80
# with int8) on the H200 (OUTSIDE_TORCH_GIB); a consumer card's context is often smaller, down to about this (not
# measured here). The verdict takes the measured, larger figure; between the two it says "tight".
OUTSIDE_TORCH_LOW_GIB = 0.30


def card_verdict(pred: dict, card_gib: float) -> dict:
    """The one answer to "does it fit a card of card_gib GiB?", from a predict() result: what an allocator capped
    at the card must hold (needs_under_cap_gib, never above the uncapped peak) plus the memory outside torch.
    verdict: "fits" (with the measured outside-torch figure), "tight" (only if the card's outside-torch memory is
    nearer OUTSIDE_TORCH_LOW_GIB), "does not fit". The CLI's text and --json, notebook 03's chart and table, the
    sweep's dry run and card_table all read this."""
    need = pred["needs_on_card_gib"]  # predict's needs_under_cap_gib + outside_torch_gib
    low = pred["needs_under_cap_gib"] + min(OUTSIDE_TORCH_LOW_GIB, pred["outside_torch_gib"])
    verdict = "fits" if need <= card_gib else ("tight" if low <= card_gib else "does not fit")
    return {"card_gib": card_gib, "fits_card": need <= card_gib, "verdict": verdict, "needs_gib": need,
            "needs_gib_low": low, "margin_gib": card_gib - need}


def verdict_words(v: dict) -> str:
    """card_verdict's answer in one sentence."""
    card, need, low = v["card_gib"], v["needs_gib"], v["needs_gib_low"]
    if v["verdict"] == "fits":
        return f"fits a {card:g} GiB card ({v['margin_gib']:.2f} GiB to spare; it needs {need:.2f} GiB)"
    if v["verdict"] == "tight":
        return (f"tight on a {card:g} GiB card: it needs {need:.2f} GiB with the CUDA context measured on the H200, "
                f"{low:.2f} GiB if the card's takes only {OUTSIDE_TORCH_LOW_GIB:g} GiB")
    return f"does NOT fit a {card:g} GiB card (short by {-v['margin_gib']:.2f} GiB; it needs {need:.2f} GiB)"


def fits_card(cfg: dict, card_gib: float, config: dict | None = None, evaluation: bool = True) -> bool:
    """Whether a run fits a real card of card_gib GiB (card_verdict's fits_card). evaluation: as in predict()."""
    return card_verdict(predict({**cfg, "vram_budget_gib": 0.0}, config, evaluation), card_gib)["fits_card"]


def _largest(test, lo: int, hi: int, step: int) -> int:
    """Largest multiple of step in [step, hi] for which test passes (monotone: passes up to a point); 0 if none."""
    if not test(step):
        return 0
    good, bad = 1, hi // step + 1  # in units of step
    if test(hi // step * step):
        return hi // step * step
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if test(mid * step) else (good, mid)
    return good * step


def max_seq_len(cfg: dict, card_gib: float, step: int = 128, limit: int = 1 << 20, config: dict | None = None,
                evaluation: bool = True) -> int:
    """Largest seq_len (a multiple of step, at cfg's batch_size) that fits the card, never past the model's context
    (max_position_embeddings; returned as it is when more would fit); 0 if not even `step`."""
    config = config if config is not None else read_config(check(cfg)["model"])
    context = shape(config)["context"]
    if context:
        limit = min(limit, context)
        if fits_card({**cfg, "seq_len": context}, card_gib, config, evaluation):
            return context
    return _largest(lambda n: fits_card({**cfg, "seq_len": n}, card_gib, config, evaluation), step, limit, step)


def max_batch(cfg: dict, card_gib: float, limit: int = 4096, config: dict | None = None,
              evaluation: bool = True) -> int:
    """Largest batch_size at cfg's seq_len that fits the card; 0 if not even 1."""
    config = config if config is not None else read_config(check(cfg)["model"])
    return _largest(lambda b: fits_card({**cfg, "batch_size": b}, card_gib, config, evaluation), 1, limit, 1)


# Configurations from fastest to slowest, as measured on the 7B shape at batch 4 x 512 on an H200
# (tokens/s in reports/levers/summary.csv and the fast-arm pairs; the plain NF4 stack = 1.00). A card's answer
# is the first that fits. "plain" ones use no lever of helpers/training/levers.py.
RECIPES = (
    ("16-bit, no checkpointing, compile + fused AdamW", 2.9, False,
     dict(quant="none", gradient_checkpointing=False, torch_compile=True, optimizer="adamw_torch_fused")),
    ("NF4, no checkpointing, compile + keep_16bit + fused AdamW", 2.7, False,
     dict(quant="nf4", gradient_checkpointing=False, torch_compile=True, keep_16bit=True,
          optimizer="adamw_torch_fused")),
    ("16-bit, no checkpointing (plain)", 2.0, True, dict(quant="none", gradient_checkpointing=False)),
    ("NF4, no checkpointing (plain)", 2.0, True, dict(quant="nf4", gradient_checkpointing=False)),
    ("16-bit, checkpointing, compile + fused AdamW", 2.6, False,
     dict(quant="none", torch_compile=True, optimizer="adamw_torch_fused")),
    ("NF4, checkpointing, compile + keep_16bit + fused AdamW", 2.0, False,
     dict(quant="nf4", torch_compile=True, keep_16bit=True, optimizer="adamw_torch_fused")),
    ("16-bit, checkpointing (plain)", 1.3, True, dict(quant="none")),
    ("NF4, checkpointing, keep_16bit", 1.7, False, dict(quant="nf4", keep_16bit=True)),
    ("NF4, checkpointing (plain)", 1.0, True, dict(quant="nf4")),
    ("NF4, checkpointing, keep_16bit + offload + Liger + tiled MLP 8", 0.6, False,
     dict(quant="nf4", keep_16bit=True, offload_activations=True, fused_kernels=True, tiled_mlp=8)),
)


def fastest_fit(cfg: dict, card_gib: float, plain: bool = False, config: dict | None = None,
                evaluation: bool = True):
    """(name, speed relative to plain NF4, settings, prediction) of the fastest recipe that fits the card at
    cfg's batch and seq_len, or None. plain: only recipes without levers."""
    config = config if config is not None else read_config(check(cfg)["model"])
    order = sorted((r for r in RECIPES if r[2] or not plain), key=lambda r: -r[1])
    for name, speed, _, settings in order:
        run = {**cfg, **{k: DEFAULTS[k] for k in LEVERS}, "optimizer": "adamw_torch",
               "gradient_checkpointing": True, **settings}
        if fits_card(run, card_gib, config, evaluation):
            return name, speed, settings, predict(run, config, evaluation)
    return None


CARD_MODELS = {"Llama-2-7B": "llama-2-7b-shape", "Mistral-7B": "mistral-7b-shape", "Llama-3.1-8B": "llama-3.1-8b-shape",
               "Qwen2.5-7B": "qwen2.5-7b-shape", "Llama-3.2-1B": "llama-3.2-1b-shape"}
CARDS_GIB = (6, 8, 12, 16, 24)
REFERENCE_SEQ_LEN = 2048  # the "fastest that fits" column: batch 1 x 2,048 tokens, LoRA r16 on all linears


def card_table(models: dict = CARD_MODELS, cards=CARDS_GIB, seq_len: int = REFERENCE_SEQ_LEN) -> list[dict]:
    """What fits each card (whole process, a bare training step as benchmarks/max_context.py measures it): the
    largest seq_len at batch 1 and the fastest recipe at batch 1 x seq_len, with the plain stack and with levers."""
    rows = []
    for label, model in models.items():
        config = read_config(model)
        for card in cards:
            row = {"model": label, "card_gib": card}
            for plain in (True, False):
                kind = "plain" if plain else "levers"
                recipes = [r for r in RECIPES if r[2] or not plain]
                best_len, best_name = 0, None
                for name, _, _, settings in recipes:
                    run = {"model": model, "batch_size": 1, "lora_r": 16, "eval_blocks": 1, **settings}
                    n = max_seq_len(run, card, config=config, evaluation=False)
                    if n > best_len:
                        best_len, best_name = n, name
                fast = fastest_fit({"model": model, "batch_size": 1, "lora_r": 16, "seq_len": seq_len}, card, plain,
                                   config, False)
                row[f"{kind}_max_seq_len"] = best_len
                row[f"{kind}_max_seq_len_with"] = best_name
                row[f"{kind}_fastest_at_{seq_len}"] = fast[0] if fast else None
                row[f"{kind}_fastest_speed"] = fast[1] if fast else None
            rows.append(row)
    return rows


# --- the command line ----------------------------------------------------------------------------------------------

BREAKDOWN = (  # (key, label) in the order the memory is stacked
    ("weights_gib", "base weights (incl. quantization constants, upcast parts)"),
    ("adapters_gib", "LoRA adapters (fp32)"),
    ("adapter_grads_gib", "adapter gradients held across micro-batches"),
    ("optimizer_state_gib", "optimizer state"),
    ("workspace_gib", "cuBLAS workspaces"),
    ("activations_gib", "activations kept for backward"),
    ("transient_gib", "transient at the peak (logits/loss, a rebuilt layer, ...)"),
    ("reserve_gib", "allocator reserve (cached, not allocated)"),
    ("outside_torch_gib", "outside torch (CUDA context, cuBLAS, bitsandbytes)"),
)


def _parser():
    ap = argparse.ArgumentParser(
        prog="python -m helpers.fit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Will it fit? Predict the peak GPU memory of one LoRA/QLoRA training run of the study's "
                    "notebook from the model's shape (no GPU, no torch), and what fits a card.",
        epilog="Card sizes are GiB of the whole process (a card sold as '8 GB' has 8 GiB). Predictions were "
               "checked against every committed H200 run: see reports/fit/ and reports/results.md.")
    ap.add_argument("--model", default=DEFAULTS["model"],
                    help="a registry name (smollm2-135m, llama-3.1-8b-shape, ...), a model folder or config.json, "
                         "or a hub id (needs the hub)")
    ap.add_argument("--card", type=float, default=0, help="card size in GiB (whole process); 0: no verdict")
    ap.add_argument("--quant", default=DEFAULTS["quant"], help=f"one of {list(registry.QUANTS)}")
    ap.add_argument("--dtype", default=DEFAULTS["dtype"], help=f"one of {list(DTYPE_BYTES)}")
    ap.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    ap.add_argument("--lora-r", type=int, default=DEFAULTS["lora_r"])
    ap.add_argument("--lora-dropout", type=float, default=DEFAULTS["lora_dropout"])
    ap.add_argument("--target-modules", default=DEFAULTS["target_modules"],
                    help=f"'all-linear' or a comma-separated list of {list(registry.LINEARS)}")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    ap.add_argument("--grad-accum", type=int, default=DEFAULTS["grad_accum"])
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--fp32-upcast", action="store_true",
                    help="quant none only: norms, embeddings and head in float32, as peft gives the QLoRA arms")
    ap.add_argument("--optimizer", default=DEFAULTS["optimizer"], help=f"one of {list(OPTIMIZER_STATE_BYTES)}")
    ap.add_argument("--eval-blocks", type=int, default=DEFAULTS["eval_blocks"],
                    help="blocks the notebook scores before training (0: all)")
    ap.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"])
    ap.add_argument("--train-only", action="store_true",
                    help="a bare training step: leave out the notebook's perplexity pass before training")
    g = ap.add_argument_group("levers (helpers/training/levers.py)")
    for name in LEVERS:
        if name in COUNT_LEVERS:
            g.add_argument(f"--{name.replace('_', '-')}", type=int, default=0, metavar="N")
        else:
            g.add_argument(f"--{name.replace('_', '-')}", action="store_true")
    q = ap.add_argument_group("what fits the card (needs --card)")
    q.add_argument("--max-seq-len", action="store_true", help="largest seq_len at --batch-size and at batch 1")
    q.add_argument("--max-batch", action="store_true", help="largest batch_size at --seq-len")
    q.add_argument("--fastest", action="store_true", help="the fastest measured recipe that fits (plain and levers)")
    ap.add_argument("--json", action="store_true", help="print the prediction as JSON")
    ap.add_argument("--validate", action="store_true",
                    help="predicted vs measured over every committed GPU run: write reports/fit/validation.csv")
    ap.add_argument("--report", action="store_true",
                    help="execute notebooks/03_will_it_fit.ipynb into reports/fit/ with its offline HTML")
    return ap


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.report:  # executing notebook 03 is the runner's work (helpers/sweeps/report.py): the command does it
        ap.error("--report is taken by the command `python -m helpers.fit --report` (helpers/fit/__main__.py)")
    if a.validate:
        rows = validation_table()
        s = validation_summary(rows)
        print(f"{write_validation(rows=rows)}: {len(rows)} rows; whole-process peak median |error| "
              f"{s['process_all_median']:.1%}, largest {s['process_all_max']:.1%} ({s['process_all_n']} finished); "
              f"ok/OOM right {s['status_all_right']}/{s['status_all_n']} budgeted "
              f"({s['status_runs_right']}/{s['status_runs_n']} notebook runs, "
              f"{s['status_probes_right']}/{s['status_probes_n']} max-context probes)")
        return 0
    cfg = {k: getattr(a, k) for k in DEFAULTS if hasattr(a, k)}
    try:
        config = read_config(a.model)
        pred = predict(cfg, config, evaluation=not a.train_only)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    if not math.isfinite(a.card) or a.card < 0:
        ap.error(f"--card={a.card!r} is not allowed: a card size in GiB > 0 (0: no verdict)")
    if (a.max_seq_len or a.max_batch or a.fastest) and not a.card:
        ap.error("--max-seq-len, --max-batch and --fastest need --card (the card size in GiB)")
    extra = {}
    if a.card:
        extra.update(card_verdict(pred, a.card))
    if a.max_seq_len:
        extra["max_seq_len"] = {str(b): max_seq_len({**cfg, "batch_size": b}, a.card, config=config,
                                                     evaluation=not a.train_only) for b in sorted({1, cfg["batch_size"]})}
    extra["largest_measured"] = largest_measured(a.model)
    if a.json:
        print(json.dumps({**pred, **extra}, indent=1))
        return 0
    s = shape(config)
    c = check(cfg)
    on = [k if k not in COUNT_LEVERS else f"{k}={c[k]}" for k in LEVERS if c[k]]
    print(f"{a.model}: {pred['params_total'] / 1e9:.2f} B parameters, vocab {s['vocab']:,}, {s['layers']} layers; "
          f"quant {c['quant']}, LoRA r{c['lora_r']} ({pred['params_trainable'] / 1e6:.1f} M trainable), "
          f"batch {c['batch_size']} x {c['seq_len']} tokens, checkpointing {'on' if c['gradient_checkpointing'] else 'off'}"
          f", {c['optimizer']}, levers: {', '.join(on) or 'none'}")
    for key, label in BREAKDOWN:
        print(f"  {pred[key]:7.2f} GiB  {label}")
    print(f"  {pred['peak_process_gib']:7.2f} GiB  whole process at its peak (the {pred['peak_moment']})"
          f"; torch allocated {pred['peak_allocated_gib']:.2f}, reserved {pred['peak_reserved_gib']:.2f}")
    if pred["context"] and c["seq_len"] > pred["context"]:
        print(f"  note: seq_len {c['seq_len']} is beyond the model's context of {pred['context']} (a memory figure only)")
    seen = extra["largest_measured"]
    if not seen:
        print("  note: no run of this shape was measured: the prediction is extrapolated from other shapes")
    elif c["seq_len"] > seen["seq_len"] or c["batch_size"] > seen["batch_size"]:
        print(f"  note: extrapolated (largest measured for this shape: seq_len {seen['seq_len']:,}, "
              f"batch {seen['batch_size']})")
    if a.card:
        print(f"verdict: {verdict_words(extra)}. What it needs is what an allocator capped at the card must hold "
              "(it frees its cache before it fails) plus the memory outside torch; never more than the peak above")
        if a.max_seq_len:
            for b, n in extra["max_seq_len"].items():
                print(f"largest seq_len at batch {b}: {n or 'none (not even 128 tokens)'}"
                      + (" (the model's context: more would fit)" if n and n == pred["context"] else "")
                      + (f", extrapolated (largest measured for this shape: {seen['seq_len']:,})"
                         if n and seen and n > seen["seq_len"] else "")
                      + (", extrapolated (no run of this shape measured)" if n and not seen else ""))
        if a.max_batch:
            print(f"largest batch_size at seq_len {c['seq_len']}: {max_batch(cfg, a.card, config=config, evaluation=not a.train_only) or 'none'}")
        if a.fastest:
            for plain in (True, False):
                best = fastest_fit(cfg, a.card, plain=plain, config=config, evaluation=not a.train_only)
                what = "plain stack" if plain else "with levers"
                print(f"fastest that fits ({what}): " + (f"{best[0]} (~{best[1]:.1f}x plain NF4's tokens/s, needs "
                      f"{best[3]['needs_on_card_gib']:.2f} GiB)" if best else "nothing"))
    return 0



# --- the pre-registered check ----------------------------------------------------------------------------------------

PREREGISTERED = Path("reports/fit/preregistered.csv")
PREREG_COLUMNS = ("run_id", "model", "quant", "batch_size", "seq_len", "gradient_checkpointing", "vram_budget_gib",
                  "predicted_status", "predicted_allocated_gib", "predicted_reserved_gib", "predicted_process_gib",
                  "needs_under_cap_gib", "peak_moment")


def preregistration_rows(configs: list[dict]) -> list[dict]:
    """The committed predictions for a sweep's expanded configurations (helpers.sweeps.sweep.expand)."""
    rows = []
    for cfg in configs:
        pred = predict({k: cfg[k] for k in DEFAULTS if k in cfg})
        rows.append({"run_id": cfg["run_id"], **{k: cfg[k] for k in PREREG_COLUMNS[1:7]},
                     "predicted_status": "ok" if pred["fits_budget"] else "oom",
                     "predicted_allocated_gib": round(pred["peak_allocated_gib"], 3),
                     "predicted_reserved_gib": round(pred["peak_reserved_gib"], 3),
                     "predicted_process_gib": round(pred["peak_process_gib"], 3),
                     "needs_under_cap_gib": round(pred["needs_under_cap_gib"], 3), "peak_moment": pred["peak_moment"]})
    return rows


# What changed in the predictor after the pre-registered check was measured (reported beside it, never hidden)
PREDICTOR_CHANGES = (
    "after the check: the uncapped reserve floor is each moment's allocated memory plus what its allocations cannot "
    "reuse (the loss: its 16-bit logits' segment), no longer the capped requirement with CAP_HEADROOM (fitted on "
    "32k-49k vocabularies, it over-predicted 128k-152k ones by up to 25%); tools/fit_constants.py, run again on "
    "the fitted runs only, lands on the same constants (the check's runs are never used)")


def preregistered_vs_measured(path: str | Path = PREREGISTERED, reports: str | Path = "reports") -> list[dict]:
    """The committed predictions beside what was measured (reports/fit-check/runs/<run_id>.json), row by row;
    measured fields are None for runs not measured yet. predicted_*: the predictions as committed; now_*: today's
    predictor on the same configuration (it changed after the check: see PREDICTOR_CHANGES)."""
    import csv

    measured = {r["id"]: r for r in measured_runs(reports) if r["source"].startswith("fit-check")}
    out = []
    for row in csv.DictReader(Path(path).open()):
        m = measured.get(row["run_id"])
        rec = {**row, "measured_status": m["status"] if m else None}
        for key in ("allocated", "reserved", "process"):
            pred = float(row[f"predicted_{key}_gib"])
            val = m[f"{key}_gib"] if m and m["status"] == "ok" else None
            rec[f"measured_{key}_gib"] = val
            rec[f"error_{key}"] = pred / val - 1 if val else None
            if m:
                now = predict(m["cfg"])
                rec[f"now_{key}_gib"] = now[f"peak_{key}_gib"]
                rec[f"now_error_{key}"] = now[f"peak_{key}_gib"] / val - 1 if val else None
                rec["now_status"] = "ok" if now["fits_budget"] else "oom"
        budgeted = float(row["vram_budget_gib"]) > 0
        rec["status_right"] = (row["predicted_status"] == m["status"]) if (m and budgeted) else None
        rec["now_status_right"] = (rec["now_status"] == m["status"]) if (m and budgeted) else None
        out.append(rec)
    return out


# --- several GPUs: FSDP (the training notebook's num_gpus and fsdp_cpu_offload) --------------------------------

SHARDED = ("weights_gib", "adapters_gib", "adapter_grads_gib", "optimizer_state_gib")  # what FSDP splits N ways
FSDP_GATHERED_LAYERS = 2  # decoder layers FSDP holds whole at once: the one it computes and the one it prefetches


def predict_per_gpu(cfg: dict, num_gpus: int = 1, cpu_offload: bool = False, config: dict | None = None) -> dict:
    """predict() for each of `num_gpus` GPUs of an FSDP run (FULL_SHARD, one process per GPU, the same micro-batch
    on each), in GiB: the sharded terms (base weights, adapters, their gradients, optimizer state) divided by
    num_gpus, or moved to host memory with cpu_offload (FSDP's offload_params; host_offload_gib says how much),
    plus FSDP_GATHERED_LAYERS decoder layers' weights gathered whole; activations, the loss's logits, the
    evaluation and the memory outside torch are each process's own, not sharded. num_gpus 1 without offload is
    predict() itself. A prediction extended from the single-GPU model: FSDP's communication buffers and
    allocator behaviour are not modelled, and no multi-GPU run has checked it yet."""
    if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus!r} is not allowed: a whole number >= 1")
    config = config if config is not None else read_config({**DEFAULTS, **cfg}["model"])
    if num_gpus == 1 and not cpu_offload:
        return {**predict(cfg, config), "num_gpus": num_gpus, "host_offload_gib": 0.0}
    budget = {**DEFAULTS, **cfg}["vram_budget_gib"]
    p = predict({**cfg, "vram_budget_gib": 0.0}, config)  # the whole model's; the cap is a GPU's, applied below
    out = {**p, "num_gpus": num_gpus}
    sharded = sum(p[k] for k in SHARDED)
    kept = 0.0 if cpu_offload else sharded / num_gpus
    gathered = FSDP_GATHERED_LAYERS * p["weights_gib"] / shape(config)["layers"]
    change = kept + gathered - sharded
    for k in ("peak_allocated_gib", "peak_reserved_gib", "needs_under_cap_gib", "needs_on_card_gib"):
        out[k] = p[k] + change
    if budget:  # as predict() does for one GPU: the allocator gives its cache back before it passes the cap
        out["peak_reserved_gib"] = min(out["peak_reserved_gib"], budget)
    out["reserve_gib"] = out["peak_reserved_gib"] - out["peak_allocated_gib"]
    out["peak_process_gib"] = out["peak_reserved_gib"] + p["outside_torch_gib"]
    out["host_offload_gib"] = sharded / num_gpus if cpu_offload else 0.0
    out["fits_budget"] = not budget or out["needs_under_cap_gib"] <= budget
    return out

