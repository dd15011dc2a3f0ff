"""Seams of the package, checked statically (AST only, nothing is imported).

* No function is longer than :data:`MAX_FUNCTION_LINES` lines of code (from its ``def`` line to
  its end, docstring excluded): long functions hide the steps a reader needs to see.
* No module imports a private (underscore) name from a module of another subpackage: what one
  folder offers another goes through public names. ``rome_lens._typing`` and
  ``rome_lens._cache`` are package-private helpers meant for every folder.
* No import cycle among ``rome_lens`` modules (imports at module level; imports inside
  functions and ``if TYPE_CHECKING:`` blocks are deliberate ways to break a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "rome_lens"
MAX_FUNCTION_LINES = 80

# Functions allowed over the limit for now, as "path:qualified name".
LONG_FUNCTION_ALLOWLIST: set[str] = set()  # "path:function" of a function allowed to be long

# Package-private helpers any folder may import underscore names from.
SHARED_PRIVATE_MODULES = {"rome_lens._typing", "rome_lens._cache", "rome_lens._extras"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package: dotted name -> (path, parsed tree)."""
    return {
        _module_name(path): (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
    }


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name][0].name == "__init__.py"


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE_DIR.parent).as_posix()


# --------------------------------------------------------------------------- function length


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.AST]]:
    """(qualified name, node) of every function and method, nested ones included."""
    found: list[tuple[str, ast.AST]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = prefix + node.name
            found.append((name, node))
            found.extend(_functions(node, name + "."))
        elif isinstance(node, ast.ClassDef):
            found.extend(_functions(node, prefix + node.name + "."))
        else:
            found.extend(_functions(node, prefix))
    return found


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the ``def`` line to the end of the body, less the docstring's lines."""
    assert node.end_lineno is not None
    length = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        assert first.end_lineno is not None
        length -= first.end_lineno - first.lineno + 1
    return length


def test_functions_are_short() -> None:
    offenders = []
    allowed_seen = set()
    for path, tree in MODULES.values():
        for name, node in _functions(tree):
            assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            length = _code_lines(node)
            if length <= MAX_FUNCTION_LINES:
                continue
            key = f"{_rel(path)}:{name}"
            if key in LONG_FUNCTION_ALLOWLIST:
                allowed_seen.add(key)
                continue
            offenders.append(f"{_rel(path)}:{node.lineno} {name}: {length} lines")
    assert not offenders, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into helpers):\n"
        + "\n".join(offenders)
    )
    # Keep the allow-list honest: an entry that is short again (or gone) must be removed.
    stale = LONG_FUNCTION_ALLOWLIST - allowed_seen
    assert not stale, f"allow-listed functions now short or gone, remove them: {sorted(stale)}"


# --------------------------------------------------------------------------- imports


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from ... import`` statement reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.AST, top_level_only: bool) -> list[tuple[int, str, str]]:
    """(line, imported module, imported name or "") for every import of a ``rome_lens`` module.

    With ``top_level_only``, imports inside functions and ``if TYPE_CHECKING:`` blocks are
    skipped: they run late, so they cannot close an import cycle.
    """
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST) -> None:
        if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if top_level_only and isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            found.extend((node.lineno, source, alias.name) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [item for item in found if item[1] == "rome_lens" or item[1].startswith("rome_lens.")]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _folder(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: ``rome_lens.rome.keys`` ->
    ``rome``, ``rome_lens.cli`` -> ``cli``, ``rome_lens`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _target(source: str, name: str) -> str:
    """The module an imported name lives in: a submodule itself, or the module it is read from."""
    candidate = f"{source}.{name}" if name else source
    return candidate if candidate in MODULES else source


def test_no_private_imports_across_subpackages() -> None:
    offenders = []
    for module, (path, tree) in MODULES.items():
        for line, source, name in _imports(module, tree, top_level_only=False):
            target = _target(source, name)
            if target in SHARED_PRIVATE_MODULES or _folder(target) == _folder(module):
                continue
            private_path = any(part.startswith("_") for part in target.split(".")[1:])
            private_name = name.startswith("_") and not name.startswith("__")
            if private_path or private_name:
                what = f"{source}.{name}" if name else source
                offenders.append(f"{_rel(path)}:{line} imports {what}")
    assert not offenders, "private names imported across subpackages:\n" + "\n".join(offenders)


def _import_graph() -> dict[str, dict[str, int]]:
    """Module -> {module it imports at import time: line of the import}."""
    graph: dict[str, dict[str, int]] = {module: {} for module in MODULES}
    for module, (_, tree) in MODULES.items():
        for line, source, name in _imports(module, tree, top_level_only=True):
            target = _target(source, name)
            if target in MODULES and target != module:
                graph[module].setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A concrete cycle through a strongly connected component, as a path back to its start."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first: the shortest cycle back to start
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt in component and nxt not in parents:
                    parents[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")  # unreachable for a component


def test_no_import_cycles() -> None:
    graph = _import_graph()
    described = [
        " -> ".join(
            f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)
        ) + f" -> {cycle[-1]}"
        for cycle in _cycles(graph)
    ]
    assert not described, "import cycles among rome_lens modules:\n" + "\n".join(described)


def test_the_checks_see_the_package() -> None:
    """Guard against a silently empty scan (a moved folder would make every check pass)."""
    assert "rome_lens.rome.compute" in MODULES
    graph = _import_graph()
    assert graph["rome_lens"], "rome_lens/__init__.py imports nothing?"
    assert _cycles({"a": {"b": 1}, "b": {"a": 2}, "c": {}}) == [["a", "b", "a"]]
