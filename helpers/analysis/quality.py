"""Quality charts of one sweep (notebook 02: perplexity against rank, loss curves, held-out curves, cost against
quality). Each chart is `<chart>_rows`, `<chart>_figure` and `<chart>_takeaway`, joined by `<chart>(...)`.
Synthetic runs (random weights) are left out of every quality figure, and the charts say how many.
"""
import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from helpers.records.registry import QUANT_ORDER
from helpers.analysis.load import config_labels, quant_rank
from helpers.analysis.rows import (PALETTE, budget_label, by_config, drawn, machines_note, own_costs, pareto_front, q4_1_note,
                   quality_rows, quants_in, side_by_side_note)


# --- perplexity before and after training, against LoRA rank ------------------------------------------------------

def rank_rows(summary: pd.DataFrame):
    """Finished real-weight runs with a ppl_after, and per series (the config label without the rank) the median
    ppl_before and ppl_after per rank."""
    rows, note = quality_rows(summary, "ppl_after")
    if rows.empty:
        why = "every finished run is synthetic" if note else "no finished run has a perplexity"
        return f"No perplexity chart: {why}.{note}"
    rows = rows.assign(series=config_labels(rows, exclude=("lora_r",)).values,
                       lora_r=pd.to_numeric(rows["lora_r"], errors="coerce"))
    series = {name: g.groupby("lora_r")[["ppl_before", "ppl_after"]].median().sort_index()
              for name, g in rows.groupby("series", sort=False)}
    return {"runs": rows, "series": series, "note": note}


def rank_figure(sel: dict) -> go.Figure:
    fig = go.Figure()
    for i, (series, med) in enumerate(sel["series"].items()):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=med.index, y=med["ppl_after"], mode="lines+markers", name=f"{series} after",
                                 line=dict(color=color), hovertemplate="r=%{x}<br>ppl_after %{y:.3f}"))
        fig.add_trace(go.Scatter(x=med.index, y=med["ppl_before"], mode="lines+markers", name=f"{series} before",
                                 line=dict(color=color, dash="dot"), marker_symbol="circle-open",
                                 hovertemplate="r=%{x}<br>ppl_before %{y:.3f}"))
    fig.update_layout(title="Held-out perplexity vs LoRA rank (lower is better)", xaxis_title="lora_r",
                      yaxis_title="perplexity", xaxis_type="log", height=450,
                      xaxis=dict(tickvals=sorted(sel["runs"]["lora_r"].dropna().unique())))
    return fig


def rank_takeaway(sel: dict) -> str:
    best = None
    for series, med in sel["series"].items():
        r = med["ppl_after"].idxmin()
        if best is None or med.loc[r, "ppl_after"] < best[2]:
            best = (series, r, med.loc[r, "ppl_after"], med.loc[r, "ppl_before"])
    series, r, after, before = best
    line = f"Lowest perplexity after training: {series} at r{r:g}, {after:.3f} (before {before:.3f}, {100 * (1 - after / before):.1f}% lower)"
    # quantization cost at equal rank: each quant's ppl_after minus the 16-bit arm's
    q = sel["runs"].groupby(["quant", "lora_r"])["ppl_after"].median()
    if "none" in q.index.get_level_values(0):
        gaps = []
        for quant in [x for x in QUANT_ORDER if x != "none" and x in q.index.get_level_values(0)]:
            shared = q["none"].index.intersection(q[quant].index)
            if len(shared):
                gaps.append(f"{quant} {float((q[quant][shared] - q['none'][shared]).mean()):+.3f}")
        if gaps:
            line += f"; vs 16-bit at equal rank: {', '.join(gaps)}"
    return line + "." + sel["note"] + q4_1_note(sel["runs"])


def perplexity_vs_rank(summary: pd.DataFrame):
    """Held-out perplexity before (dotted) and after (solid) training against LoRA rank, one colour per quant."""
    return drawn(rank_rows(summary), rank_figure, rank_takeaway)


# --- training loss per step -------------------------------------------------------------------------------------

def loss_rows(history: pd.DataFrame):
    """The logged losses of real-weight runs, one entry per run (name, quant, group, steps, whether finished) and
    the groups the chart averages (configuration, and budget where the sweep has several)."""
    if history.empty or "loss" not in history.columns or history["loss"].isna().all():
        return "No loss curves: no run logged a training loss."
    h = history[history["loss"].notna()]
    synthetic = h.loc[h["synthetic"].astype(bool), "run_id"].nunique() if "synthetic" in h.columns else 0
    if synthetic:
        h = h[~h["synthetic"].astype(bool)]
    note = f" {synthetic} synthetic run(s) left out: random weights on random tokens." if synthetic else ""
    if h.empty:
        return f"No loss curves: every run that logged a loss is synthetic.{note}"
    finished_ids = h["run_id"][h["status"] == "ok"] if "status" in h.columns else h["run_id"]
    judged = set(finished_ids) or set(h["run_id"])  # the takeaway compares finished runs: a failed one stopped early
    many_seeds = "seed" in h.columns and h["seed"].nunique() > 1
    many_budgets = "vram_budget_gib" in h.columns and h["vram_budget_gib"].nunique() > 1
    runs = []
    for run_id, g in h.groupby("run_id", sort=False):
        g = g.sort_values("step")
        group = str(g["config"].iloc[0])
        group += f" · {budget_label(float(g['vram_budget_gib'].iloc[0]))}" if many_budgets else ""
        name = str(g["config"].iloc[0]) + (f" · seed {g['seed'].iloc[0]}" if many_seeds else "")
        name += f" · {budget_label(float(g['vram_budget_gib'].iloc[0]))}" if many_budgets else ""
        status = g["status"].iloc[0] if "status" in g.columns else "ok"
        if status != "ok":
            name += f" ({status})"
        rank = pd.to_numeric(g["lora_r"], errors="coerce").iloc[0] if "lora_r" in g.columns else math.nan
        runs.append({"run_id": run_id, "name": name, "group": group, "quant": str(g["quant"].iloc[0]),
                     "lora_r": math.inf if pd.isna(rank) else float(rank), "steps": g[["step", "loss"]],
                     "judged": run_id in judged})
    return {"runs": runs, "note": note}


def loss_bands(sel: dict) -> list[dict]:
    """Per group (configuration): its quant, and per step the mean, lowest and highest loss over the group's judged
    runs (finished ones; all its runs where none finished), with how many runs that is."""
    groups = {}
    for r in sorted(sel["runs"], key=lambda r: (quant_rank(r["quant"]), r["lora_r"], r["group"])):
        groups.setdefault(r["group"], []).append(r)  # in reading order: 16-bit first, then by rank
    out = []
    for name, rs in groups.items():
        use = [r for r in rs if r["judged"]] or rs
        steps = pd.concat([r["steps"] for r in use]).groupby("step")["loss"]
        out.append({"group": name, "quant": use[0]["quant"], "n": len(use),
                    "mean": steps.mean(), "lo": steps.min(), "hi": steps.max()})
    return out


MANY_CURVES = 8  # more configurations than this: the loss chart opens on one quantization's


def loss_figure(sel: dict) -> go.Figure:
    """The mean loss per configuration with a band from its lowest to its highest run; single runs (seeds) hidden
    until picked. Two menus: one quantization's means, or the single runs (all, or one quantization's). Over
    MANY_CURVES configurations it opens on the first quantization's (the menu says which)."""
    fig, kinds, quants = go.Figure(), [], []
    for i, b in enumerate(loss_bands(sel)):
        color = PALETTE[i % len(PALETTE)]
        steps = list(b["mean"].index)
        if b["n"] > 1:
            fig.add_trace(go.Scatter(x=steps + steps[::-1], y=list(b["hi"]) + list(b["lo"])[::-1], fill="toself",
                                     fillcolor=color, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                     legendgroup=b["group"], showlegend=False, meta=b["quant"],
                                     name=f"{b['group']} (lowest to highest of {b['n']} runs)"))
            kinds.append("mean")
            quants.append(b["quant"])
        fig.add_trace(go.Scatter(x=steps, y=list(b["mean"]), mode="lines", line=dict(color=color, width=1.5),
                                 name=b["group"] + (f" (mean of {b['n']})" if b["n"] > 1 else ""),
                                 legendgroup=b["group"], meta=b["quant"],
                                 hovertemplate=f"{b['group']}<br>step %{{x}}<br>mean loss %{{y:.3f}}<extra></extra>"))
        kinds.append("mean")
        quants.append(b["quant"])
    for r in sel["runs"]:
        fig.add_trace(go.Scatter(x=r["steps"]["step"], y=r["steps"]["loss"], mode="lines+markers", name=r["name"],
                                 meta=r["quant"], visible=False, hovertemplate="step %{x}<br>loss %{y:.3f}"))
        kinds.append("run")
        quants.append(r["quant"])
    order = quants_in(quants)

    def show(kind, quant=None):
        return [{"visible": [k == kind and (quant is None or q == quant) for k, q in zip(kinds, quants)]}]
    means = [dict(label="all quantizations", method="restyle", args=show("mean"))]
    means += [dict(label=f"quant {q}", method="restyle", args=show("mean", q)) for q in order]
    singles = [dict(label="single runs: all", method="restyle", args=show("run"))]
    singles += [dict(label=f"single runs: quant {q}", method="restyle", args=show("run", q)) for q in order]
    start = 0  # a sweep of many configurations opens on its first quantization: 20 noisy curves at once are a tangle
    if sum(k == "mean" for k in kinds) > 2 * MANY_CURVES and len(order) > 1:
        start = 1
        for trace, visible in zip(fig.data, show("mean", order[0])[0]["visible"]):
            trace.visible = visible
    fig.update_layout(
        title="Training loss per step: mean per configuration, band from its lowest to its highest run",
        xaxis_title="step", yaxis_title="loss", height=520,
        updatemenus=[dict(buttons=means, active=start, direction="down", x=0.45, xanchor="left", y=1.13,
                          yanchor="top"),
                     dict(buttons=singles, direction="down", x=1.0, xanchor="right", y=1.13, yanchor="top",
                          active=-1, showactive=True)],
        annotations=[dict(text="means and bands:", x=0.45, xref="paper", xanchor="right", y=1.11, yref="paper",
                          showarrow=False),
                     dict(text="or single runs:", x=0.78, xref="paper", xanchor="right", y=1.11, yref="paper",
                          showarrow=False)])
    return fig


def loss_takeaway(sel: dict) -> str:
    drops = {}
    for r in sel["runs"]:
        g = r["steps"]
        k = min(3, max(1, len(g) // 3))  # average a few steps at each end: per-step loss is noisy
        if r["judged"]:
            drops[r["name"]] = (g["loss"].iloc[:k].mean(), g["loss"].iloc[-k:].mean(), int(g["step"].iloc[-1]))
    fell = {n: a - b for n, (a, b, _) in drops.items()}
    most = max(fell, key=fell.get)
    a, b, steps = drops[most]
    line = f"Loss fell most for {most}: {a:.3f} → {b:.3f} over {steps} steps"
    least = min(fell, key=fell.get)
    if least != most:
        a2, b2, _ = drops[least]
        line += f"; least for {least}: {a2:.3f} → {b2:.3f}"
    return line + " (mean of the first and last logged steps; finished runs)." + sel["note"]


def loss_curves(history: pd.DataFrame):
    """Training loss per step: the mean of each configuration's runs with a band from the lowest to the highest, and
    every single run behind a menu; a second menu picks one quantization (both work in the HTML report)."""
    return drawn(loss_rows(history), loss_figure, loss_takeaway)


# --- held-out perplexity during training --------------------------------------------------------------------------

SETTLED_SHARE, SETTLED_CHANGE = 0.25, 0.01  # settled: held-out ppl moved < 1% over the last quarter of training


def held_out_rows(history: pd.DataFrame):
    """Finished real-weight runs that scored during training: mean held-out ppl over seeds per configuration and
    step, and per configuration its relative change over the last quarter of the steps (change, from, to)."""
    if history.empty or "eval_ppl" not in history.columns or history["eval_ppl"].isna().all():
        return "No held-out curves: no run scored the eval blocks during training (eval_every 0)."
    h = history[history["eval_ppl"].notna()]
    if "synthetic" in h.columns:
        h = h[~h["synthetic"].astype(bool)]
    if "status" in h.columns:
        h = h[h["status"] == "ok"]
    if h.empty:
        return "No held-out curves: the runs that have them are synthetic or did not finish."
    mean = h.groupby(["config", "step"], sort=False)["eval_ppl"].mean().reset_index()
    curves, verdicts = {}, {}
    for config, g in mean.groupby("config", sort=False):
        g = g.sort_values("step")
        curves[config] = g
        last = g["step"].max()
        start = g[g["step"] <= last * (1 - SETTLED_SHARE)]
        if not start.empty:
            a, b = start["eval_ppl"].iloc[-1], g["eval_ppl"].iloc[-1]
            verdicts[config] = (b / a - 1, int(start["step"].iloc[-1]), int(last))
    return {"curves": curves, "verdicts": verdicts}


def held_out_figure(sel: dict) -> go.Figure:
    fig = go.Figure()
    for config, g in sel["curves"].items():
        fig.add_trace(go.Scatter(x=g["step"], y=g["eval_ppl"], mode="lines+markers", name=str(config),
                                 hovertemplate="step %{x}<br>held-out ppl %{y:.3f}"))
    fig.update_layout(title="Held-out perplexity during training (mean over seeds)", xaxis_title="step",
                      yaxis_title="held-out perplexity", height=480)
    return fig


def held_out_takeaway(sel: dict) -> str:
    verdicts = sel["verdicts"]
    if not verdicts:
        return "Too few points per run to judge settling (score at least twice, eval_every < max_steps)."
    moving = {c: v for c, v in verdicts.items() if abs(v[0]) >= SETTLED_CHANGE}
    worst = max(verdicts, key=lambda c: abs(verdicts[c][0]))
    w = verdicts[worst]
    line = (f"{len(verdicts) - len(moving)} of {len(verdicts)} configurations settled (held-out perplexity moved < "
            f"{100 * SETTLED_CHANGE:.0f}% over the last {100 * SETTLED_SHARE:.0f}% of steps); the most moving: {worst}, "
            f"{100 * w[0]:+.2f}% from step {w[1]} to {w[2]}")
    return line + "."


def held_out_curves(history: pd.DataFrame):
    """Held-out perplexity during training (runs with eval_every), mean over seeds per configuration, and whether
    it has settled: the relative change of that mean over the last quarter of the steps, against a 1% bound."""
    return drawn(held_out_rows(history), held_out_figure, held_out_takeaway)


# --- cost against quality -----------------------------------------------------------------------------------------

def point_labels(labels, front) -> tuple[list, list]:
    """(text, textposition) for a cost-quality panel: only the Pareto front is labelled on the chart, alternately
    above and below its points so that neighbours do not overlap; every point names itself on hover."""
    text = [label if label in front else "" for label in labels]
    where = {label: ("top right" if i % 2 == 0 else "bottom left") for i, label in enumerate(front)}
    return text, [where.get(label, "top center") for label in labels]


def cost_quality_rows(summary: pd.DataFrame):
    """Finished real-weight runs with their own training time; medians per configuration of time, energy and
    ppl_after; the cost axes (time, and energy where measured) and each axis's Pareto front."""
    rows, note = quality_rows(summary, "ppl_after")
    shared_note = side_by_side_note(rows)
    rows = own_costs(rows[rows["train_s"].notna()])
    if rows.empty:
        why = "every finished run is synthetic" if note else "no finished run has both a perplexity and a training time"
        why = "every run shared the device, so no training time or energy is a run's own" if shared_note else why
        return f"No cost-quality chart: {why}.{note}{shared_note}"
    med = by_config(rows, ["train_s", "energy_j", "ppl_after"])
    axes = [("train_s", "training time, s")]
    if med["energy_j"].notna().any():
        axes.append(("energy_j", "training energy, J"))
    fronts = {col: pareto_front(med.loc[med[col].notna(), col], med.loc[med[col].notna(), "ppl_after"])
              for col, _ in axes}
    return {"runs": rows, "medians": med, "axes": axes, "fronts": fronts, "note": note, "shared_note": shared_note}


def cost_quality_figure(sel: dict) -> go.Figure:
    med, axes = sel["medians"], sel["axes"]
    fig = make_subplots(rows=1, cols=len(axes), shared_yaxes=True, subplot_titles=[a[1] for a in axes])
    for i, (col, label) in enumerate(axes, start=1):
        m = med[med[col].notna()]
        front = sel["fronts"][col]
        text, where = point_labels(list(m.index), front)
        fig.add_trace(go.Scatter(x=m[col], y=m["ppl_after"], mode="markers+text", text=text, textposition=where,
                                 customdata=list(m.index), name="configuration", showlegend=i == 1,
                                 marker=dict(size=11, color="#1f77b4"), cliponaxis=False,
                                 hovertemplate="%{customdata}<br>%{x:.1f}<br>ppl_after %{y:.3f}<extra></extra>"),
                      row=1, col=i)
        fig.add_trace(go.Scatter(x=m.loc[front, col], y=m.loc[front, "ppl_after"], mode="lines",
                                 line=dict(color="#d62728", dash="dash"), name="Pareto front (labelled)",
                                 showlegend=i == 1, hoverinfo="skip"), row=1, col=i)
        lo, hi = m[col].min(), m[col].max()
        pad = 0.2 * (hi - lo) if hi > lo else 0.2 * abs(hi) or 1.0  # room for the point labels
        fig.update_xaxes(title_text=col, range=[lo - pad, hi + pad], row=1, col=i)
    lo, hi = med["ppl_after"].min(), med["ppl_after"].max()
    pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
    fig.update_yaxes(title_text="ppl_after", range=[lo - pad, hi + 1.5 * pad], row=1, col=1)
    fig.update_layout(title="Cost vs quality (down-left is better; hover a point for its configuration)", height=480)
    return fig


def cost_quality_takeaway(sel: dict) -> str:
    med, rows, note = sel["medians"], sel["runs"], sel["note"]
    front = sel["fronts"]["train_s"]
    if len(med) == 1:
        c = med.index[0]
        return (f"One configuration: {c} trained in {med.loc[c, 'train_s']:.0f} s to perplexity "
                f"{med.loc[c, 'ppl_after']:.3f}." + note + q4_1_note(rows))
    dominated = [c for c in med.index if c not in front]
    line = (f"Time–quality front: {front[0]} is fastest ({med.loc[front[0], 'train_s']:.0f} s, ppl {med.loc[front[0], 'ppl_after']:.3f})")
    if len(front) > 1:
        line += f", {front[-1]} is best ({med.loc[front[-1], 'train_s']:.0f} s, ppl {med.loc[front[-1], 'ppl_after']:.3f})"
    line += f"; {len(dominated)} of {len(med)} configurations are beaten on both"
    if "energy_j" in sel["fronts"]:
        line += f"; energy front: {', '.join(sel['fronts']['energy_j'])}"
    return line + "." + note + q4_1_note(rows) + sel["shared_note"] + machines_note(rows)


def cost_quality(summary: pd.DataFrame):
    """Perplexity after training against training time, and against energy where it was measured.
    The line joins the Pareto front: configurations no other one beats on both cost and quality."""
    return drawn(cost_quality_rows(summary), cost_quality_figure, cost_quality_takeaway)

