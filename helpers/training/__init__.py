"""One run: what notebook 01 calls (torch, transformers, peft, bitsandbytes).

runs       a run's lifecycle: validation against this machine, environment, VRAM budget, memory, its sidecar
models     resolve and load a model (quantized or not), count its parameters
quantized  bitsandbytes' layout, the gradient guard
peer       the training stack: ours (hf) or the peer measured beside it (unsloth), one switch
data       load a corpus, split it by document, cut it into token blocks
train      attach LoRA, train with the HF Trainer
levers     the speed and memory levers
telemetry  per-step time/memory/energy, phase timers
evaluate   token-weighted perplexity
sharded    num_gpus > 1: FSDP processes, their figures aggregated
"""
