"""Thin helpers for the qlora-study notebooks: plain functions, a module per concern.

models     resolve and load a model (quantized or not), count its parameters
data       load a corpus, split it by document, cut it into token blocks
train      attach LoRA, train with the HF Trainer
peer       the training stack: ours (hf) or the peer we measure beside it (unsloth), one switch
telemetry  per-step time/memory/energy, phase timers
evaluate   token-weighted perplexity
runs       parameters, validation, run ids, atomic sidecars
sweep      run a grid of configurations with papermill
registry   model names and shapes, with no torch import
fit        predict a run's peak GPU memory from the model's shape (no torch), and what fits a card
fitplots   the charts and controls of notebooks/03_will_it_fit.ipynb
"""
