"""A sweep's report: summary.csv, the executed analysis notebook, and a self-contained HTML export.

    python -m helpers.report reports/<name>

writes reports/<name>/summary.csv, analysis.ipynb (notebooks/02_analysis.ipynb executed by papermill for
this sweep) and analysis.html, each atomically (temp file, then rename). The HTML reads offline: plotly.js
is inlined once in its head, and the CDN scripts nbconvert's lab template would add (require.js, MathJax,
Mermaid, the widgets manager) are left out.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

from helpers.records.files import atomic_write, publish
from helpers.sweeps.kernels import papermill_options
from helpers.records.paths import PROJECT_ROOT, resolve_sweep_dir, shown
from helpers.records.sidecars import write_summary

ANALYSIS_NOTEBOOK = PROJECT_ROOT / "notebooks" / "02_analysis.ipynb"

# nbconvert's lab template, minus every <script src> from a CDN, plus plotly.js once (the figures'
# outputs carry only their divs and Plotly.newPlot calls: helpers.analysis.use_report_renderer).
OFFLINE_TEMPLATE = r"""
{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}
<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>
<script type="text/javascript">{{ resources.plotly_js }}</script>
{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
"""


def export_html(notebook, html_path, title: str = "analysis") -> Path:
    """An executed notebook as one HTML file that renders its Plotly figures with no network."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter
    from plotly.offline import get_plotlyjs

    nb = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(template_name="lab", template_file="offline.html.j2",
                            extra_loaders=[jinja2.DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})])
    body, _ = exporter.from_notebook_node(nb, resources={"plotly_js": get_plotlyjs(),
                                                         "metadata": {"name": title}})
    html_path = Path(html_path)
    atomic_write(html_path, body)
    return html_path


def execute_into(notebook, dest: Path, parameters: dict, failed: Path | None = None) -> Path:
    """Execute a notebook with papermill into dest, atomically: a temp file beside dest, renamed into place only
    when every cell ran. If a cell fails, the executed copy (papermill marks the cell) goes to `failed` when given,
    else it is removed; the error is raised and dest is left as it was."""
    import papermill

    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=".ipynb", dir=dest.parent)
    os.close(fd)
    try:
        papermill.execute_notebook(str(notebook), tmp, parameters=parameters, cwd=str(PROJECT_ROOT),
                                   progress_bar=False, kernel_name="python3", **papermill_options())
    except papermill.PapermillExecutionError:
        if failed is None:
            Path(tmp).unlink(missing_ok=True)
        else:
            publish(tmp, failed)
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    publish(tmp, dest)
    return dest


def build_report(sweep_dir, summary: bool = True) -> Path:
    """summary.csv, analysis.ipynb and analysis.html in the sweep folder; returns the HTML's path.

    A relative sweep_dir is relative to the project root. summary=False: the caller has just written summary.csv
    from the same sidecars (the sweep, at its end), so it is written once. If the analysis notebook fails, its
    executed copy (papermill marks the failing cell) is kept as analysis.failed.ipynb and the error is raised;
    the previous analysis.ipynb and analysis.html are left as they were.
    """
    folder = resolve_sweep_dir(sweep_dir)
    if summary:
        write_summary(folder)
    execute_into(ANALYSIS_NOTEBOOK, folder / "analysis.ipynb", {"sweep_dir": str(shown(folder)), "explore": False},
                 failed=folder / "analysis.failed.ipynb")
    return export_html(folder / "analysis.ipynb", folder / "analysis.html", title=f"{folder.name}: sweep analysis")


def build_fit_report(out_dir: str | Path = "reports/fit") -> Path:
    """notebooks/03_will_it_fit.ipynb (the memory predictor, helpers/fit/) executed by papermill into
    out_dir/will_it_fit.ipynb (explore off), and its self-contained HTML beside it; returns the HTML's path.
    `python -m helpers.fit --report` calls it: the predictor itself never imports the runner."""
    out = Path(out_dir) if Path(out_dir).is_absolute() else PROJECT_ROOT / out_dir
    out.mkdir(parents=True, exist_ok=True)
    execute_into(PROJECT_ROOT / "notebooks" / "03_will_it_fit.ipynb", out / "will_it_fit.ipynb",
                 {"explore": False, "out_dir": str(shown(out))})
    return export_html(out / "will_it_fit.ipynb", out / "will_it_fit.html", title="will it fit?")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a sweep folder, e.g. reports/default (relative to the project root)")
    a = ap.parse_args(argv)
    try:
        html = build_report(a.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
