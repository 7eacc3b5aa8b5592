"""The package's imports point one way, by folder: each layer of helpers/ is a folder, and a module may import only
the layers its folder allows (ARCHITECTURE.md). A new module is covered by where it sits, without editing a list;
function-level imports count (they hide cycles), and no module reaches itself through others."""
import ast
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"

# folder -> the folders its modules may import (its own included). The reading side (analysis, fit) reads records and
# never reaches the runner (sweeps) or a run's torch code (training); records import no other layer.
ALLOWED = {
    "records": {"records"},
    "training": {"records", "training"},
    "analysis": {"records", "analysis"},
    "fit": {"records", "analysis", "fit"},
    "sweeps": {"records", "training", "analysis", "fit", "sweeps"},
}
# Entry points: the package's map (helpers/__init__.py), the commands kept at their old names (helpers/sweep.py,
# report.py, publish.py) and each folder's `python -m` module (__main__.py) are the scripts layer above every folder.
ENTRY = "__main__"


def module_name(f: Path, root: Path = HELPERS) -> str:
    """helpers/training/runs.py -> 'training.runs'; helpers/analysis/__init__.py -> 'analysis'."""
    parts = list(f.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = HELPERS) -> dict[str, set[str]]:
    """{module: helpers modules it imports anywhere in its body}. `from helpers.x import y` counts as importing the
    module helpers.x.y when that is a module, else helpers.x."""
    files = {module_name(f, root): f for f in root.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        package = [p for p in package if p]
        deps = set()

        def add(mod, names=()):
            hits = {f"{mod}.{n}".strip(".") for n in names if f"{mod}.{n}".strip(".") in files}
            deps.update(hits or {mod})

        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[:len(package) - (node.level - 1)]
                add(".".join(base + (node.module.split(".") if node.module else [])), [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "helpers":
                add(node.module.partition(".")[2], [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("helpers."):
                        add(a.name.partition(".")[2])
        graph[name] = deps - {name}
    return graph


def layer(module: str) -> str | None:
    """The folder a module sits in; None for an entry point (the scripts layer)."""
    top, _, rest = module.partition(".")
    if not rest and top not in ALLOWED or module.rsplit(".", 1)[-1] == ENTRY:
        return None
    return top


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        if (mine := layer(mod)) is None:
            continue
        for dep in sorted(deps):
            theirs = layer(dep) or dep
            if theirs not in ALLOWED[mine]:
                bad.append(f"helpers.{mod} ({mine}) imports helpers.{dep} ({theirs})")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_sits_in_a_layer_folder():
    """helpers/ holds folders, its map and the commands kept at their old names: nothing else to escape the rule."""
    loose = sorted(f.name for f in HELPERS.glob("*.py"))
    assert loose == ["__init__.py", "publish.py", "report.py", "sweep.py"], loose
    folders = sorted(p.name for p in HELPERS.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(ALLOWED), folders


def test_no_import_cycle_in_helpers():
    graph = import_graph()
    assert {"analysis", "sweeps.sweep", "training.runs", "records.paths", "fit"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_each_layer_imports_only_the_layers_below_it():
    graph = import_graph()
    assert len(graph) > 30  # the whole package is walked, sub-folders included
    assert layer_violations(graph) == []


def test_the_rule_catches_a_planted_import(tmp_path):
    """A reading-side module that imports the runner (inside a function, as a lazy import would), or a record that
    imports a run's code, is caught by the folder it sits in; no list names the new modules."""
    root = tmp_path / "helpers"
    for rel, text in {"__init__.py": "", "records/__init__.py": "", "records/paths.py": "",
                      "sweeps/__init__.py": "", "sweeps/report.py": "from helpers.records import paths\n",
                      "training/__init__.py": "", "training/runs.py": "",
                      "analysis/__init__.py": "", "analysis/new_chart.py":
                          "def f():\n    from ..sweeps.report import build\n",
                      "fit/__init__.py": "", "fit/cards.py": "import helpers.sweeps.report\n",
                      "records/brand_new.py": "from helpers.training import runs\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    bad = layer_violations(import_graph(root))
    assert bad == ["helpers.analysis.new_chart (analysis) imports helpers.sweeps.report (sweeps)",
                   "helpers.fit.cards (fit) imports helpers.sweeps.report (sweeps)",
                   "helpers.records.brand_new (records) imports helpers.training.runs (training)"], bad
