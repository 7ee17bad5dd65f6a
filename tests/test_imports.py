"""The kd package imports in one direction: no module reaches itself through others' imports,
whether at the top or inside a function (a late import hides a cycle, it does not remove it)."""
import ast
from pathlib import Path

KD = Path(__file__).resolve().parents[1] / "kd"


def module_name(path: Path) -> str:
    parts = path.relative_to(KD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kd_imports(path: Path, modules: set) -> set:
    """kd modules that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from kd import dist` names the module kd.dist; `from kd.x import f` names kd.x
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_kd_modules():
    files = {module_name(p): p for p in KD.rglob("*.py")}
    modules = set(files)
    graph = {m: kd_imports(p, modules) - {m, "kd"} for m, p in files.items()}
    assert graph["kd.pretrain"], "the import reader found nothing: it is broken, not the package clean"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
