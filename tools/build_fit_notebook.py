"""Writes notebooks/03_will_it_fit.ipynb from the cell sources below (outputs empty).

Like tools/build_notebooks.py: the notebook is what users open; this script keeps its cells reviewable as plain
text and rebuilds it identically. Run: python tools/build_fit_notebook.py
"""
from build_notebooks import ROOT, build, code, md

FIT = [
    md("""
# 03 · Will it fit? Peak GPU memory of a LoRA / QLoRA run, predicted and checked

`helpers/fit/` predicts the peak memory of one training run of `01_train.ipynb` from the model's shape alone
(its `config.json`): base weights, adapters and optimizer state, the activations kept for backward, the
logits and loss, the allocator's reserve and the memory outside torch. No GPU and no torch are needed; the same
predictions come from the command line (`python -m helpers.fit --model ... --card 8`).

This notebook shows one configuration's breakdown against a card, lets you change it with controls (in
JupyterLab), and sets the predictions beside **every committed GPU measurement** of the study, then beside the
pre-registered check whose predictions were committed before it was run. Run it from the shell with

```
papermill notebooks/03_will_it_fit.ipynb reports/fit/will_it_fit.ipynb -p explore False
```

or `python -m helpers.fit --report`, which also writes the self-contained `reports/fit/will_it_fit.html`.
Cards are in GiB of the whole process; the measurements are from one H200 (CUDA 12), where the memory outside
torch was 0.74 GiB: a consumer card's CUDA context is often smaller, so the verdicts err on the safe side there.
"""),
    code('''
model: str = "llama-3.1-8b-shape"  # a registry name, a model folder or config.json, or a hub id (needs the hub)
card_gib: float = 12.0             # the card, GiB of the whole process
quant: str = "nf4"                 # none | nf4 | fp4 | int8
lora_r: int = 16
batch_size: int = 1
seq_len: int = 2048
gradient_checkpointing: bool = True
fused_kernels: bool = False        # the levers of helpers/training/levers.py, all off: the plain stack
torch_compile: bool = False
offload_activations: bool = False
keep_16bit: bool = False
chunked_loss: int = 0
tiled_mlp: int = 0
reports_dir: str = "reports"       # where the committed measurements are
out_dir: str = "reports/fit"       # validation.csv goes here
explore: bool = True               # ipywidgets controls (JupyterLab); the HTML report sets False
''', tags=["parameters"]),
    md("## One configuration against the card\nA bare training step (the notebook's perplexity pass left out), "
       "at its peak moment; the line is the card."),
    code('''
import pandas as pd
from IPython.display import Markdown, display
from helpers import fit
from helpers.fit import plots as fitplots
from helpers.analysis import use_report_renderer
use_report_renderer()  # Plotly MIME in JupyterLab, offline HTML in the exported report
cfg = dict(model=model, quant=quant, lora_r=lora_r, batch_size=batch_size, seq_len=seq_len, eval_blocks=1,
           gradient_checkpointing=gradient_checkpointing, fused_kernels=fused_kernels, torch_compile=torch_compile,
           offload_activations=offload_activations, keep_16bit=keep_16bit, chunked_loss=chunked_loss, tiled_mlp=tiled_mlp)
pred = fit.predict(cfg, evaluation=False)
pd.Series({label: round(pred[key], 2) for key, label in fit.BREAKDOWN}, name="GiB").to_frame()
'''),
    code('''
verdict = fit.card_verdict(pred, card_gib)  # the one verdict: the CLI, --json and the chart's line read it too
display(Markdown(f"**{model}** at batch {batch_size} x {seq_len}: whole process {pred['peak_process_gib']:.1f} GiB at "
                 f"its peak uncapped (the {pred['peak_moment']}): **{fit.verdict_words(verdict)}**."))
fitplots.breakdown_figure(pred, card_gib, f"{model}, {quant}, batch {batch_size} x {seq_len}").show()
'''),
    md("## What fits this card\nThe largest sequence at batch 1 and at this batch, the largest batch at this "
       "sequence, and the fastest measured recipe that fits (speeds from `reports/levers`, 7B shape)."),
    code('''
lines = [f"- largest seq_len at batch {b}: {fit.max_seq_len({**cfg, 'batch_size': b}, card_gib, evaluation=False):,}"
         for b in sorted({1, batch_size})]
lines.append(f"- largest batch at seq_len {seq_len}: {fit.max_batch(cfg, card_gib, evaluation=False)}")
for plain in (True, False):
    best = fit.fastest_fit(cfg, card_gib, plain=plain, evaluation=False)
    lines.append(f"- fastest that fits, {'plain stack' if plain else 'with levers'}: "
                 + (f"{best[0]} (~{best[1]:.1f}x plain NF4)" if best else "nothing"))
Markdown("\\n".join(lines))
'''),
    md("## Explore (JupyterLab)\nChange the model, card, quantization, rank, batch, sequence, checkpointing and "
       "levers; the chart redraws. The controls need a live kernel, so the HTML report leaves them out (`explore=False`)."),
    code('''
fitplots.explorer(card_gib) if explore else Markdown("*Controls off (`explore=False`).*")
'''),
    md("""## Predicted against measured: every committed GPU run
Every sidecar under `reports/*/runs/` from a GPU and every probe of the max-context searches. Peaks are compared
for runs that finished; ok/OOM for runs under an allocator cap. The quality sweeps ran 2-15 notebooks side by
side on one GPU (open markers): NVML reported each process's own memory there (their memory outside torch is the
same 0.74 GiB as in runs alone), so their peaks are per process and are kept, and the figures are also given
for the runs that had the GPU alone. The error table is written to `reports/fit/validation.csv`."""),
    code('''
table = pd.DataFrame(fit.validation_table(fit.measured_runs(reports_dir)))
fit.write_validation(f"{out_dir}/validation.csv", table.to_dict("records"))
s = fit.validation_summary(table.to_dict("records"))
pct = lambda x: f"{x * 100:.1f}%"
Markdown(f"Whole-process peak: median absolute error **{pct(s['process_all_median'])}**, largest **{pct(s['process_all_max'])}** "
         f"over {s['process_all_n']} finished runs and probes ({pct(s['process_alone_median'])} and {pct(s['process_alone_max'])} "
         f"over the {s['process_alone_n']} that had the GPU alone); allocated {pct(s['allocated_all_median'])} / "
         f"{pct(s['allocated_all_max'])}, reserved {pct(s['reserved_all_median'])} / {pct(s['reserved_all_max'])}. "
         f"ok/OOM right for **{s['status_all_right']}/{s['status_all_n']}** budgeted runs: {s['status_runs_right']}/"
         f"{s['status_runs_n']} notebook runs, {s['status_probes_right']}/{s['status_probes_n']} max-context probes.")
'''),
    code('''
fitplots.compare_figure(table, "process").show()
'''),
    code('''
fitplots.compare_figure(table, "allocated").show()
'''),
    md("### Where it misses\nRuns whose whole-process peak is off by more than 5%, and budgeted runs whose "
       "ok/OOM was predicted wrong (with how far the prediction was from the cap)."),
    code('''
table["margin_gib"] = [fit.predict(r["cfg"], evaluation=r["evaluation"])["needs_under_cap_gib"] - r["budget_gib"]
                       if r["budget_gib"] else None for r in fit.measured_runs(reports_dir)]
misses = table[(table["error_process"].abs() > 0.05) | (table["status_right"] == False)]  # noqa: E712
misses[["source", "id", "levers", "side_by_side", "status", "predicted_status", "budget_gib", "margin_gib",
        "measured_process_gib", "predicted_process_gib", "error_process", "peak_moment"]].round(3)
'''),
    md("""## The pre-registered check
`reports/fit/preregistered.csv` holds the predictions for `parameters/fit-check.yaml` (two shapes never measured
before, Llama-3.1-8B and Qwen2.5-7B, and Llama-3.2-1B's), committed before any of those runs was measured. They
are compared here as committed, not as today's predictor would make them."""),
    code('''
pre = pd.DataFrame(fit.preregistered_vs_measured(fit.PREREGISTERED, reports_dir))
done = pre["measured_status"].notna().sum()
errs = pre["error_process"].dropna().abs()
right = pre["status_right"].dropna()
Markdown(f"{done} of {len(pre)} pre-registered runs measured." + (
    f" Whole-process peak: median absolute error {errs.median():.1%}, largest {errs.max():.1%}; ok/OOM right for "
    f"{int(right.sum())}/{len(right)} budgeted runs." if done else " Run `parameters/fit-check.yaml` on a GPU to fill it in."))
'''),
    code('''
pre[["run_id", "vram_budget_gib", "predicted_status", "measured_status", "predicted_process_gib",
     "measured_process_gib", "error_process"]].round(3)
'''),
    md("## What fits my card\nPredicted for a bare training step, LoRA r16 on all linear layers, whole process: the "
       "largest seq_len at batch 1 (and the recipe that reaches it) and the fastest recipe at batch 1 x 2,048 tokens."),
    code('''
pd.DataFrame(fit.card_table())
'''),
]


if __name__ == "__main__":
    build(FIT, ROOT / "notebooks" / "03_will_it_fit.ipynb")
