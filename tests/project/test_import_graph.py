"""The import graph of ``dualwrite``, read from the source: no circles, and no import hidden inside a
function to dodge one.

Edges are the module-level imports of dualwrite modules, ``if TYPE_CHECKING:`` blocks included (a
type-only import that closes a circle still ties the two modules together; a small ``Protocol`` is
the way out). Importing ``dualwrite.a.b`` first runs ``dualwrite/a/__init__.py``, so that package
is an edge too; the root ``dualwrite/__init__.py`` is not (it is the public facade, importing the
whole API, and nothing inside the package imports through it implicitly).

A function-level import of a dualwrite module is allowed only for start-up cost (the CLI loads the
command it runs, not all of them), marked ``# deferred: start-up cost`` on the line above it (or the
block of imports it starts) or on the import itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dualwrite

PACKAGE = Path(dualwrite.__file__).parent
MARKER = "# deferred: start-up cost"


@dataclass(frozen=True, slots=True)
class Imported:
    """One import of a dualwrite module: where it is, and what it imports."""

    module: str
    line: int
    target: str
    marked: bool
    """The import carries the marker, or the line above its run of imports does."""


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names an import statement names (``from a import b``: ``a.b`` and ``a``)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        package = parts if is_package else parts[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    for alias in node.names:
        yield f"{base}.{alias.name}"


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The dualwrite module that ``name`` lives in, if any (``a.b.Class`` is ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name if name.startswith("dualwrite") else None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk(body: list[ast.stmt], *, in_function: bool) -> Iterator[tuple[ast.stmt, bool, int]]:
    """Every import statement in ``body`` and below, with whether it runs inside a function and
    the first line of the run of consecutive import statements it belongs to."""
    run_start = 0
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            run_start = run_start or node.lineno
            yield node, in_function, run_start
            continue
        run_start = 0
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from walk(node.body, in_function=True)
        elif isinstance(node, ast.ClassDef):
            yield from walk(node.body, in_function=in_function)
        else:
            for field in ("body", "orelse", "finalbody"):
                yield from walk(getattr(node, field, []) or [], in_function=in_function)
            for handler in getattr(node, "handlers", []) or []:
                yield from walk(handler.body, in_function=in_function)
            for case in getattr(node, "cases", []) or []:
                yield from walk(case.body, in_function=in_function)


def read_graph() -> tuple[dict[str, set[str]], list[Imported], dict[str, list[str]]]:
    """The module-level edges, the function-level imports, and each module's source lines."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    deferred: list[Imported] = []
    sources: dict[str, list[str]] = {}
    for name, path in known.items():
        text = path.read_text()
        sources[name] = text.splitlines()
        tree = ast.parse(text)
        for node, in_function, run_start in walk(tree.body, in_function=False):
            assert isinstance(node, ast.Import | ast.ImportFrom)
            for raw in targets(node, name, path.name == "__init__.py"):
                target = resolve(raw, known)
                if target is None or target == name:
                    continue
                if in_function:
                    lines = sources[name]
                    flagged = any(
                        MARKER in text for text in lines[node.lineno - 1 : node.end_lineno]
                    )
                    flagged |= run_start > 1 and lines[run_start - 2].strip() == MARKER
                    deferred.append(Imported(name, node.lineno, target, flagged))
                    continue
                edges[name].add(target)
                parts = target.split(".")
                for cut in range(2, len(parts)):  # the packages on the way (not the root)
                    package = ".".join(parts[:cut])
                    if not name.startswith(f"{package}."):
                        edges[name].add(package)
    return edges, deferred, sources


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


class TestImportGraph:
    """dualwrite's modules import one way: low layers never import what sits above them."""

    def test_the_graph_is_read(self):
        """The reader sees the package's known edges (a guard against a test that reads nothing)."""
        edges, _, _ = read_graph()
        assert "dualwrite.engine" in edges["dualwrite.middleware"]
        assert "dualwrite.instruments" in edges["dualwrite.rate_limits"]
        assert "dualwrite.cutover._context" in edges["dualwrite.cutover._guard"]  # type-only

    def test_no_circles(self):
        """No two modules import each other, however indirectly (type-only imports included)."""
        found = circles(read_graph()[0])
        assert found == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)

    def test_a_circle_is_found(self):
        """The circle finder finds a planted circle (and only it)."""
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        assert circles(edges) == [["a", "b", "c"]]

    def test_function_level_imports_are_for_start_up_cost_only(self):
        """Every import of a dualwrite module inside a function is marked as deferred for
        start-up cost: none is kept to dodge a circle."""
        _, deferred, _ = read_graph()
        unmarked = sorted(
            {
                f"{found.module}:{found.line} imports {found.target}"
                for found in deferred
                if not found.marked
            }
        )
        assert unmarked == [], (
            f"function-level imports without {MARKER!r} (move them to the top of the module, or "
            "mark them if they only save start-up time):\n" + "\n".join(unmarked)
        )

    def test_the_marker_is_read(self, tmp_path, monkeypatch):
        """An import under the marker, or in the run of imports it heads, counts as marked; one
        after other code does not."""
        package = tmp_path / "dualwrite"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "a.py").write_text("X = 1\n")
        (package / "b.py").write_text(
            "def f():\n"
            f"    {MARKER}\n"
            "    from dualwrite.a import (\n"
            "        X,\n"
            "    )\n"
            "    import dualwrite.a\n"
            "    print(X)\n"
            "    from dualwrite import a\n"
            "    return a\n"
            "\n"
            "\n"
            "def g():\n"
            f"    import dualwrite.a  {MARKER}\n"
        )
        monkeypatch.setattr(__name__ + ".PACKAGE", package)
        _, deferred, _ = read_graph()
        assert [(found.line, found.marked) for found in deferred] == [
            (3, True),
            (6, True),
            (8, False),
            (13, True),
        ]
