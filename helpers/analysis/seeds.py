"""Quality across seeds (notebook 02, for sweeps with repeats): perplexity with 95% intervals, the
quantization-only gap, returns in LoRA rank, and cost against quality with intervals. Each chart is
`<chart>_rows`, `<chart>_figure` and `<chart>_takeaway`; the statistics are stats.py's.
"""
import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from helpers.analysis.load import config_labels
from helpers.analysis.quality import point_labels
from helpers.analysis.rows import (PALETTE, drawn, machines_note, own_costs, pareto_front, q4_1_note, quality_rows, quants_in,
                   side_by_side, side_by_side_note)
from helpers.analysis.stats import (FLAT_RULE, ci_words, flattening_rank_paired, mean_ci95, paired_rank_table, paired_ratio_ci,
                    ppl_ci_table, ratio_words, repeats_problem)


def _paired_gaps(rows: pd.DataFrame, col: str) -> list[str]:
    """'<quant> <ratio words>' for each quantization's col over the unquantized arm's, paired by seed and rank."""
    gaps = []
    for q in [x for x in quants_in(rows["quant"]) if x != "none"]:
        mean, half, n, exact = paired_ratio_ci(rows, col, q)
        if n:
            gaps.append(f"{q} {ratio_words(mean, half, exact)}")
    return gaps


# --- perplexity after training, mean and interval ------------------------------------------------------------

def ppl_ci_rows(summary: pd.DataFrame):
    problem = repeats_problem(summary)
    if problem:
        return f"No confidence intervals: {problem}."
    rows, note = quality_rows(summary, "ppl_after")
    return {"runs": rows, "note": note, "table": ppl_ci_table(summary)}


def ppl_ci_figure(sel: dict) -> go.Figure:
    t = sel["table"]
    fig = go.Figure(go.Scatter(x=t.index, y=t["ppl_after_mean"], mode="markers",
                               error_y=dict(type="data", array=t["ppl_after_ci95"], visible=True),
                               customdata=t["n_seeds"], marker=dict(size=10, color="#1f77b4"),
                               hovertemplate="%{x}<br>ppl_after %{y:.3f} ± %{error_y.array:.3f} (n=%{customdata})<extra></extra>"))
    fig.update_layout(title="Perplexity after training: mean and 95% interval across seeds (lower is better)",
                      xaxis_title="configuration", yaxis_title="ppl_after", height=450)
    return fig


def ppl_ci_takeaway(sel: dict) -> str:
    t, rows = sel["table"], sel["runs"]
    best = t["ppl_after_mean"].idxmin()
    line = (f"Best: {best}, ppl_after {ci_words(t.loc[best, 'ppl_after_mean'], t.loc[best, 'ppl_after_ci95'])} "
            f"over {t.loc[best, 'n_seeds']} seeds")
    gaps = _paired_gaps(rows, "ppl_after") if "none" in set(rows["quant"]) else []
    if gaps:
        line += "; ppl_after vs the unquantized arm at equal rank and seed: " + ", ".join(gaps)
    return line + "." + sel["note"] + q4_1_note(rows)


def perplexity_ci(summary: pd.DataFrame):
    """Perplexity after training per configuration: mean across seeds with its 95% t interval (error bars),
    and each quantization's ppl_after over the unquantized arm's, paired by seed and rank."""
    return drawn(ppl_ci_rows(summary), ppl_ci_figure, ppl_ci_takeaway)


# --- quantization alone: the bases before training ----------------------------------------------------------------

def quant_gap_rows(summary: pd.DataFrame):
    rows, note = quality_rows(summary, "ppl_before")
    problem = repeats_problem(summary)
    if problem:
        return f"No quantization-only gap with intervals: {problem}."
    if "none" not in set(rows["quant"]):
        return "No quantization-only gap: the sweep has no unquantized (quant none) arm to compare with." + note
    quants = quants_in(rows["quant"])
    return {"runs": rows, "note": note, "quants": quants,
            "stats": {q: mean_ci95(rows.loc[rows["quant"] == q, "ppl_before"]) for q in quants}}


def quant_gap_figure(sel: dict) -> go.Figure:
    quants, stats = sel["quants"], sel["stats"]
    fig = go.Figure(go.Bar(x=quants, y=[stats[q][0] for q in quants], marker_color="#8c564b",
                           error_y=dict(type="data", array=[0.0 if math.isnan(stats[q][1]) else stats[q][1]
                                                            for q in quants], visible=True),
                           hovertemplate="%{x}<br>ppl_before %{y:.3f}<extra></extra>"))
    fig.update_layout(title="Quantization alone: perplexity of the base before training (same eval blocks)",
                      xaxis_title="quant", yaxis_title="ppl_before", height=420)
    return fig


def quant_gap_takeaway(sel: dict) -> str:
    rows = sel["runs"]
    parts = _paired_gaps(rows, "ppl_before")
    line = f"Before any training, the unquantized base scores {sel['stats']['none'][0]:.3f}"
    if parts:
        line += "; quantized base over unquantized: " + ", ".join(parts)
    dtypes = sorted({str(d) for d in rows.get("dtype_resolved", pd.Series(dtype=object)).dropna()})
    if dtypes:
        line += f" (base dtype {', '.join(dtypes)})"
    return line + "." + sel["note"] + q4_1_note(rows)


def quantization_gap(summary: pd.DataFrame):
    """The quantization-only gap: perplexity of each quantized base before training over the unquantized base's,
    on the same eval blocks. ppl_before depends on no seed, so on one device it is usually the same in every
    run and the ratio is exact; where it varies (non-deterministic kernels), a 95% interval across seeds."""
    return drawn(quant_gap_rows(summary), quant_gap_figure, quant_gap_takeaway)


# --- returns in LoRA rank -------------------------------------------------------------------------------------------

def rank_returns_rows(summary: pd.DataFrame):
    """The per-configuration table with each row's arm (series: the label without the rank), the paired rank table,
    and per arm the rank where returns flatten (FLAT_RULE)."""
    problem = repeats_problem(summary)
    if problem:
        return f"No rank-returns chart: {problem}."
    rows, note = quality_rows(summary, "ppl_after")
    t = ppl_ci_table(summary)
    series = dict(zip(rows["config"], config_labels(rows, exclude=("lora_r",))))
    t["series"] = [series[c] for c in t.index]
    if t["lora_r"].nunique() < 2:
        return "No rank-returns chart: the sweep has one LoRA rank." + note
    paired = paired_rank_table(summary)
    arms = {name: {"table": g.sort_values("lora_r"), "paired": paired[paired["arm"] == name],
                   "flat": flattening_rank_paired(paired[paired["arm"] == name])}
            for name, g in t.groupby("series", sort=False)}
    return {"runs": rows, "note": note, "ranks": sorted(t["lora_r"].unique()), "arms": arms}


def rank_returns_figure(sel: dict) -> go.Figure:
    fig = go.Figure()
    for i, (name, arm) in enumerate(sel["arms"].items()):
        g, r_flat, color = arm["table"], arm["flat"], PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=g["lora_r"], y=g["ppl_after_mean"], mode="lines+markers", name=name,
                                 line=dict(color=color), error_y=dict(type="data", array=g["ppl_after_ci95"]),
                                 hovertemplate="r=%{x}<br>ppl_after %{y:.3f}<extra></extra>"))
        if not math.isnan(r_flat):
            y = g.loc[g["lora_r"] == r_flat, "ppl_after_mean"].iloc[0]
            fig.add_trace(go.Scatter(x=[r_flat], y=[y], mode="markers", showlegend=False,
                                     marker=dict(symbol="star", size=16, color=color, line=dict(color="black", width=1)),
                                     hovertemplate=f"{name}: returns flatten at r{r_flat:g}<extra></extra>"))
    fig.update_layout(title="Perplexity after training vs LoRA rank (★: where returns flatten, paired by seed)",
                      xaxis_title="lora_r", yaxis_title="ppl_after (mean, 95% interval)", xaxis_type="log",
                      xaxis=dict(tickvals=sel["ranks"]), height=450)
    return fig


def rank_returns_takeaway(sel: dict) -> str:
    parts = []
    for name, arm in sel["arms"].items():
        p, r_flat = arm["paired"], arm["flat"]
        words = f"{name} r{r_flat:g} (best r{p['best_r'].iloc[0]:g}"
        below = p[p["lora_r"] < r_flat]
        if len(below):
            worst = below.iloc[-1]  # the next rank down: the one the rule turned away
            words += (f"; r{worst['lora_r']:g} {worst['mean_pct']:+.2f}% "
                      f"[{worst['lo_pct']:+.2f}, {worst['hi_pct']:+.2f}], worse in {worst['worse']} of "
                      f"{worst['worse'] + worst['better']} seeds")
        parts.append(words + ")")
    line = f"Rule: {FLAT_RULE}. " + "; ".join(parts)
    return line + "." + sel["note"] + q4_1_note(sel["runs"])


def rank_returns(summary: pd.DataFrame):
    """Mean ppl_after (95% interval across seeds) against LoRA rank, one line per quantization (and any other
    varying key), with the rank where returns flatten marked (FLAT_RULE: paired by seed against the arm's best)."""
    return drawn(rank_returns_rows(summary), rank_returns_figure, rank_returns_takeaway)


# --- cost against quality, with intervals ---------------------------------------------------------------------------

MEMORY_COLS = (("peak_process_est_gib", "peak process memory, estimated, GiB"),
               ("peak_nvml_process_used_gib", "peak process memory (NVML), GiB"),
               ("peak_reserved_gib", "peak reserved (torch), GiB"), ("peak_rss_gib", "peak resident memory, GiB"))


def frontier_rows(summary: pd.DataFrame):
    """The per-configuration table, this sweep's median costs per configuration (side-by-side runs have no time or
    NVML figure of their own), the axes (time where every configuration has it; the widest memory measure every
    configuration has) and each axis's Pareto front on the means."""
    problem = repeats_problem(summary)
    if problem:
        return f"No cost-quality frontier with intervals: {problem}."
    rows, note = quality_rows(summary, "ppl_after")
    t = ppl_ci_table(summary)
    costs = rows.copy()
    costs.loc[side_by_side(costs), ["train_s", "peak_process_est_gib", "peak_nvml_process_used_gib"]] = math.nan
    cost = costs.groupby("config", sort=False)[["train_s"] + [c for c, _ in MEMORY_COLS]].median().reindex(t.index)
    mem = next(((c, label) for c, label in MEMORY_COLS if cost[c].notna().all()), None)
    time_axis = [("train_s", "training time, s")] if cost["train_s"].notna().all() else []
    axes = time_axis + ([mem] if mem else [])
    if not axes:
        return ("No cost-quality frontier: no cost measure covers every configuration (runs side by side have "
                "no training time of their own)." + side_by_side_note(rows))
    fronts = {col: pareto_front(cost.loc[cost[col].notna(), col], t.loc[cost[col].notna(), "ppl_after_mean"])
              for col, _ in axes}
    return {"runs": rows, "note": note, "table": t, "cost": cost, "axes": axes, "memory": mem, "fronts": fronts}


def frontier_figure(sel: dict) -> go.Figure:
    t, cost, axes = sel["table"], sel["cost"], sel["axes"]
    fig = make_subplots(rows=1, cols=len(axes), shared_yaxes=True, subplot_titles=[a[1] for a in axes])
    for i, (col, label) in enumerate(axes, start=1):
        ok = cost[col].notna()
        x, y = cost.loc[ok, col], t.loc[ok, "ppl_after_mean"]
        front = sel["fronts"][col]
        text, where = point_labels(list(x.index), front)
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers+text", text=text, textposition=where,
                                 customdata=list(x.index), cliponaxis=False,
                                 error_y=dict(type="data", array=t.loc[ok, "ppl_after_ci95"]),
                                 marker=dict(size=10, color="#1f77b4"), name="configuration", showlegend=i == 1,
                                 hovertemplate="%{customdata}<br>%{x:.2f}<br>ppl_after %{y:.3f}<extra></extra>"),
                      row=1, col=i)
        fig.add_trace(go.Scatter(x=x[front], y=y[front], mode="lines", line=dict(color="#d62728", dash="dash"),
                                 name="Pareto front (labelled)", showlegend=i == 1, hoverinfo="skip"), row=1, col=i)
        fig.update_xaxes(title_text=col, row=1, col=i)
    fig.update_yaxes(title_text="ppl_after (mean, 95% interval)", row=1, col=1)
    fig.update_layout(title="Cost vs quality across seeds (down-left is better; hover a point for its configuration)",
                      height=480)
    return fig


def frontier_takeaway(sel: dict) -> str:
    t, cost, mem, rows = sel["table"], sel["cost"], sel["memory"], sel["runs"]

    def describe(col, unit):
        f = sel["fronts"][col]
        s = f"{f[0]} is cheapest ({cost.loc[f[0], col]:.2f}{unit}, ppl {ci_words(t.loc[f[0], 'ppl_after_mean'], t.loc[f[0], 'ppl_after_ci95'])})"
        if len(f) > 1:
            s += (f", {f[-1]} best ({cost.loc[f[-1], col]:.2f}{unit}, ppl "
                  f"{ci_words(t.loc[f[-1], 'ppl_after_mean'], t.loc[f[-1], 'ppl_after_ci95'])})")
        return s + f", {len(f)} of {len(t)} configurations on the front"
    parts = ["time front: " + describe("train_s", " s") if "train_s" in sel["fronts"] else
             "no time front (runs side by side have no training time of their own)"]
    parts.append(f"memory front ({mem[0]}): " + describe(mem[0], " GiB") if mem else
                 "no memory measure covers every configuration")
    line = "; ".join(parts)
    line = line[0].upper() + line[1:]
    return line + "." + sel["note"] + q4_1_note(rows) + side_by_side_note(rows) + machines_note(own_costs(rows))


def cost_quality_frontier(summary: pd.DataFrame):
    """Mean ppl_after (95% interval) against this sweep's own median training time and peak memory per
    configuration; the dashed line is the Pareto front on the means (no other configuration is both cheaper and
    better). The memory measure is the widest one every configuration has (process estimate, NVML, reserved;
    resident memory on a CPU)."""
    return drawn(frontier_rows(summary), frontier_figure, frontier_takeaway)
