"""Writes notebooks/02_analysis.ipynb from the cell sources below (outputs empty).

Like tools/build_notebooks.py: the notebook is what users open; this script keeps its cells reviewable
as plain text and rebuilds it identically. Run: python tools/build_analysis_notebook.py
"""
from build_notebooks import ROOT, build, code, md

ANALYSIS = [
    md("""
# 02 · One sweep, analysed: feasibility, memory, speed, energy and quality

Reads a sweep folder (`reports/<name>/`: one sidecar per run in `runs/`) and draws one chart per question,
each with a one-line takeaway computed from the same rows. Failed and out-of-memory runs are results and
appear in the feasibility matrix; corrupt or unfinished runs are listed and left out of the charts.

Open it in JupyterLab (the last cell adds selectors for exploring), or run it for one sweep from the shell:

```
papermill notebooks/02_analysis.ipynb reports/default/analysis.ipynb -p sweep_dir reports/default
```

`python -m helpers.report reports/<name>` does that and also writes the self-contained
`reports/<name>/analysis.html`.
"""),
    code('''
sweep_dir: str = "reports/default"  # the sweep folder (holds runs/); relative to the project root
explore: bool = True                # ipywidgets selectors at the end (JupyterLab); the HTML report sets False
pair_with: str = ""                 # other sweep folders (comma-separated) whose runs pair with this one's in the
                                    # precision-matched section: reports/precision pairs with reports/quality
''', tags=["parameters"]),
    md("## The sweep\n**Answers:** did every run this sweep plans finish, and which are still to run?\n\nHow many runs this folder holds and how they ended, against the plan the sweep recorded when it started (`plan.json`). A sidecar or executed notebook that cannot be read is marked, not fatal."),
    code('''
from IPython.display import Markdown
import helpers.analysis as analysis
analysis.use_report_renderer()  # figures as Plotly MIME (JupyterLab) + offline HTML (the exported report)
sweep = analysis.resolve_sweep_dir(sweep_dir)
summary, history = analysis.load_sweep(sweep)
Markdown(f"`{sweep_dir}`: {analysis.overview(summary)}{analysis.plan_status(sweep, summary)}")
'''),
    md("## Against the published reference\n**Answers:** does this machine reproduce the published figures?\n\nFor a sweep run on this machine (`reports/local/<name>/`), each configuration "
       "beside the published one (`reports/<name>/`): perplexity should agree within 1% on any machine and is flagged "
       "when it does not, with what differs in the environment; speed is this machine's, shown as a ratio."),
    code('''
from helpers.analysis import reference
against = reference.compare(sweep)
if against is None:
    display(Markdown("*Skipped.* This folder is published itself, or no published sweep of its name exists."))
else:
    display(Markdown(against[0]))
    display(reference.display_table(against[1]))
'''),
    md("## Every run\n**Answers:** how did each run end, and why did the failed ones fail?\n\nEach run with its outcome; "
       "the charts below hold the figures."),
    code('''
analysis.run_table(summary)
'''),
    md("## Feasibility: which configurations fit in which memory budget\n**Answers:** which configurations train within which memory budget?\n\nAn out-of-memory run is a finding, not a crash. Hover a cell for the error text."),
    code('''
analysis.show(*analysis.feasibility_matrix(summary))
'''),
    md("## Peak memory by configuration\n**Answers:** how much memory does each configuration need, and how much does quantization save?\n\nWeights after load, then the training peak: torch's allocated and reserved memory and NVML's per-process figure (which also sees the CUDA context and bitsandbytes' paged memory) on a GPU; the process's resident memory on a CPU."),
    code('''
analysis.show(*analysis.peak_memory(summary))
'''),
    md("## Throughput and wall-clock\n**Answers:** how fast does each configuration train, and where does the time go?\n\nSteady-state tokens/s leaves out the timing warm-up steps; wall-clock is split by phase."),
    code('''
analysis.show(*analysis.throughput(summary))
'''),
    md("## Quality: perplexity before and after training, against LoRA rank\n**Answers:** how much does training improve held-out perplexity, at which rank, and what does quantization cost?\n\nToken-weighted perplexity on held-out documents. Synthetic runs (random weights) are left out."),
    code('''
analysis.show(*analysis.perplexity_vs_rank(summary))
'''),
    md("## Loss curves\n**Answers:** does the training loss fall alike across configurations and seeds?\n\nEach line is the "
       "mean of a configuration's runs, its band spans the lowest to the highest run. The left menu shows one "
       "quantization's means; the right one shows the single runs (seeds), all or one quantization's. Both work in "
       "the HTML report too."),
    code('''
analysis.show(*analysis.loss_curves(history))
'''),
    md("## Held-out perplexity during training\n**Answers:** has held-out perplexity settled by the last step?\n\nRuns with `eval_every` score the eval blocks during training: "
       "the curve shows whether held-out perplexity has settled by the last step."),
    code('''
analysis.show(*analysis.held_out_curves(history))
'''),
    md("## Cost against quality\n**Answers:** which configurations are worth their cost: none cheaper and better at once?\n\n"
       "Perplexity after training against training time, and against energy where it was measured; the dashed line is "
       "the Pareto front, whose points are labelled; hover any point for its configuration."),
    code('''
analysis.show(*analysis.cost_quality(summary))
'''),
    md("""## Quality across seeds: confidence intervals, the quantization-only gap, rank, and cost
**Answers:** which quality differences are larger than seed-to-seed noise?

Shown only for a sweep with several seeds per configuration (`repeats` ≥ 2), such as `parameters/quality.yaml`.
Intervals are 95% Student t intervals across seeds (mean ± t(0.975, n−1) · s/√n). The quantization-only gap
compares the bases before any training on the same eval blocks. Where returns flatten is judged per arm, each
rank against the arm's best rank paired by seed (the runs of one seed share their batch order): the smallest
rank whose paired difference has a 95% interval ending at or below +0.25% (`analysis.FLAT_RULE`); the table gives
every rank's paired difference and in how many seeds it is worse. Synthetic runs are left out."""),
    code('''
problem = analysis.repeats_problem(summary)
if problem:
    display(Markdown(f"*Skipped.* No across-seed quality analysis: {problem}."))
else:
    display(analysis.ppl_ci_table(summary).round(4))
    for chart in analysis.REPEAT_CHARTS:
        analysis.show(*chart(summary))
    display(analysis.paired_rank_table(summary).round(4))
'''),
    md("""## Quantization apart from precision
**Answers:** how much of the NF4 / 16-bit gap is quantization, and how much the float32 upcast?

The QLoRA arms train with peft's float32 upcast of norms, embeddings and head (a float32 residual stream); the
16-bit arm does not. `parameters/precision.yaml` adds a 16-bit arm with that upcast (`fp32_upcast`) and an NF4 arm
without it (`keep_16bit`), so NF4 / 16-bit can be compared with precision matched both ways, paired by rank and
seed. Its runs pair with `reports/quality`'s: pass `pair_with` (`-p pair_with reports/quality`)."""),
    code('''
joined = analysis.load_sweeps([sweep, *[p.strip() for p in pair_with.split(",") if p.strip()]])[0] if pair_with else summary
fig, line = analysis.precision_matched(joined)
analysis.show(fig, line)
if fig is not None:
    display(analysis.precision_table(joined).round(4))
'''),
    md("## Energy per 1k training tokens\n**Answers:** how much energy does a training token cost in each configuration?\n\nFrom NVML's energy counter over the training window (sampled power as a fallback); absent, not zero, where neither exists."),
    code('''
analysis.show(*analysis.energy_per_token(summary))
'''),
    md("## Speed and memory levers\n**Answers:** which lever makes training faster or leaner without changing what it learns?\n\nEach lever (fused kernels, `torch.compile`, offloaded activations, 16-bit head and "
       "embeddings, chunked loss, tiled MLP, fused AdamW, no checkpointing) against the plain stack of the same configuration; "
       "shown for a sweep that varies them, such as `parameters/levers.yaml`. Speed, memory and energy are compared only "
       "with plain runs of the same machine (`machine`); a run that shared the device has none. The equivalence check "
       "(`check`, `analysis.CHECK_RULE`) compares each lever run with the plain run of the same seed: how much its "
       "training loss fell (`fall_kept`, 1 = as much) and its held-out perplexity after training (`ppl_after_x`); it says "
       "*cannot tell* where the plain run's loss fell < 10% (random weights), where no lever can be told apart. "
       "`loss_gap_pct`, the largest difference of the training loss at any logged step, is kept beside it."),
    code('''
lever_table = analysis.lever_table(summary, history)
fig, line = analysis.lever_effects(summary, lever_table)
analysis.show(fig, line)
if fig is not None:
    display(lever_table.round(3))
'''),
    md("## Explore (JupyterLab)\n**Answers:** whatever the charts above do not: any per-step measure of any runs.\n\nPick a per-step measure and runs. These ipywidgets need a live kernel, so the HTML report leaves them out (`explore=False`)."),
    code('''
analysis.explorer(summary, history) if explore else Markdown("*Explorer off (`explore=False`).*")
'''),
]


if __name__ == "__main__":
    build(ANALYSIS, ROOT / "notebooks" / "02_analysis.ipynb")
