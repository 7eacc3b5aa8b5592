"""Cost charts (notebook 02: feasibility, peak memory, throughput, energy): what a configuration needs and what it
costs. Each chart is `<chart>_rows` (the rows it draws, or why there are none), `<chart>_figure` and
`<chart>_takeaway` (the English line, from the same rows); `<chart>(summary)` returns (figure, takeaway).
Only finished runs are measured; runs side by side on one device have no time, speed or energy of their own.
"""
import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from helpers.analysis.rows import (budget_label, by_config, device_words, drawn, extremes_words, finished, machines_note, on_cpu_only,
                   own_costs, sharded_note, side_by_side, side_by_side_note, vs_16bit_words)

STATUS_CODE = {"ok": 0, "oom": 1, "error": 2}
STATUS_COLOR = {"ok": "#2ca02c", "oom": "#d62728", "error": "#7f7f7f"}


# --- feasibility: configuration x VRAM budget ------------------------------------------------------------------

def feasibility_rows(summary: pd.DataFrame):
    """The runs with a readable outcome, their budgets (uncapped last) and configurations, in reading order."""
    df = summary[summary["status"].isin(list(STATUS_CODE))]
    if df.empty:
        return "No feasibility matrix: no run in this sweep has a readable sidecar."
    return {"runs": df, "budgets": sorted(df["vram_budget_gib"].unique(), key=lambda b: math.inf if b == 0 else b),
            "configs": list(dict.fromkeys(df["config"]))}


def feasibility_cells(sel: dict) -> list[list[tuple]]:
    """Per configuration and budget: (status code, cell text, hover text) of the worst outcome over repeats, or
    (None, '', 'not run')."""
    df, grid = sel["runs"], []
    for c in sel["configs"]:
        row = []
        for b in sel["budgets"]:
            cell = df[(df["config"] == c) & (df["vram_budget_gib"] == b)]
            if cell.empty:
                row.append((None, "", "not run"))
                continue
            worst = max(cell["status"], key=STATUS_CODE.get)
            n_ok = int((cell["status"] == "ok").sum())
            err = next((str(e) for e in cell["error"] if isinstance(e, str) and e), "")
            row.append((STATUS_CODE[worst], worst if len(cell) == 1 else f"{worst} ({n_ok}/{len(cell)} ok)",
                        f"{worst}: {err[:120]}" if err else worst))
        grid.append(row)
    return grid


def feasibility_figure(sel: dict) -> go.Figure:
    cells = feasibility_cells(sel)
    z, text, hover = ([[c[i] for c in row] for row in cells] for i in range(3))
    colorscale = [[0, STATUS_COLOR["ok"]], [1 / 3, STATUS_COLOR["ok"]], [1 / 3, STATUS_COLOR["oom"]],
                  [2 / 3, STATUS_COLOR["oom"]], [2 / 3, STATUS_COLOR["error"]], [1, STATUS_COLOR["error"]]]
    fig = go.Figure(go.Heatmap(
        z=z, x=[budget_label(b) for b in sel["budgets"]], y=sel["configs"], text=text, customdata=hover,
        texttemplate="%{text}", hovertemplate="%{y} at %{x}<br>%{customdata}<extra></extra>",
        zmin=-0.5, zmax=2.5, colorscale=colorscale, showscale=False, xgap=3, ygap=3))
    fig.update_layout(title="Feasibility: did the configuration train within the memory budget?",
                      xaxis_title="vram_budget_gib (torch allocator cap)", yaxis_title="configuration",
                      yaxis_autorange="reversed", height=max(260, 60 + 45 * len(sel["configs"])))
    return fig


def feasibility_takeaway(sel: dict) -> str:
    df, budgets, configs = sel["runs"], sel["budgets"], sel["configs"]
    counts = df["status"].value_counts()
    line = (f"{counts.get('ok', 0)} of {len(df)} runs trained, {counts.get('oom', 0)} ran out of memory, "
            f"{counts.get('error', 0)} failed with another error")
    capped = [b for b in budgets if b > 0]
    if capped:
        smallest = capped[0]
        at = df[df["vram_budget_gib"] == smallest]
        fit = [c for c in configs if ((at["config"] == c) & (at["status"] == "ok")).any()]
        line += f"; at the smallest budget ({smallest:g} GiB) {len(fit)} of {at['config'].nunique()} configurations fit"
        line += f" ({', '.join(fit)})" if fit and len(fit) < at["config"].nunique() else ""
        all_fit = [b for b in capped if set(df.loc[df["vram_budget_gib"] == b, "config"]) <= set(
            df.loc[(df["vram_budget_gib"] == b) & (df["status"] == "ok"), "config"])]
        if all_fit and all_fit[0] != smallest:
            line += f"; all fit from {all_fit[0]:g} GiB"
    return line + "."


def feasibility_matrix(summary: pd.DataFrame):
    """Configuration x VRAM budget, each cell ok / oom / error (the worst over repeats)."""
    return drawn(feasibility_rows(summary), feasibility_figure, feasibility_takeaway)


# --- peak memory ------------------------------------------------------------------------------------------------

# NVML has no peak counter (step-end readings can miss the peak); the estimate is torch's exact reserved peak plus
# the largest non-torch memory NVML saw (CUDA context, cuBLAS, bitsandbytes' paged memory)
GPU_MEMORY = (("peak_allocated_gib", "peak allocated (torch)"), ("peak_reserved_gib", "peak reserved (torch)"),
              ("peak_nvml_process_used_gib", "peak process used (NVML, step ends)"),
              ("peak_process_est_gib", "peak process, estimated (reserved + non-torch)"))
CPU_MEMORY = ("peak_rss_gib", "peak resident memory (process, CPU)")


def memory_rows(summary: pd.DataFrame):
    """Finished runs (NVML's readings blanked for runs side by side: they can hold the others' memory), the memory
    measures they have (torch and NVML on a GPU, resident memory on a CPU), and their medians per configuration."""
    ok = finished(summary).copy()
    if ok.empty:
        return "No memory chart: no run in this sweep finished."
    ok.loc[side_by_side(ok), ["peak_nvml_process_used_gib", "peak_process_est_gib"]] = math.nan
    measures = [m for m in GPU_MEMORY if ok[m[0]].notna().any()]
    if not measures:
        measures = [CPU_MEMORY] if ok["peak_rss_gib"].notna().any() else []
    if not measures:
        return "No memory chart: the finished runs recorded no memory peaks."
    bars = ([("weights_gib", "weights after load")] if ok["weights_gib"].notna().any() else []) + measures
    return {"runs": ok, "measures": measures, "bars": bars, "medians": by_config(ok, [m[0] for m in bars])}


def memory_figure(sel: dict) -> go.Figure:
    med = sel["medians"]
    fig = go.Figure([go.Bar(name=label, x=med.index, y=med[col], hovertemplate="%{x}<br>%{y:.2f} GiB")
                     for col, label in sel["bars"]])
    fig.update_layout(barmode="group", title="Memory by configuration (median over repeats)",
                      yaxis_title="GiB", xaxis_title="configuration", legend_title="measure", height=450)
    return fig


def memory_takeaway(sel: dict) -> str:
    """The measure it speaks of: the widest one (process estimate, NVML, reserved; RSS on a CPU) among those that
    cover the most configurations, so a few sidecars with a newer metric do not decide it alone."""
    med, measures = sel["medians"], sel["measures"]
    cover = {c: int(med[c].notna().sum()) for c, _ in measures}
    col, label = [m for m in measures if cover[m[0]] == max(cover.values())][-1]
    v = med[col].dropna()
    line = extremes_words(v, lambda c: f"{c} peaks at {v[c]:.2f} GiB ({label})",
                          lambda lo, hi: (f"{lo} needs the least memory: {v[lo]:.2f} GiB {label}, "
                                          f"{100 * (1 - v[lo] / v[hi]):.0f}% below {hi} ({v[hi]:.2f} GiB)"))
    line += vs_16bit_words(sel["runs"], col, lambda r: f"{100 * (r - 1):+.0f}%")
    return line + "." + side_by_side_note(sel["runs"]) + sharded_note(sel["runs"])


def peak_memory(summary: pd.DataFrame):
    """Weights after load and peak memory per configuration: torch allocated / reserved and NVML on a GPU;
    peak resident memory of the process on a CPU."""
    return drawn(memory_rows(summary), memory_figure, memory_takeaway)


# --- throughput and wall-clock ------------------------------------------------------------------------------------

PHASES = (("load_s", "load"), ("eval_before_s", "eval before"), ("train_s", "train"), ("eval_after_s", "eval after"))


def throughput_rows(summary: pd.DataFrame):
    """Finished runs that had the device to themselves, the phases they timed, and their medians per configuration."""
    ok = finished(summary)
    if ok.empty or ok["tokens_per_s"].isna().all():
        return "No throughput chart: no finished run recorded its speed."
    shared_note = side_by_side_note(ok)
    ok = own_costs(ok)
    if ok.empty:
        return "No throughput chart: every finished run shared the device, so no speed is a run's own." + shared_note
    phases = [p for p in PHASES if ok[p[0]].notna().any()]
    return {"runs": ok, "phases": phases, "medians": by_config(ok, ["tokens_per_s"] + [p[0] for p in phases]),
            "note": shared_note}


def throughput_figure(sel: dict) -> go.Figure:
    med = sel["medians"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("steady-state tokens/s (higher is better)",
                                                        "wall-clock by phase, s (lower is better)"))
    fig.add_trace(go.Bar(x=med.index, y=med["tokens_per_s"], name="tokens_per_s", showlegend=False,
                         marker_color="#1f77b4", hovertemplate="%{x}<br>%{y:.1f} tokens/s"), row=1, col=1)
    for col, label in sel["phases"]:
        fig.add_trace(go.Bar(x=med.index, y=med[col], name=label, hovertemplate="%{x}<br>%{y:.1f} s"), row=1, col=2)
    fig.update_layout(barmode="stack", title="Throughput and wall-clock (median over repeats)", height=450,
                      legend_title="phase")
    fig.update_yaxes(title_text="tokens_per_s", row=1, col=1)
    fig.update_yaxes(title_text="s", row=1, col=2)
    return fig


def throughput_takeaway(sel: dict) -> str:
    ok, med = sel["runs"], sel["medians"]
    tps = med["tokens_per_s"].dropna()
    fast, slow = tps.idxmax(), tps.idxmin()
    line = extremes_words(tps, lambda c: f"{c} trains at {tps[c]:.1f} tokens/s",
                          lambda slow, fast: (f"{fast} is fastest at {tps[fast]:.1f} tokens/s, "
                                              f"{tps[fast] / tps[slow]:.2f}x {slow} ({tps[slow]:.1f} tokens/s)"))
    window = by_config(ok, ["tokens_per_s_window"])["tokens_per_s_window"].reindex(tps.index) \
        if ok["tokens_per_s_window"].notna().any() else None
    if window is not None and window.notna().all():  # runs recorded before the window was: not shown
        line += (f" (over the whole window, between-step work included: {window[fast]:.1f}"
                 + (f" and {window[slow]:.1f}" if fast != slow else "") + " tokens/s)")
    line += vs_16bit_words(ok, "tokens_per_s", lambda r: f"{r:.2f}x", what="speed ")
    if "train_s" in med.columns and med["train_s"].notna().any():
        t = med["train_s"].dropna()
        line += f"; training took {t.min():.0f}–{t.max():.0f} s" if len(t) > 1 else f"; training took {t.iloc[0]:.0f} s"
    return line + "." + sel["note"] + sharded_note(ok) + machines_note(ok)


def throughput(summary: pd.DataFrame):
    """Steady-state tokens/s, and wall-clock per phase (load, eval before, train, eval after), of the runs that had
    the device to themselves; ratios only between runs of one machine."""
    return drawn(throughput_rows(summary), throughput_figure, throughput_takeaway)


# --- energy ---------------------------------------------------------------------------------------------------------

def energy_rows(summary: pd.DataFrame):
    """Finished runs with their own energy figure, their medians per configuration and the energy sources."""
    ok = finished(summary)
    if ok.empty:
        return "No energy chart: no run in this sweep finished."
    shared_note = side_by_side_note(ok)
    rows = own_costs(ok[ok["energy_j_per_1k_tokens"].notna()])
    if rows.empty and shared_note:
        return "No energy chart: every run shared the device, whose energy counter is not one run's." + shared_note
    if rows.empty:
        if on_cpu_only(ok):
            return "No energy chart: this sweep ran on a CPU, which has no energy counter (energy is absent, not zero)."
        return f"No energy chart: the device ({device_words(ok)}) reported neither an energy counter nor power samples."
    return {"runs": rows, "note": shared_note, "without": len(own_costs(ok)) - len(rows),
            "medians": by_config(rows, ["energy_j_per_1k_tokens"])["energy_j_per_1k_tokens"],
            "sources": sorted({str(s) for s in rows.get("energy_source", pd.Series(dtype=object)).dropna()})}


def energy_figure(sel: dict) -> go.Figure:
    med = sel["medians"]
    fig = go.Figure(go.Bar(x=med.index, y=med.values, marker_color="#9467bd",
                           hovertemplate="%{x}<br>%{y:.1f} J per 1k tokens<extra></extra>"))
    fig.update_layout(title=f"Energy per 1k training tokens (source: {', '.join(sel['sources']) or 'unknown'})",
                      xaxis_title="configuration", yaxis_title="energy_j_per_1k_tokens", height=420)
    return fig


def energy_takeaway(sel: dict) -> str:
    med = sel["medians"]
    line = extremes_words(med, lambda c: f"{c} uses {med[c]:.1f} J per 1k tokens",
                          lambda lo, hi: (f"{lo} uses the least energy: {med[lo]:.1f} J per 1k tokens, "
                                          f"{med[hi] / med[lo]:.2f}x less than {hi} ({med[hi]:.1f} J)"))
    line += vs_16bit_words(sel["runs"], "energy_j_per_1k_tokens", lambda r: f"{r:.2f}x")
    if "nvml_power_sampled" in sel["sources"]:
        line += "; some runs' energy is sampled power x step time, not the counter"
    if sel["without"]:
        line += f"; {sel['without']} finished run(s) have no energy figure"
    return line + "." + sel["note"] + sharded_note(sel["runs"]) + machines_note(sel["runs"])


def energy_per_token(summary: pd.DataFrame):
    """Training energy per 1k tokens (J), where the GPU reported it; absent, not zero, elsewhere."""
    return drawn(energy_rows(summary), energy_figure, energy_takeaway)
