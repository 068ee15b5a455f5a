"""The package's shape: no import cycle anywhere in pbrf_fast (imports inside
functions included), the library never imports the paper harness or the command
line, and `import pbrf_fast` stays light."""
import ast
import subprocess
import sys
from pathlib import Path

import pbrf_fast

PACKAGE = Path(pbrf_fast.__file__).resolve().parent
# Modules of the paper harness and the command line; the rest is the library.
HARNESS = ("pbrf_fast.paper", "pbrf_fast.cli", "pbrf_fast.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """pbrf_fast modules that ``path`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # the deepest pbrf_fast module this names (a.b.c -> a.b.c, else a.b, ...)
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate.startswith("pbrf_fast") and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {name: imports_of(path, name, modules) for name, path in files.items()}
    # A package's __init__ runs when any of its modules is imported: that edge is implicit,
    # and importing a parent package from its own module is not a cycle worth flagging.
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_walker_sees_imports_inside_functions():
    graph = import_graph()
    assert "pbrf_fast.paper.jobs" in graph["pbrf_fast.cli"]          # a function-level import
    assert "pbrf_fast.products" in graph["pbrf_fast.curvatures.operators"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_library_never_imports_the_harness():
    offenders = {name: sorted(t for t in targets if t.startswith(HARNESS))
                 for name, targets in import_graph().items() if not name.startswith(HARNESS)}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders


def test_import_pbrf_fast_loads_neither_matplotlib_nor_sklearn_nor_the_harness():
    code = ("import sys, pbrf_fast\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'sklearn')"
            " or m.startswith('pbrf_fast.paper') or m == 'pbrf_fast.cli']\n"
            "print(heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
