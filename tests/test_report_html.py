"""The HTML report, built from a fake sweep and opened in a real headless Chromium (Debian's `chromium`,
installed by `make browser`): every figure draws its SVG and the page logs no JavaScript error.

How the browser is driven: `chromium --headless --dump-dom` with a virtual-time budget prints the DOM after
the page's scripts ran, and `--enable-logging=stderr` prints every console message and uncaught exception
as a CONSOLE line. That needs no driver binary (selenium: chromedriver) and no browser download
(playwright), so it is the simplest thing that checks what a reader sees. The report logs nothing itself,
so ANY console line fails the test, whatever its level.
"""
import os
import re
import shutil
import subprocess

import nbformat
import papermill
import pytest

from helpers import analysis
from helpers.sweeps import report
from tests.test_analysis import make_sweep

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("chromium is not installed: run `make browser` (installs Debian's chromium)")
    return exe


def open_in_chromium(html, tmp_path) -> tuple[str, list[str]]:
    """(DOM after the scripts ran, console lines) of an HTML file, in a fresh browser profile."""
    profile = tmp_path / f"chromium-profile-{os.getpid()}"
    proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def rendered_figures(dom: str) -> tuple[int, int]:
    """(figure divs plotly.js took over, those that drew an <svg class="main-svg">) in a dumped DOM."""
    from bs4 import BeautifulSoup  # a dependency of nbconvert

    plots = BeautifulSoup(dom, "html.parser").select("div.js-plotly-plot")
    return len(plots), sum(1 for p in plots if p.select_one("svg.main-svg") is not None)


def figures_expected(sweep) -> int:
    summary, history = analysis.load_sweep(sweep)
    figs = [chart(summary)[0] for chart in analysis.CHARTS] + [analysis.loss_curves(history)[0]]
    return sum(f is not None for f in figs)


def check_offline(html: str) -> None:
    """Readable with no network: no script or stylesheet from anywhere else, plotly.js inlined once."""
    assert not re.search(r"<script[^>]*\ssrc=[\"']?(https?:)?//", html), "a <script src> from the network"
    assert not re.search(r"<link[^>]*href=[\"']?(https?:)?//", html), "a stylesheet from the network"
    assert not re.search(r"import\([\"']https?://", html), "a module import from the network"
    assert "require.min.js" not in html and "MathJax.js" not in html
    assert html.count("* plotly.js v") == 1  # the library's banner: inlined exactly once


@pytest.mark.slow
def test_report_renders_every_figure_in_chromium(tmp_path):
    sweep = tmp_path / "gpu-sweep"
    ids = make_sweep(sweep, gpu=True, synthetic=True)  # every chart has data; plus oom/error/corrupt runs
    path = report.build_report(sweep)
    assert path == sweep / "analysis.html"
    for name in ("summary.csv", "analysis.ipynb", "analysis.html"):
        assert (sweep / name).is_file() and oct((sweep / name).stat().st_mode & 0o044) == "0o44", name
    assert not list(sweep.glob(".analysis.*")) and not list(sweep.glob("*.tmp"))  # no temp files left
    nb = nbformat.read(str(sweep / "analysis.ipynb"), as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]

    html = path.read_text()
    check_offline(html)
    expected = figures_expected(sweep)
    assert expected == 7
    assert html.count('class="plotly-graph-div"') == expected
    assert "truncated-run" in html and "corrupt" in html  # the corrupt sidecar is listed, not fatal
    assert ids["oom"] in html

    dom, console = open_in_chromium(path, tmp_path)
    assert console == [], "\n".join(console)
    assert rendered_figures(dom) == (expected, expected)
    assert 'data-unformatted="all quantizations"' in dom  # the loss curves' Plotly dropdown survived


@pytest.mark.slow
def test_cpu_sweep_notebook_runs_headless_with_widgets_and_skips_energy(tmp_path):
    """The notebook as papermill runs it by default (explore=True: ipywidgets with no front end) on a CPU
    sweep; its export still renders offline and says why the energy chart is missing."""
    sweep = tmp_path / "cpu-sweep"
    make_sweep(sweep)
    out = tmp_path / "analysis.ipynb"
    papermill.execute_notebook(str(report.ANALYSIS_NOTEBOOK), str(out), parameters={"sweep_dir": str(sweep)},
                               cwd=str(report.PROJECT_ROOT), progress_bar=False, kernel_name="python3")
    nb = nbformat.read(str(out), as_version=4)
    mimes = {m for c in nb.cells for o in c.get("outputs", []) for m in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in mimes  # the explorer was built
    html_path = report.export_html(out, tmp_path / "analysis.html")
    html = html_path.read_text()
    check_offline(html)
    assert "No energy chart: this sweep ran on a CPU" in html
    expected = figures_expected(sweep)
    assert expected == 6 and html.count('class="plotly-graph-div"') == expected

    dom, console = open_in_chromium(html_path, tmp_path)
    assert console == [], "\n".join(console)
    assert rendered_figures(dom) == (expected, expected)


def test_report_command_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    # in-process (python -m helpers.report calls the same main); a subprocess would spend seconds importing torch
    assert report.main([str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert "nothing-here" in err and "no runs/ subfolder" in err
