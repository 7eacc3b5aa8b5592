"""The package's imports point one way: no module reaches itself through others, lazy imports included."""
import ast
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def import_graph() -> dict[str, set[str]]:
    """{module: helpers modules it imports anywhere in its body (function-level imports count: they hide cycles)}."""
    graph = {}
    for f in HELPERS.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("helpers."))
        graph[f.stem] = deps - {f.stem}
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
