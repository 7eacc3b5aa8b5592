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
from helpers.records.paths import PROJECT_ROOT, resolve_sweep_dir, shown  # noqa: F401 - callers know them from here
from helpers.records.sidecars import loss_gap  # noqa: F401 - the lever check's loss comparison, a record-level function
from helpers.analysis.load import (  # noqa: F401
    NOT_CONFIG, METRICS, NVML_PEAK_KEYS, CONFIG_KEYS_FALLBACK, synthetic_row, load_sweep, load_sweeps,
    config_labels,
)
from helpers.analysis.tables import (  # noqa: F401
    NO_PLAN, overview, plan_status, run_table,
)
from helpers.analysis.rows import (  # noqa: F401
    Q4_1_NOTE, UNKNOWN_MACHINE, PALETTE, drawn, finished, by_config, quants_in, vs_16bit, vs_16bit_words,
    extremes_words, device_words, on_cpu_only, budget_label, machine_labels, machine_keys, machines_note,
    side_by_side, own_costs, side_by_side_note, sharded_note, quality_rows, q4_1_note, pareto_front,
)
from helpers.analysis.cost import (  # noqa: F401
    STATUS_CODE, STATUS_COLOR, feasibility_rows, feasibility_cells, feasibility_figure, feasibility_takeaway,
    feasibility_matrix, GPU_MEMORY, CPU_MEMORY, memory_rows, memory_figure, memory_takeaway, peak_memory,
    PHASES, throughput_rows, throughput_figure, throughput_takeaway, throughput, energy_rows, energy_figure,
    energy_takeaway, energy_per_token,
)
from helpers.analysis.quality import (  # noqa: F401
    rank_rows, rank_figure, rank_takeaway, perplexity_vs_rank, loss_rows, loss_bands, MANY_CURVES, loss_figure,
    loss_takeaway, loss_curves, SETTLED_SHARE, SETTLED_CHANGE, held_out_rows, held_out_figure,
    held_out_takeaway, held_out_curves, point_labels, cost_quality_rows, cost_quality_figure,
    cost_quality_takeaway, cost_quality,
)
from helpers.analysis.stats import (  # noqa: F401
    T975, NO_REPEATS, t_critical_95, mean_ci95, ci_words, ratio_words, repeats_problem, ppl_ci_table,
    paired_ratio_ci, paired_differences, paired_summary, flattening_rank, FLAT_MARGIN_PCT, FLAT_RULE,
    paired_rank_table, flattening_rank_paired,
)
from helpers.analysis.seeds import (  # noqa: F401
    ppl_ci_rows, ppl_ci_figure, ppl_ci_takeaway, perplexity_ci, quant_gap_rows, quant_gap_figure,
    quant_gap_takeaway, quantization_gap, rank_returns_rows, rank_returns_figure, rank_returns_takeaway,
    rank_returns, MEMORY_COLS, frontier_rows, frontier_figure, frontier_takeaway, cost_quality_frontier,
)
from helpers.analysis.precision import (  # noqa: F401
    PRECISION_CELLS, PRECISION_RATIOS, precision_cells, precision_table, precision_rows, precision_figure,
    precision_takeaway, precision_matched,
)
from helpers.analysis.levers import (  # noqa: F401
    LEVER_KEYS, CHECK_WINDOW, CHECK_MIN_FALL, CHECK_FALL_TOL, CHECK_PPL_TOL, CHECK_RULE, lever_check,
    lever_table, lever_rows, lever_figure, lever_takeaway, lever_effects,
)
from helpers.analysis.display import (  # noqa: F401
    use_report_renderer, show, explorer,
)

# The single-sweep charts of notebook 02 in its order, and the across-seed ones (sweeps with repeats)
CHARTS = (feasibility_matrix, peak_memory, throughput, perplexity_vs_rank, cost_quality, energy_per_token)
REPEAT_CHARTS = (perplexity_ci, quantization_gap, rank_returns, cost_quality_frontier)
