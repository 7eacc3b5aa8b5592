"""A quiet run: kernels on IPC sockets (no per-run TCP warning), bitsandbytes' hub-kernel warning dropped."""
import subprocess
import sys

import nbformat

from helpers.records.paths import PROJECT_ROOT

SCRIPT = """
import sys, papermill
from helpers.sweeps.kernels import papermill_options
papermill.execute_notebook(sys.argv[1], sys.argv[2], kernel_name="python3", progress_bar=False, **papermill_options())
"""


def test_a_kernel_starts_without_the_tcp_warning(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nbformat.write(nb, tmp_path / "in.ipynb")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb")],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "42" in (tmp_path / "out.ipynb").read_text()
    assert "without encryption" not in proc.stderr, proc.stderr


def test_importing_bitsandbytes_through_helpers_prints_no_hub_kernel_warning():
    proc = subprocess.run([sys.executable, "-c", "import helpers.training.runs, bitsandbytes"], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels-community" not in proc.stderr, proc.stderr
