"""Thin helpers for the qlora-study notebooks: plain functions, a module per concern.

models     resolve and load a model (quantized or not), count its parameters
data       load a corpus, split it by document, cut it into token blocks
train      attach LoRA, train with the HF Trainer
peer       the training stack: ours (hf) or the peer we measure beside it (unsloth), one switch
telemetry  per-step time/memory/energy, phase timers
evaluate   token-weighted perplexity
runs       a run's lifecycle in notebook 01: validation, environment, VRAM budget, its sidecar
params     run ids and parameter type checks (no torch)
sidecars   the records on disk: sidecars, summary.csv, a sweep's plan.json, the out-of-memory test (no torch)
sweep      run a grid of configurations with papermill; report and publish build and publish its report
analysis   one sweep analysed, a package by notebook 02's sections (no torch)
registry   model names and shapes, quantizations, levers and the plain stack, with no torch import
fit        predict a run's peak GPU memory from the model's shape (no torch), and what fits a card
fitplots   the charts and controls of notebooks/03_will_it_fit.ipynb
"""
