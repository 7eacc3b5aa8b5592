"""Writes notebooks/01_train.ipynb from the cell sources below (outputs empty).

The notebook is the source of truth users edit in JupyterLab; this script exists so its cells can be
reviewed as plain text in diffs and rebuilt identically. Run: python tools/build_notebooks.py
"""
import sys
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]


def md(s):
    return nbf.v4.new_markdown_cell(s.strip())


def code(s, tags=()):
    c = nbf.v4.new_code_cell(s.strip())
    if tags:
        c.metadata["tags"] = list(tags)
    return c


TRAIN = [
    md("""
# 01 · One LoRA / QLoRA fine-tuning run, measured

One configuration: load a model (16-bit or quantized), attach LoRA, train a fixed number of steps on a
corpus, and measure time, memory, energy (on a GPU) and held-out perplexity before and after.
The run's record (the *sidecar*, `<output_dir>/<run_id>.json`) is written last, atomically.

Run it top to bottom in JupyterLab with the defaults below, or one configuration from the shell:

```
papermill notebooks/01_train.ipynb out.ipynb -p quant nf4 -p lora_r 16
```

A sweep (`python -m helpers.sweep parameters/default.yaml`) executes this notebook once per
configuration, each in a fresh kernel so memory figures start clean.
"""),
    code('''
# --- model --------------------------------------------------------------------------------------
model: str = "smollm2-135m"    # embedded default (no hub needed), a Hugging Face id 'owner/name', a local folder, or a synthetic
                               # shape (random weights, cost only): llama-2-7b-shape | mistral-7b-shape | llama-3.2-1b-shape | tiny-llama-shape
                               # | llama-3.1-70b-shape (stored NF4: quant nf4 only)
quant: str = "nf4"             # none | nf4 | fp4 | int8 -- base weights: none is 16-bit LoRA, the others QLoRA-style
dtype: str = "auto"            # auto | bfloat16 | float16 | float32 -- base dtype (quant none) and 4-bit compute dtype;
                               # auto: bfloat16 on a GPU, float32 on a CPU (bf16 is emulated, ~25x slower, on many CPUs)
double_quant: bool = True      # 4-bit only: also quantize the quantization constants (~0.37 bit/param saved)
fp32_upcast: bool = False      # quant none only: norms, embeddings and head in float32, the upcast peft gives QLoRA
                               # (the precision-matched 16-bit arm of parameters/precision.yaml)
# --- data ---------------------------------------------------------------------------------------
corpus: str = "pydoc"          # pydoc (ships with Python) | a local .txt / .jsonl | a hub dataset 'owner/name[:config]'
                               # | random-tokens (uniform token ids; synthetic models, and only they, use it)
seq_len: int = 256             # tokens per block; activation memory grows with it
eval_fraction: float = 0.1     # share of *documents* held out for perplexity (split by document, fixed seed)
eval_blocks: int = 16          # eval blocks scored before and after training (0: all); bounds eval time on a CPU
eval_every: int = 0            # also score them every N optimizer steps (0: only before and after): a held-out curve
# --- LoRA ---------------------------------------------------------------------------------------
lora_r: int = 8                # adapter rank; higher: more trainable params and memory
lora_alpha: float = 16         # adapter output is scaled by lora_alpha / lora_r
lora_dropout: float = 0.05     # dropout on the adapter input
target_modules: str = "all-linear"  # all-linear (every Linear but the head) or comma-separated names: q_proj,v_proj
gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30% more compute
# --- training -----------------------------------------------------------------------------------
max_steps: int = 30            # optimizer steps
batch_size: int = 2            # blocks per micro-batch (2 x 256 tokens: 512 tokens per micro-batch)
grad_accum: int = 1            # micro-batches per optimizer step
learning_rate: float = 2e-4    # peak LR (the QLoRA paper uses 1e-4 to 2e-4 for small models)
warmup_steps: int = 3          # linear LR warm-up steps, then linear decay to 0
optimizer: str = "adamw_torch" # adamw_torch | adamw_torch_fused | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit | sgd
seed: int = 0                  # LoRA init and batch order; the eval split does not depend on it
# --- speed and memory levers (all off: the plain stack, the reference) ---------------------------
fused_kernels: bool = False    # Liger's Triton kernels: RMSNorm, SwiGLU, RoPE, head fused with the loss (CUDA only)
torch_compile: bool = False    # torch.compile each decoder layer; the first steps pay the compile time
offload_activations: bool = False  # tensors saved for backward wait in pinned host memory, not on the GPU
keep_16bit: bool = False       # QLoRA only: norms, embeddings and head stay 16-bit (peft upcasts them to float32)
chunked_loss: int = 0          # head + cross-entropy over this many token chunks (0: off): never the whole logits
tiled_mlp: int = 0             # each layer's MLP over this many sequence slices, each checkpointed (0: off): long context
stack: str = "hf"              # hf: ours (transformers + peft, with the levers above) | unsloth: the peer, Unsloth
                               # (CUDA only, pip install -e .[peer], nf4, every lever above off) -- helpers/training/peer.py
# --- measurement --------------------------------------------------------------------------------
timing_warmup_steps: int = 3   # first steps left out of steady-state tokens/s (allocator and kernel warm-up)
vram_budget_gib: float = 0.0   # emulate a smaller GPU by capping torch's allocator (GiB); 0: whole card; GPU only.
                               # An emulation: the CUDA context and non-torch memory are outside the cap
device: str = "auto"           # auto | cpu | cuda | cuda:N
# --- output -------------------------------------------------------------------------------------
output_dir: str = "reports/scratch/runs"  # the sidecar goes here (relative to the project root)
run_id: str = ""               # empty: derived from the parameters
# --- several GPUs (FSDP-QLoRA, helpers/training/sharded.py; parameters/multi-gpu.yaml) ----------------
num_gpus: int = 1              # processes, one GPU each, training one model sharded by FSDP (FSDP-QLoRA); 1: one process,
                               # no FSDP. > 1 needs that many visible GPUs (or device cpu: processes on the CPU, for tests)
fsdp_cpu_offload: bool = False # num_gpus > 1: parameter shards stay in host memory and reach each GPU a layer at a time
                               # (Answer.AI's 70B on 2 x 24 GB); slower, less GPU memory
''', tags=["parameters"]),
    md("## 1 · Check the configuration\nEvery knob above goes into `config`; a bad value stops here, before anything is loaded or written: "
       "an unknown name, a value of the wrong type (`papermill -p learning_rate abc` gives a str), a number out of range or "
       "not finite, a device this machine lacks, a corpus file that is no text or has fewer than two documents, "
       "a `run_id` or `output_dir` that would leave its folder."),
    code('''
from helpers.training import peer
peer.import_first(stack, device)  # Unsloth patches transformers and peft only if imported before them: first, here
import helpers.training.runs as runs
config = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
runs.validate(config, types=__annotations__)  # the types declared in the parameters cell
run = runs.start(config)
print(f"run {run['run_id']} -> {run['sidecar']}")
'''),
    md("""## 2 · Load the model
On a GPU, NVML's used memory is read before and after the CUDA context is made (the context is outside any
VRAM budget). Getting the weights (download, GGUF conversion, or writing a synthetic checkpoint: once per cache)
is timed apart from loading them. The VRAM budget (if any) is applied before the first allocation of the model.
A budget is an *emulation*: torch's allocator is capped on a larger card; weights memory is read right after loading.
`stack` says whose code loads the model and attaches LoRA (`helpers/training/peer.py`): ours, or the peer measured beside it;
everything after that is the same code for both.

With `num_gpus` > 1 this kernel only fetches the weights and the tokenizer: sections 2 and 4–8 run in each of the
`num_gpus` processes that section 7 starts (`helpers/training/sharded.py`), and their figures come back after training."""),
    code('''
from helpers.training import models, levers
lever_cfg = levers.config_of(config)
if num_gpus > 1:  # no CUDA, bitsandbytes or Trainer (it imports both) in this kernel before its processes start
    from helpers.training import sharded
    with runs.guard(run):
        tokenizer = sharded.fetch(model, run["metrics"])
    info = {"synthetic": models.is_synthetic(model), "dtype_resolved": models.resolve_dtype(dtype, run["device"])}
    print(f"{model}: loaded in each of {num_gpus} processes in section 7")
else:
    from helpers.training import telemetry
    run["metrics"].update(telemetry.gpu_baseline(run["device"]))
    with runs.guard(run), telemetry.phase("fetch", run["metrics"]):
        models.resolve_model(model)
    with runs.guard(run), telemetry.phase("load", run["metrics"], run["device"]):
        runs.apply_vram_budget(run)
        net, tokenizer, info = peer.load_model(stack, model, quant, dtype, double_quant, run["device"], seq_len)
    run["metrics"].update(info)
    net = levers.apply_to_base(net, lever_cfg)  # Liger's kernels, if on: before evaluation, so one model throughout
    print(f"{info['params_total']/1e6:.1f} M parameters, weights {info['weights_gib']*1024:.0f} MiB, load {run['metrics']['load_s']:.1f} s"
          + (" -- synthetic: random weights, cost figures only" if info["synthetic"] else ""))
'''),
    md("## 3 · Corpus: split by document, cut into blocks\nNo document is on both sides of the split; every block holds `seq_len` tokens. "
       "A synthetic model trains on `random-tokens`: uniform random token ids (its cost depends on shapes, not text)."),
    code('''
from helpers.training import data
train_blocks, eval_blocks_t = data.prepare(config, tokenizer, run)
print(f"train {len(train_blocks)} blocks, eval {len(eval_blocks_t)} blocks of {seq_len} tokens")
'''),
    md("## 4 · Perplexity before training\nToken-weighted over the held-out blocks: exp(summed NLL / tokens)."),
    code('''
from helpers.training.evaluate import perplexity
not_quality = " (synthetic: random weights and tokens -- recorded, not a quality figure)" if info["synthetic"] else ""
if num_gpus > 1:
    print("scored in each process in section 7")
else:
    with runs.guard(run), telemetry.phase("eval_before", run["metrics"], run["device"]):
        before = perplexity(net, eval_blocks_t, batch_size=batch_size * 2)
    run["metrics"]["ppl_before"] = before["ppl"]
    print(f"perplexity before: {before['ppl']:.3f} over {before['tokens']} tokens{not_quality}")
'''),
    md("## 5 · Attach LoRA\nFreeze the base, add adapters; gradient checkpointing is set up identically in the 16-bit and quantized arms. "
       "Levers that are on (speed and memory, `helpers/training/levers.py`) are applied here and printed."),
    code('''
on_levers = {k: v for k, v in lever_cfg.items() if v}
print(f"stack {stack}, levers: {on_levers or ('none (the plain stack)' if stack == 'hf' else 'none')}")
if num_gpus > 1:
    print("attached in each process in section 7")
else:
    from helpers.training.train import make_trainer
    from transformers import set_seed
    set_seed(seed)
    with runs.guard(run):  # peft's float32 upcast allocates: an out-of-memory here is a result too
        net = peer.attach_lora(stack, net, quant, lora_r, lora_alpha, lora_dropout, target_modules, gradient_checkpointing,
                               keep_16bit, fp32_upcast=fp32_upcast, seed=seed)
        net = levers.apply_to_peft(net, lever_cfg)  # tiled MLPs and torch.compile of each decoder layer, if on
    run["metrics"]["params_trainable"], _ = models.count_parameters(net)
    print(f"trainable {run['metrics']['params_trainable']/1e6:.2f} M of {run['metrics']['params_total']/1e6:.1f} M parameters")
'''),
    md("## 6 · Gradients through the quantized weights\nOne small batch through one quantized layer: the gradient "
       "with respect to its input against a float32 reference from the dequantized weight (`helpers/training/quantized.py`). "
       "A library whose backward is wrong on this CPU or GPU stops the run here, before a wrong number is trained."),
    code('''
if num_gpus > 1:
    print("gradient check: not run with num_gpus > 1 (this kernel holds no model)")
else:
    from helpers.training import quantized
    with runs.guard(run):
        check = quantized.gradient_check(net)
    run["metrics"]["grad_check_rel_error"], run["metrics"]["grad_check_s"] = check["rel_error"], check["seconds"]
    print(f"gradient check: {check['layer']} relative error {check['rel_error']:.2g} (allowed {check['tolerance']:g}), "
          f"{check['seconds'] * 1000:.0f} ms" if check["layer"] else "gradient check: no quantized layer (nothing to check)")
'''),
    md("## 7 · Train\nThe Trainer's progress bar shows the step and the time left; each step also rewrites `<run_id>.progress` "
       "beside the sidecar, which a sweep polls to show the step on its own line. "
       "One telemetry row per optimizer step (device-synchronised time, tokens, loss, LR, memory incl. NVML); "
       "energy from NVML's counter over the training window on a GPU. Memory peaks: torch (allocated, reserved), NVML "
       "(process, device) and the non-torch part (CUDA context, libraries) that a VRAM budget does not cap."),
    code('''
if num_gpus > 1:  # num_gpus processes load, score, attach, train and score again; their figures come back as one run's
    with runs.guard(run):
        sharded.launch(run, train_blocks, eval_blocks_t)
    runs.record_budget(run)  # the fullest GPU against vram_budget_gib, as record_memory does for one process
    print(f"{num_gpus} processes: peak torch reserved per GPU {run['metrics']['peak_reserved_gib_per_gpu']} GiB")
else:
    steps = telemetry.StepTelemetry(run["device"])  # counts each step's loss tokens as the Trainer fetches its batches
    callbacks = [steps, telemetry.ProgressFile(runs.progress_path(run["sidecar"]))]
    if eval_every:  # held-out perplexity during training; its time and energy are left out of the training figures
        from helpers.training.evaluate import held_out_curve
        callbacks.append(held_out_curve(net, eval_blocks_t, eval_every, steps, batch_size=batch_size * 2))
    trainer = make_trainer(net, train_blocks, device=run["device"], dtype=info["dtype_resolved"], quant=quant, max_steps=max_steps,
                           batch_size=batch_size, grad_accum=grad_accum, learning_rate=learning_rate,
                           warmup_steps=warmup_steps, optimizer=optimizer, seed=seed, callbacks=callbacks, levers=lever_cfg)
    with runs.guard(run, steps), telemetry.phase("train", run["metrics"], run["device"]):
        trainer.train()
    run["history"] = steps.history
    run["metrics"].update(steps.summary(timing_warmup_steps))
    runs.record_memory(run, steps)
m = run["metrics"]
print(f"{m['tokens_per_s']:.0f} tokens/s over the steady steps ({m['tokens_per_s_window']:.0f} over their whole window, "
      f"between-step work included), median step {m['step_time_median_s']:.3f} s")
if m["peak_reserved_gib"] is not None:
    print(f"peak torch reserved {m['peak_reserved_gib']:.2f} GiB + non-torch {m['non_torch_peak_gib'] or float('nan'):.2f} GiB "
          f"(CUDA context {m['cuda_context_gib'] or float('nan'):.2f}); energy {m['energy_j_per_1k_tokens'] or float('nan'):.1f} J / 1k tokens")
'''),
    md("## 8 · Perplexity after training"),
    code('''
if num_gpus == 1:
    with runs.guard(run), telemetry.phase("eval_after", run["metrics"], run["device"]):
        after = perplexity(net, eval_blocks_t, batch_size=batch_size * 2)
    run["metrics"]["ppl_after"] = after["ppl"]
print(f"perplexity after: {run['metrics']['ppl_after']:.3f} (before {run['metrics']['ppl_before']:.3f}){not_quality}")
'''),
    md("## 9 · Results\nThe sidecar is written last and atomically: a run without one did not finish."),
    code('''
path = runs.finish(run)
runs.summary_table(run)
'''),
]


def build(cells, path):
    nb = nbf.v4.new_notebook()
    for i, c in enumerate(cells):  # fixed ids: a rebuild with unchanged sources is byte-identical
        c.id = f"cell-{i:02d}"
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbf.validate(nb)
    nbf.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    build(TRAIN, ROOT / "notebooks" / "01_train.ipynb")
