"""psadv's import graph: no module imports itself round a circle (issue 36).

The graph is read from the source with :mod:`ast`, not by importing: an edge is an ``import
psadv.x``, ``from psadv.x import y``, ``from . import x`` or ``from .x import y`` at a module's top
level (inside a top-level ``if`` or ``try`` too), which runs when the module is imported. A
function-level (lazy) import runs only when its function is called; those circles are listed in
:data:`LAZY_CIRCLES` and may only shrink. An import of a package a module lies in (``from . import
__version__``) is no edge: Python imports that package before the module anyway.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "psadv"

# Circles that close only through a function-level import. The test fails on a new one, and on a
# listed one that is gone (so the list is kept true), each as its modules in sorted order.
LAZY_CIRCLES = {
    # the sweep checks its runs' `psadv train` flags with the CLI's own command; cli imports the report lazily
    ("psadv.cli", "psadv.report", "psadv.report.sweep"),
    # the eval cascade spells --norm with config's parser; config lists the cascade's attacks lazily, so
    # `import psadv.config` stays free of torch
    ("psadv.attacks.suite", "psadv.config"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level(tree: ast.Module):
    """The import statements that run when the module is imported."""
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:` is not run, but is a design edge all the same
            yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def import_graph(*, lazy: bool = False) -> dict[str, set[str]]:
    """psadv module -> the psadv modules it imports (``lazy``: function-level imports too)."""
    files = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        nodes = ast.walk(tree) if lazy else _top_level(tree)
        targets = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)  # `from . import x`: the submodule x
        graph[name] = {t for t in targets if t in files and not (name + ".").startswith(t + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> dict[tuple[str, ...], list[str]]:
    """Each strongly connected group of modules (Tarjan), sorted, with one circle through it
    (``[a, b, ..., a]``): every module of a group lies on some circle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), {}

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found[tuple(sorted(group))] = _circle_in(graph, group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _circle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest circle through the group's first module (breadth first), closed: [a, ..., a]."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"no circle in {sorted(group)}")


def _shown(found: dict[tuple[str, ...], list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in found.values())


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "psadv.errors" in graph["psadv"]  # from .errors import ... in a package's __init__
    assert "psadv.attacks.pgd" in graph["psadv.attacks"]  # from .pgd import ...
    assert "psadv.report.runs" in graph["psadv.report.analysis"]  # from .runs import ...
    assert "psadv.rundir" in graph["psadv.report.runs"]  # from ..rundir import ...
    assert "psadv.schedules" in graph["psadv.single"]  # from . import schedules
    assert "psadv" not in graph["psadv.attacks.pgd"]  # from psadv import __version__: its own package
    assert "psadv.launch" not in graph["psadv.cli"]  # imported inside a function only
    assert "psadv.launch" in import_graph(lazy=True)["psadv.cli"]


def test_circles_finds_and_shows_a_circle():
    found = circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert _shown(found) == "a -> b -> c -> a"


def test_no_module_level_import_circle():
    found = circles(import_graph())
    assert not found, f"psadv modules import each other round a circle at module level:\n{_shown(found)}"


def test_function_level_circles_only_shrink():
    found = circles(import_graph(lazy=True))
    new = {group: circle for group, circle in found.items() if group not in LAZY_CIRCLES}
    assert not new, f"a function-level import closes a new circle among psadv modules:\n{_shown(new)}"
    gone = LAZY_CIRCLES - set(found)
    assert not gone, f"these circles are gone: remove them from LAZY_CIRCLES: {sorted(gone)}"


def test_the_checkpoint_codec_knows_no_config_or_model():
    """The format layer reads and writes files; what a config or a model means is the layer above's
    (psadv.checkpoint.restore). The codec reaches neither, directly or through another module, not
    even in a function. (Its package's __init__, which re-exports the layers, is no edge: see
    import_graph.)"""
    graph = import_graph(lazy=True)
    reached, todo = set(), ["psadv.checkpoint.codec"]
    while todo:
        for module in graph[todo.pop()] - reached:
            reached.add(module)
            todo.append(module)
    assert not reached & {"psadv.config", "psadv.models"}, sorted(reached)
