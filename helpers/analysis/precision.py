"""Quantization apart from precision (notebook 02; parameters/precision.yaml joined with reports/quality): the 2 x 2
of quant (none, nf4) and whether norms, embeddings and head train in float32, and NF4 over 16-bit perplexity with
precision matched both ways. The chart is `precision_rows`, `precision_figure` and `precision_takeaway`.
"""
import math

import pandas as pd
import plotly.graph_objects as go

from helpers.records.registry import upcasts_to_fp32
from helpers.analysis.rows import drawn, q4_1_note, quality_rows
from helpers.analysis.stats import paired_differences, paired_summary

# The 2 x 2 cells: (quant, whether norms, embeddings and head train in float32: registry.upcasts_to_fp32)
PRECISION_CELLS = {("none", False): "16-bit", ("none", True): "16-bit + fp32 upcast",
                   ("nf4", True): "NF4 (upcast, as QLoRA)", ("nf4", False): "NF4 + keep_16bit"}
# (name, numerator cell, denominator cell): ppl_after of one over the other, paired by rank and seed
PRECISION_RATIOS = (
    ("quantization, precision matched: both upcast", ("nf4", True), ("none", True)),
    ("quantization, precision matched: neither upcast", ("nf4", False), ("none", False)),
    ("quantization and precision mixed (as the quality study compared)", ("nf4", True), ("none", False)),
    ("precision alone, 16-bit base: upcast / not", ("none", True), ("none", False)),
    ("precision alone, NF4 base: upcast / not", ("nf4", True), ("nf4", False)),
)


def precision_cells(rows: pd.DataFrame) -> pd.Series:
    """Each row's 2 x 2 cell (quant, upcast), or None for a quant outside the design."""
    def cell(r):
        q = r.get("quant")
        if q not in ("none", "nf4"):
            return None
        return (q, upcasts_to_fp32(q, bool(r.get("keep_16bit") or False), bool(r.get("fp32_upcast") or False)))
    return pd.Series([cell(r) for r in rows.to_dict("records")], index=rows.index, dtype=object)


def precision_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The PRECISION_RATIOS of ppl_after, paired by rank and seed (runs alike in every other config key): per
    comparison, the ratio's mean with its 95% t interval over seeds (a seed's ranks averaged first: they share the
    batch order), n_seeds, n_pairs, how many pairs the numerator is worse / better in, and the mean ratio per rank.
    Rows with no pairs are left out."""
    rows, _ = quality_rows(summary, "ppl_after")
    cols = ["comparison", "n_seeds", "n_pairs", "ratio", "ci95", "lo", "hi", "worse", "better", "by_rank"]
    if rows.empty:
        return pd.DataFrame(columns=cols).set_index("comparison")
    cells = precision_cells(rows)
    out = []
    for name, num, den in PRECISION_RATIOS:
        pairs = paired_differences(rows, "ppl_after", cells == num, cells == den,
                                   key_exclude=("quant", "keep_16bit", "fp32_upcast"))
        if pairs.empty:
            continue
        s = paired_summary(pairs)
        rank = pairs["pair"].str.extract(r"\br(\d+)\b")[0]
        by_rank = (1 + pairs.groupby(rank)["pct"].mean() / 100).sort_index(key=lambda x: x.astype(int))
        out.append({"comparison": name, "n_seeds": s["n_seeds"], "n_pairs": s["n_pairs"],
                    "ratio": 1 + s["mean_pct"] / 100, "ci95": s["ci95_pct"] / 100,
                    "lo": 1 + s["lo_pct"] / 100, "hi": 1 + s["hi_pct"] / 100, "worse": s["worse"],
                    "better": s["better"], "by_rank": ", ".join(f"r{r} {v:.4f}x" for r, v in by_rank.items())})
    return pd.DataFrame(out, columns=cols).set_index("comparison")


def precision_rows(summary: pd.DataFrame):
    """The precision table, and which of the two precision-matched comparisons it has (or why it has none)."""
    rows, note = quality_rows(summary, "ppl_after")
    t = precision_table(summary)
    matched = [n for n, *_ in PRECISION_RATIOS[:2] if n in t.index]
    if not matched:
        have = sorted({PRECISION_CELLS[c] for c in precision_cells(rows).dropna()}) if not rows.empty else []
        return ("No precision-matched ratio: it needs NF4 and 16-bit runs of the same upcast (cells "
                f"{list(PRECISION_CELLS.values())}; this summary has {have or 'none'}): run "
                "parameters/precision.yaml and load it with reports/quality (analysis.load_sweeps)." + note)
    return {"runs": rows, "note": note, "table": t, "matched": matched,
            "rest": [n for n, *_ in PRECISION_RATIOS[2:] if n in t.index]}


def precision_figure(sel: dict) -> go.Figure:
    t = sel["table"]
    fig = go.Figure(go.Scatter(x=t["ratio"], y=t.index, mode="markers", marker=dict(size=11, color="#1f77b4"),
                               error_x=dict(type="data", array=t["ci95"], visible=True),
                               customdata=t[["n_pairs", "by_rank"]].values,
                               hovertemplate="%{y}<br>%{x:.4f}x (%{customdata[0]} pairs)<br>%{customdata[1]}"
                                             "<extra></extra>"))
    fig.add_vline(x=1.0, line_dash="dash", line_color="gray")
    fig.update_layout(title="Perplexity after training: NF4 over 16-bit with precision matched (paired, 95% CI)",
                      xaxis_title="ppl_after ratio", yaxis_autorange="reversed", height=380)
    return fig


def precision_takeaway(sel: dict) -> str:
    t = sel["table"]

    def words(name):
        r = t.loc[name]
        ci = "one seed, no interval" if math.isnan(r["ci95"]) else f"95% CI {r['lo']:.4f}–{r['hi']:.4f}"
        return f"{r['ratio']:.4f}x ({ci}; worse in {r['worse']} of {r['n_pairs']} pairs; {r['by_rank']})"
    line = "NF4 / 16-bit with precision matched: " + "; ".join(f"{n.split(': ')[1]} {words(n)}" for n in sel["matched"])
    if sel["rest"]:
        line += ". Beside it: " + "; ".join(f"{n} {words(n)}" for n in sel["rest"])
    return line + "." + sel["note"] + q4_1_note(sel["runs"])


def precision_matched(summary: pd.DataFrame):
    """NF4 over 16-bit perplexity after training with precision matched both ways (both arms upcast, neither
    upcast), beside the mixed comparison and precision's own effect; paired by rank and seed, 95% intervals. Needs
    the 2 x 2 cells, which parameters/precision.yaml adds to reports/quality (load_sweeps of both folders)."""
    return drawn(precision_rows(summary), precision_figure, precision_takeaway)
