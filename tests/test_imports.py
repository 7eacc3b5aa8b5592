"""The package's imports point one way: no module reaches itself through others, lazy imports included."""
import ast
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def module_name(f: Path) -> str:
    """helpers/runs.py -> 'runs'; helpers/analysis/__init__.py -> 'analysis'; helpers/analysis/load.py ->
    'analysis.load'."""
    parts = list(f.relative_to(HELPERS).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: helpers modules it imports anywhere in its body (function-level imports count: they hide cycles)}.
    Modules of a sub-package (helpers/analysis/) are nodes of their own, named 'analysis.load'."""
    graph = {}
    for f in HELPERS.rglob("*.py"):
        name = module_name(f)
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                if node.module:
                    deps.add(".".join(base + node.module.split(".")))
                else:
                    deps.update(".".join(base + [a.name]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."):
                deps.add(node.module.split(".", 1)[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("helpers."))
        graph[name] = deps - {name}
    return graph


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


def test_no_import_cycle_in_helpers():
    graph = import_graph()
    assert {"analysis", "sweep", "report", "runs", "paths"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_analysis_package_never_imports_the_runner():
    """The reading side reads records; it never calls the sweep runner, the report writer or a run's code (the
    edge analysis -> sweep, to parse the sweep file and the training notebook, was the cycle issue 16 removed)."""
    graph = import_graph()
    analysis = {m for m in graph if m == "analysis" or m.startswith("analysis.")}
    assert len(analysis) > 5  # the package and its modules are walked
    reached, todo = set(), list(analysis)
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in reached:
                reached.add(dep)
                todo.append(dep)
    writing = {"sweep", "report", "publish", "kernels", "runs", "train", "models", "quantized", "data", "levers",
               "telemetry", "evaluate"}
    assert not reached & writing, sorted(reached & writing)
