"""Run a sweep: a grid of configurations, each executed as the training notebook by papermill."""
import ast
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NOTEBOOK = PROJECT_ROOT / "notebooks" / "01_train.ipynb"


def notebook_parameters(notebook=TRAIN_NOTEBOOK) -> dict:
    """{name: {"type": str|int|float|bool, "default": value, "help": comment}} from the parameters cell."""
    import papermill

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} not found")
    types = {"str": str, "int": int, "float": float, "bool": bool}
    out = {}
    for name, p in papermill.inspect_notebook(str(notebook)).items():
        out[name] = {"type": types[p["inferred_type_name"]], "default": ast.literal_eval(p["default"]), "help": p["help"]}
    return out
