"""Display (notebook 02): figures that render both in JupyterLab and in the offline HTML report, a chart shown
with its takeaway (or the sentence why it is skipped), and ipywidgets selectors for exploring in JupyterLab.
"""
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer


class _ReportHtmlRenderer(MimetypeRenderer):
    """text/html for nbconvert: each figure's div and its Plotly.newPlot call, nothing else.

    Plotly's own 'notebook' renderer adds a MathJax <script src> from a CDN to every figure; this one
    adds no script from anywhere. plotly.js itself goes into the HTML report once (helpers.report's
    template); in JupyterLab the plotly_mimetype output renders the figure instead.
    """

    def to_mimebundle(self, fig_dict):
        html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                           default_width="100%", default_height=480, validate=False)
        return {"text/html": html}


def use_report_renderer() -> str:
    """Figures shown as both the Plotly MIME bundle (JupyterLab) and offline text/html (nbconvert's HTML)."""
    pio.renderers["report_html"] = _ReportHtmlRenderer()
    pio.renderers.default = "plotly_mimetype+report_html"
    return pio.renderers.default


def show(fig, takeaway: str) -> None:
    """The takeaway as a line of text, then the figure (or, for a skipped chart, only the sentence why)."""
    from IPython.display import Markdown, display

    display(Markdown(f"**Takeaway:** {takeaway}" if fig is not None else f"*Skipped.* {takeaway}"))
    if fig is not None:
        fig.show()


def explorer(summary: pd.DataFrame, history: pd.DataFrame):
    """ipywidgets selectors for JupyterLab: any per-step measure of any runs. Not kept in the HTML report."""
    try:
        import ipywidgets as widgets
    except ImportError:
        return "ipywidgets is not installed: the interactive explorer is not available."
    if history.empty:
        return "No per-step rows to explore in this sweep."
    measures = [c for c in ("loss", "step_time_s", "rss_gib", "allocated_gib", "reserved_gib",
                            "nvml_process_used_gib", "power_w", "learning_rate")
                if c in history.columns and pd.to_numeric(history[c], errors="coerce").notna().any()]
    names = {r: f"{c} · {r}" for r, c in history.groupby("run_id", sort=False)["config"].first().items()}
    measure = widgets.Dropdown(options=measures, value=measures[0], description="measure")
    chosen = widgets.SelectMultiple(options=[(v, k) for k, v in names.items()], value=tuple(names),
                                    description="runs", rows=min(8, len(names)),
                                    layout=widgets.Layout(width="70%"))

    def draw(measure, chosen):
        fig = go.Figure()
        for rid in chosen:
            g = history[history["run_id"] == rid].sort_values("step")
            fig.add_trace(go.Scatter(x=g["step"], y=pd.to_numeric(g[measure], errors="coerce"),
                                     mode="lines+markers", name=names[rid]))
        fig.update_layout(xaxis_title="step", yaxis_title=measure, height=420)
        fig.show()

    out = widgets.interactive_output(draw, {"measure": measure, "chosen": chosen})
    return widgets.VBox([widgets.HBox([measure, chosen]), out])
