"""The training stack of a run, one switch (`stack`) mapped in one place: ours, or the peer we measure beside it.

    hf        ours: models.load_model (BitsAndBytesConfig -> from_pretrained) and train.attach_lora (peft), with
              the levers of helpers/training/levers.py; with every lever off, the plain Hugging Face stack. The default.
    unsloth   the peer: Unsloth's FastLanguageModel (GPU only, `pip install -e .[peer]`, the versions pinned there).
              from_pretrained(the local model folder, load_in_4bit for nf4, dtype bfloat16, max_seq_length =
              seq_len), then get_peft_model(r, alpha, dropout, the run's target modules with all-linear spelled
              as the 7 projections, use_gradient_checkpointing "unsloth" when gradient_checkpointing is on
              else False, random_state = seed). Everything else is Unsloth's default (its own kernels,
              its decision to offload the embedding when memory is tight).

Either way the rest of the run is the same code, so the same rules measure both: the data (a synthetic model
trains on the same random tokens, a real one on blocks cut by the same tokenizer, models.load_tokenizer), the
gradient check, our Trainer loop (helpers/training/train.py: Unsloth's import patches the transformers Trainer it builds
on, as it patches every Trainer), telemetry and timing rules, evaluation and the sidecar.

Import order. Unsloth patches transformers and peft only if it is imported before them. `import_first(stack,
device)` is therefore the first thing the training notebook runs after its parameters, before any helper that
could import transformers; each run of a sweep is a fresh kernel, so nothing has imported transformers yet. This
module imports torch and helpers that import transformers only inside their functions, never at import time
(tests/test_peer.py checks it).
Where transformers was imported first (a JupyterLab kernel that already ran an hf run), the load refuses and
says to restart the kernel, rather than measure a half-patched stack. Offline: UNSLOTH_DISABLE_STATISTICS=1,
HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 are set before the import (a value the user set is kept).

Refused before anything runs (problems(), called by runs.validate): quant other than nf4, double_quant False,
dtype other than auto/bfloat16 (Unsloth's 4-bit load is NF4 with double quantization, computing in bfloat16),
fp32_upcast, and every lever of helpers/training/levers.py: they patch the modules, the loss or the checkpointing that
Unsloth replaces with its own, so their sum would be neither stack. LoRA dropout is allowed, but Unsloth's fused
LoRA kernels are its fast path at dropout 0 (benchmarks/fast_arm.py uses 0 in every arm).
Where Unsloth cannot load (no CUDA GPU, the package missing, its import failing) the run's load step raises a
RuntimeError saying what is needed; in a sweep that is a result (an error sidecar) and the next run runs.
"""
import importlib.util
import os
import sys
import time

import torch

from helpers.training import models
from helpers.records.registry import COUNT_LEVERS, LEVERS, LINEARS, STACKS
from helpers.training.train import attach_lora as attach_ours

PEER = "unsloth"
PEER_PACKAGES = ("unsloth", "unsloth_zoo")
NEEDS = "stack 'unsloth' needs a CUDA GPU and `pip install -e .[peer]`"
OFFLINE_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PEER_QUANTS = ("nf4",)
PEER_DTYPES = ("auto", "bfloat16")

_IMPORT = {}  # what import_first found: "error" (why the peer cannot load here), "seconds" (its import time)


def problems(cfg: dict) -> list[tuple[str, object, str]]:
    """(name, value, what is allowed) for every setting that stack `cfg['stack']` cannot run; [] when all can.
    Only what the configuration says: whether this machine can load Unsloth is the load step's question."""
    stack = cfg.get("stack", "hf")
    if stack not in STACKS:
        return [("stack", stack, f"use one of {list(STACKS)} (hf: ours, {PEER}: the peer, GPU only)")]
    if stack != PEER:
        return []
    out = []
    if cfg.get("quant") not in PEER_QUANTS:
        out.append(("quant", cfg.get("quant"), f"one of {list(PEER_QUANTS)} with stack {PEER!r} (its 4-bit load is "
                                              "bitsandbytes NF4; the other quantizations run with stack 'hf')"))
    if cfg.get("double_quant", True) is not True:
        out.append(("double_quant", cfg.get("double_quant"), f"True with stack {PEER!r} (its NF4 load always "
                                                             "quantizes the constants too)"))
    if cfg.get("dtype", "auto") not in PEER_DTYPES:
        out.append(("dtype", cfg.get("dtype"), f"one of {list(PEER_DTYPES)} with stack {PEER!r} (it computes in "
                                               "bfloat16)"))
    if cfg.get("fp32_upcast"):
        out.append(("fp32_upcast", cfg["fp32_upcast"], f"False with stack {PEER!r} (a 16-bit-arm setting of ours)"))
    on = [k for k in LEVERS if cfg.get(k)]
    for name in on:
        off = 0 if name in COUNT_LEVERS else False
        out.append((name, cfg[name], f"{off} with stack {PEER!r}: our levers ({', '.join(on)} on here) patch what "
                                     "Unsloth replaces with its own kernels, loss and checkpointing; turn them off "
                                     "or use stack 'hf'"))
    return out


def _cuda_here(device: str) -> bool:
    if device == "cpu":
        return False
    return torch.cuda.is_available()


def unavailable(device: str) -> str | None:
    """Why the peer cannot run here on `device` (the message a run records), or None."""
    if not _cuda_here(device):
        return f"{NEEDS}: this run is on the CPU (device={device!r}; no CUDA GPU that torch sees)"
    missing = [p for p in PEER_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        return f"{NEEDS}: {', '.join(missing)} not installed here"
    return None


def import_first(stack: str, device: str = "auto") -> None:
    """Import Unsloth, before transformers and peft, where the run's stack is the peer and this machine can run it.

    Call it first in a fresh kernel (the training notebook's first cell after its parameters). It never raises:
    what stops the peer here is kept and raised by load_model, inside the run's guarded load step, so a sweep
    records it as the run's result. For stack 'hf' (and a stack name validation will refuse) it does nothing."""
    if stack != PEER or "unsloth" in sys.modules:
        return
    _IMPORT.clear()
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    problem = unavailable(device)
    early = [m for m in ("transformers", "peft") if m in sys.modules]
    if problem is None and early:
        were = "were" if len(early) > 1 else "was"
        problem = (f"{NEEDS}, imported before transformers and peft: {' and '.join(early)} {were} imported first in "
                   "this kernel, so Unsloth could not patch them. Restart the kernel and run the notebook from the top")
    if problem:
        _IMPORT["error"] = problem
        return
    t0 = time.perf_counter()
    try:
        import unsloth  # noqa: F401 - patches transformers, peft and the Trainer
    except Exception as e:  # a broken install, a driver it does not accept
        _IMPORT["error"] = f"{NEEDS}: `import unsloth` failed ({type(e).__name__}: {str(e)[:1000]})"
        return
    _IMPORT["seconds"] = time.perf_counter() - t0


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in PEER_PACKAGES:
        try:
            out[f"{p}_version"] = md.version(p)
        except md.PackageNotFoundError:
            out[f"{p}_version"] = None
    return out


def _peer_module():
    """Unsloth's FastLanguageModel, or the RuntimeError that says why this run cannot have it."""
    if "error" in _IMPORT:
        raise RuntimeError(_IMPORT["error"])
    if "unsloth" not in sys.modules:
        raise RuntimeError(f"{NEEDS}, imported first in a fresh kernel: call helpers.training.peer.import_first(stack, device) "
                           "before anything imports transformers (the training notebook does)")
    from unsloth import FastLanguageModel

    return FastLanguageModel


def load_model(stack: str, model: str, quant: str, dtype: str, double_quant: bool, device: str, seq_len: int):
    """(model, tokenizer, info) loaded by the run's stack; the tokenizer is models.load_tokenizer's in both."""
    if stack != PEER:
        return models.load_model(model, quant, dtype, double_quant, device=device)
    fast = _peer_module()
    source = models.resolve_model(model)
    if models.is_synthetic(model):  # Unsloth always reads a tokenizer; ours has none for random-token runs
        models.write_synthetic_tokenizer(model, source)
    kw = {} if device in ("cuda", "cuda:0") else {"device_map": {"": device}}  # else Unsloth's default: GPU 0
    try:
        net, _ = fast.from_pretrained(model_name=source, max_seq_length=seq_len, dtype=torch.bfloat16,
                                      load_in_4bit=True, **kw)  # offline: OFFLINE_ENV, set before its import
    except OSError as e:
        raise OSError(f"could not load model {model!r} from {source} with Unsloth: {e}") from e
    info = models.loaded_info(model, source, net, "bfloat16", models.keep_training_layout(net))
    info.update(_versions(), unsloth_import_s=_IMPORT.get("seconds"))
    return net, models.load_tokenizer(model, source), info


def target_names(target_modules: str) -> list[str] | str:
    """The notebook's target_modules as a stack takes it: 'all-linear' or a list of module names."""
    if target_modules == "all-linear":
        return "all-linear"
    return [m.strip() for m in target_modules.split(",") if m.strip()]


def attach_lora(stack: str, net, quant: str, lora_r: int, lora_alpha: float, lora_dropout: float,
                target_modules: str = "all-linear", gradient_checkpointing: bool = True, keep_16bit: bool = False,
                fp32_upcast: bool = False, seed: int = 0):
    """LoRA adapters attached by the run's stack (trainable, in training mode); hf: train.attach_lora."""
    if stack != PEER:
        return attach_ours(net, quant, lora_r, lora_alpha, lora_dropout, target_modules, gradient_checkpointing, keep_16bit,
                    fp32_upcast=fp32_upcast)
    fast = _peer_module()
    targets = target_names(target_modules)
    net = fast.get_peft_model(
        net, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=list(LINEARS) if targets == "all-linear" else targets, bias="none",
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False, random_state=seed,
    )
    net.train()
    return net
