"""Each notebook has one source: the committed .ipynb must be exactly what its builder in tools/ writes.

Users edit the notebooks in JupyterLab and reviewers read the builders' cell sources in diffs; this test fails
when one was changed without the other (rebuild with `python tools/build_*.py`, or carry a notebook edit back
into its builder)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILDERS = {"01_train.ipynb": ("build_notebooks", "TRAIN"), "02_analysis.ipynb": ("build_analysis_notebook", "ANALYSIS"),
            "03_will_it_fit.ipynb": ("build_fit_notebook", "FIT")}


def _builder(name):
    sys.path.insert(0, str(ROOT / "tools"))  # the builders import each other by module name
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "tools"))


@pytest.mark.parametrize("notebook", sorted(BUILDERS))
def test_committed_notebook_is_what_its_builder_writes(notebook, tmp_path, capsys):
    name, cells = BUILDERS[notebook]
    module = _builder(name)
    module.build(getattr(module, cells), tmp_path / notebook)
    built = (tmp_path / notebook).read_text()
    committed = (ROOT / "notebooks" / notebook).read_text()
    assert committed == built, (f"notebooks/{notebook} differs from what tools/{name}.py writes: rebuild it, or "
                                "carry the notebook's edit back into the builder")
