"""Charts and controls of notebooks/03_will_it_fit.ipynb: drawing only (the numbers come from helpers.fit, the
sentences from the notebook's cells).

    breakdown_figure   one prediction as a stacked bar of its parts against the card's size
    compare_figure     predicted against measured peaks over every committed GPU run
    explorer           ipywidgets controls (model, card, quant, rank, batch, seq_len, checkpointing, levers) that
                       redraw breakdown_figure; needs a live kernel (JupyterLab)
"""
import pandas as pd
import plotly.graph_objects as go

from helpers import fit
from helpers.records import registry

VERDICT_COLOURS = {"fits": "#2ca02c", "tight": "#ff7f0e", "does not fit": "#d62728"}
PART_COLOURS = ("#4c78a8", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#f58518", "#e45756", "#bab0ac", "#9d755d")


def breakdown_figure(pred: dict, card_gib: float = 0, title: str = "") -> go.Figure:
    """A stacked bar of pred's parts (helpers.fit.BREAKDOWN order), the whole process on top, a line at the card's
    size and one at what the run needs on it (helpers.fit.card_verdict; green fits, orange tight, red does not): the
    bar's top is the uncapped peak, which may pass the card when the allocator would free its cache under the cap."""
    fig = go.Figure()
    for (key, label), colour in zip(fit.BREAKDOWN, PART_COLOURS):
        fig.add_bar(x=["predicted peak"], y=[pred[key]], name=label, marker_color=colour,
                    hovertemplate=f"{label}: %{{y:.2f}} GiB<extra></extra>")
    if card_gib:  # the card, and what the run needs on it (card_verdict): the line the verdict compares, drawn
        v = fit.card_verdict(pred, card_gib)
        fig.add_hline(y=card_gib, line_dash="dash", line_color="black",
                      annotation_text=f"card: {card_gib:g} GiB", annotation_position="top left")
        fig.add_hline(y=v["needs_gib"], line_width=3, line_color=VERDICT_COLOURS[v["verdict"]],
                      annotation_text=f"needs {v['needs_gib']:.2f} GiB: {v['verdict']}",
                      annotation_position="bottom right")
    top = max(pred["peak_process_gib"], card_gib or 0) * 1.15
    fig.update_layout(barmode="stack", title=title, yaxis_title="GiB (whole process)", yaxis_range=[0, top],
                      legend_traceorder="reversed", height=480, width=760, margin=dict(l=60, r=20, t=60, b=40))
    return fig


def compare_figure(table: pd.DataFrame, measure: str = "process") -> go.Figure:
    """Predicted against measured peak (measure: allocated | reserved | process) for the rows of
    helpers.fit.validation_table() that finished; colour by source, open markers for runs side by side on one
    GPU; the diagonal and the +-5% and +-15% bands."""
    rows = table[table[f"error_{measure}"].notna()]
    fig = go.Figure()
    lo, hi = 0, float(max(rows[f"measured_{measure}_gib"].max(), rows[f"predicted_{measure}_gib"].max())) * 1.05
    for frac, dash in ((0.15, "dot"), (0.05, "dash")):
        for sign in (1, -1):
            fig.add_scatter(x=[lo, hi], y=[lo, hi * (1 + sign * frac)], mode="lines", showlegend=sign == 1,
                            line=dict(color="grey", dash=dash, width=1), name=f"±{frac:.0%}", hoverinfo="skip")
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="black", width=1), name="exact",
                    hoverinfo="skip")
    for source, part in rows.groupby("source", sort=True):
        fig.add_scatter(
            x=part[f"measured_{measure}_gib"], y=part[f"predicted_{measure}_gib"], mode="markers", name=source,
            marker=dict(size=8, symbol=["circle-open" if s > 1 else "circle" for s in part["side_by_side"]]),
            customdata=part[["id", "levers", f"error_{measure}"]].values,
            hovertemplate="%{customdata[0]}<br>levers: %{customdata[1]}<br>measured %{x:.2f} GiB, predicted "
                          "%{y:.2f} GiB (%{customdata[2]:+.1%})<extra></extra>")
    fig.update_layout(xaxis_title=f"measured peak {measure} (GiB)", yaxis_title=f"predicted peak {measure} (GiB)",
                      height=560, width=760, legend=dict(font=dict(size=10)))
    return fig


def explorer(card_gib: float = 8.0):
    """ipywidgets controls that redraw the breakdown of the chosen configuration against the card."""
    import ipywidgets as widgets
    from IPython.display import display

    names = [*registry.EMBEDDED, *registry.SYNTHETIC]
    c = {
        "model": widgets.Dropdown(options=names, value="llama-3.1-8b-shape", description="model"),
        "card": widgets.Dropdown(options=[4, 6, 8, 10, 12, 16, 24, 32, 48, 80], value=card_gib, description="card GiB"),
        "quant": widgets.Dropdown(options=registry.QUANTS, value="nf4", description="quant"),
        "lora_r": widgets.Dropdown(options=[4, 8, 16, 32, 64, 128], value=16, description="LoRA rank"),
        "batch_size": widgets.IntSlider(1, 1, 32, description="batch"),
        "seq_len": widgets.IntSlider(2048, 128, 32768, step=128, description="seq_len"),
        "gradient_checkpointing": widgets.Checkbox(True, description="checkpointing"),
        "fused_kernels": widgets.Checkbox(False, description="fused_kernels (Liger)"),
        "torch_compile": widgets.Checkbox(False, description="torch_compile"),
        "offload_activations": widgets.Checkbox(False, description="offload_activations"),
        "keep_16bit": widgets.Checkbox(False, description="keep_16bit"),
        "chunked_loss": widgets.IntSlider(0, 0, 32, description="chunked_loss"),
        "tiled_mlp": widgets.IntSlider(0, 0, 32, description="tiled_mlp"),
    }
    out = widgets.Output()

    def redraw(**kw):
        card = kw.pop("card")
        with out:
            out.clear_output(wait=True)
            try:
                pred = fit.predict({**kw, "eval_blocks": 1}, evaluation=False)
            except ValueError as e:  # a combination the study refuses (e.g. keep_16bit with quant none)
                print(f"not allowed: {e}")
                return
            breakdown_figure(pred, card, f"{kw['model']}: {fit.verdict_words(fit.card_verdict(pred, card))}").show()

    widgets.interactive_output(redraw, c)
    display(widgets.HBox([widgets.VBox(list(c.values())[:7]), widgets.VBox(list(c.values())[7:])]), out)
