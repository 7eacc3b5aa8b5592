"""The reading side imports no torch: the analysis, the comparison with a published reference, the sidecar format,
the registry of names and the memory predictor load in a process that has no torch imported."""
import subprocess
import sys

from helpers.records.paths import PROJECT_ROOT

LIGHT = ("helpers.analysis", "helpers.analysis.reference", "helpers.records", "helpers.records.sidecars",
         "helpers.records.registry", "helpers.records.paths", "helpers.records.params", "helpers.records.gpus", "helpers.fit",
         "helpers.fit.plots")


def test_the_reading_side_does_not_import_torch():
    code = f"import sys; import {', '.join(LIGHT)}; print(sorted(m for m in ('torch', 'transformers', 'peft', " \
           "'bitsandbytes') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_analysis_imports_neither_the_runner_nor_papermill():
    code = ("import sys; import helpers.analysis; print(sorted(m for m in ('torch', 'papermill', 'helpers.sweeps', "
            "'helpers.sweeps.report', 'helpers.training', 'helpers.training.runs') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
