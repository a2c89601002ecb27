"""The judge shares nothing with the judged: no module of ``stripe_standin`` imports ``dualwrite``.

The imports are read from the source with ``ast`` (``import x``, ``from x import y``, relative
imports resolved against the package, and module names given as strings to ``importlib`` or
``__import__``), then checked once more at run time in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import stripe_standin

PACKAGE = Path(stripe_standin.__file__).parent
_IMPORTERS = {"import_module", "__import__", "find_spec", "import_string"}


def imported_modules(source: str, module: str) -> Iterator[str]:
    """Every module ``source`` (the module named ``module``) imports, as absolute names."""
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                parts = [*base, *([node.module] if node.module else [])]
                if not parts:  # ``from .. import x`` at the top: x itself is a module
                    yield from (alias.name for alias in node.names)
                    continue
                yield ".".join(parts)
            elif node.module:
                yield node.module
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _IMPORTERS:
                yield from (
                    arg.value
                    for arg in node.args
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                )


def dualwrite_imports(source: str, module: str) -> list[str]:
    """The imports of ``source`` that reach into ``dualwrite``."""
    return sorted(
        name
        for name in imported_modules(source, module)
        if name == "dualwrite" or name.startswith("dualwrite.")
    )


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class TestNoDualwriteImport:
    """Source and run-time checks that the stand-in stands alone."""

    def test_every_module_is_read(self) -> None:
        """The check reads the package's modules (it would pass vacuously on an empty list)."""
        names = {_module_name(p) for p in PACKAGE.rglob("*.py")}
        assert {"stripe_standin", "stripe_standin._app", "stripe_standin._calendar"} <= names

    @pytest.mark.parametrize(
        "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
    )
    def test_module_imports_no_dualwrite(self, path: Path) -> None:
        """No import of any spelling in this module reaches ``dualwrite``."""
        assert dualwrite_imports(path.read_text(), _module_name(path)) == []

    @pytest.mark.parametrize(
        "source",
        [
            "import dualwrite",
            "import dualwrite.periods as p",
            "from dualwrite.periods import add_interval",
            "from dualwrite import periods",
            "from ... import dualwrite",
            "import importlib\nimportlib.import_module('dualwrite.periods')",
            "from importlib import import_module\nimport_module('dualwrite')",
            "__import__('dualwrite.testing')",
            "def f():\n    from dualwrite.exceptions import DualwriteError",
        ],
    )
    def test_the_reader_catches_each_spelling(self, source: str) -> None:
        """Each way of importing ``dualwrite`` is found (so the check above can fail)."""
        assert dualwrite_imports(source, "stripe_standin.sub._module") != []

    def test_relative_imports_inside_the_package_are_fine(self) -> None:
        """``from . import x`` and ``from ._calendar import y`` stay inside the package."""
        source = "from . import _calendar\nfrom ._calendar import boundary"
        assert dualwrite_imports(source, "stripe_standin._state") == []

    def test_running_it_loads_no_dualwrite(self) -> None:
        """A fresh interpreter that builds and serves a stand-in never loads ``dualwrite``."""
        code = (
            "import sys, httpx, stripe_standin\n"
            "standin = stripe_standin.StripeStandin()\n"
            "with stripe_standin.serve_standin(standin) as running:\n"
            "    httpx.get(running.url + '/_standin/state').raise_for_status()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dualwrite'))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert result.stdout.strip() == "[]"
