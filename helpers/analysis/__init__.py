"""One sweep, analysed: its sidecars as tidy tables, and one function per chart, in notebook 02's sections.

    summary, history = load_sweep("reports/default")
    fig, takeaway = throughput(summary)

Every chart function returns (figure, takeaway), the takeaway a line computed from the same rows the
figure draws; where the sweep lacks the data (a CPU has no energy counter) it returns (None, a sentence
saying why). Each chart is three functions a test can call apart: `<chart>_rows` (the row selection, or the
sentence why there is nothing to draw), `<chart>_figure` and `<chart>_takeaway`. Only runs with status ok are
measured; failed runs show in the feasibility matrix and the run table. Synthetic runs (random weights of a
named shape) count for time, memory and energy but never for quality: their perplexity and loss mean nothing.

The modules, in the notebook's order (each one concern; none imports torch, the sweep runner or papermill):

    load       sidecars -> summary and history tables; configuration labels
    tables     overview, plan status (the sweep's plan.json), the run table
    rows       row selections the charts share: finished runs, medians, ratios to 16-bit, machines, notes
    cost       feasibility, peak memory, throughput, energy
    quality    perplexity vs rank, loss curves, held-out curves, cost vs quality
    stats      95% t intervals, paired differences, the per-configuration table, where rank returns flatten
    seeds      the across-seed charts (intervals, quantization-only gap, rank returns, cost-quality frontier)
    precision  quantization apart from precision (the 2 x 2)
    levers     speed and memory levers against the plain stack; the equivalence check
    display    renderer, show, the JupyterLab explorer

This package re-exports the names notebooks, tests, benchmarks and other helpers use: `helpers.analysis.X`.
"""
from ..paths import PROJECT_ROOT, resolve_sweep_dir, shown  # noqa: F401 - callers know them from here
from ..sidecars import loss_gap  # noqa: F401 - the lever check's loss comparison, a record-level function
from .cost import *  # noqa: F401,F403
from .cost import STATUS_CODE, STATUS_COLOR  # noqa: F401
from .display import explorer, show, use_report_renderer  # noqa: F401
from .levers import *  # noqa: F401,F403
from .levers import _lever_label  # noqa: F401
from .load import *  # noqa: F401,F403
from .precision import *  # noqa: F401,F403
from .quality import *  # noqa: F401,F403
from .rows import *  # noqa: F401,F403
from .seeds import *  # noqa: F401,F403
from .stats import *  # noqa: F401,F403
from .tables import *  # noqa: F401,F403
from .cost import energy_per_token, feasibility_matrix, peak_memory, throughput
from .quality import cost_quality, perplexity_vs_rank
from .seeds import cost_quality_frontier, perplexity_ci, quantization_gap, rank_returns

# The single-sweep charts of notebook 02 in its order, and the across-seed ones (sweeps with repeats)
CHARTS = (feasibility_matrix, peak_memory, throughput, perplexity_vs_rank, cost_quality, energy_per_token)
REPEAT_CHARTS = (perplexity_ci, quantization_gap, rank_returns, cost_quality_frontier)
