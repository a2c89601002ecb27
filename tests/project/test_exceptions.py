"""One error tree: every error dualwrite raises is a ``DualwriteError`` defined in
``dualwrite.exceptions``, whose docstring draws the tree as the classes make it."""

from __future__ import annotations

import ast
import inspect
import re
import warnings
from pathlib import Path

import pytest

import dualwrite
import dualwrite.testing
import stripe_standin
from dualwrite import exceptions
from dualwrite.exceptions import DualwriteError

PACKAGE = Path(dualwrite.__file__).parent


def error_classes() -> list[tuple[str, str]]:
    """Every class in the package whose name ends in ``Error`` or ``Exception``: (module, name)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                found.append((module, node.name))
    return found


def tree_lines() -> list[tuple[int, str]]:
    """The tree in ``exceptions``'s docstring: (depth, class name) per line."""
    lines = (inspect.getdoc(exceptions) or "").splitlines()
    root = next(line for line in lines if line.strip() == "DualwriteError")
    indent = len(root) - len(root.lstrip())
    drawn = []
    for line in lines[lines.index(root) :]:
        match = re.match(r"((?:[│ ] {3}|[├└]── )*)(\w+Error)\b", line[indent:])
        if match is None:
            break
        drawn.append((len(match.group(1)) // 4, match.group(2)))
    return drawn


class TestTree:
    """The tree is whole, in one module, and drawn as it is."""

    def test_public_errors_live_in_exceptions(self):
        """No public error class is defined outside ``dualwrite.exceptions``."""
        elsewhere = [
            f"{module}.{name}"
            for module, name in error_classes()
            if module != "dualwrite.exceptions" and not name.startswith("_")
        ]
        assert elsewhere == []

    def test_every_error_is_a_dualwrite_error(self):
        """Every error class in the package, private signals included, derives from
        ``DualwriteError``."""
        import importlib

        for module, name in error_classes():
            value = getattr(importlib.import_module(module), name)
            assert issubclass(value, DualwriteError), f"{module}.{name}"

    def test_the_drawn_tree_is_the_class_tree(self):
        """Each class in the docstring's tree sits under its real base, and every class is drawn."""
        drawn = tree_lines()
        parents: list[str] = []
        seen = set()
        for depth, name in drawn:
            parents = parents[:depth]
            value = getattr(exceptions, name)
            if parents:
                assert parents[-1] in [base.__name__ for base in value.__bases__], name
            parents.append(name)
            seen.add(name)
        defined = {
            name
            for name, value in vars(exceptions).items()
            if isinstance(value, type) and issubclass(value, DualwriteError)
        }
        assert seen == defined

    def test_old_homes_still_export_their_errors(self):
        """An error keeps the public name it had where it is raised."""
        from dualwrite.admin import ApiError
        from dualwrite.cutover import CutoverInputError
        from dualwrite.rate_limits import RateLimitedError
        from dualwrite.stripe_io import StripeCallError, StripeReadError

        assert ApiError is exceptions.ApiError and CutoverInputError is exceptions.CutoverInputError
        assert RateLimitedError is exceptions.RateLimitedError
        assert StripeCallError is exceptions.StripeCallError
        assert StripeReadError is exceptions.StripeReadError


class TestStandinErrors:
    """The stand-in's errors are its own, not part of dualwrite's tree."""

    def test_not_dualwrite_errors(self):
        """``StandinError`` is not a ``DualwriteError`` and ``dualwrite.testing`` no longer lists it."""
        assert not issubclass(stripe_standin.StandinError, DualwriteError)
        assert "StandinError" not in dualwrite.testing.__all__
        assert "StandinError" not in (inspect.getdoc(exceptions) or "")

    def test_old_name_warns(self):
        """``dualwrite.testing.StandinError`` still resolves, with a ``DeprecationWarning``."""
        with pytest.warns(DeprecationWarning, match="stripe_standin"):
            value = dualwrite.testing.StandinError
        assert value is stripe_standin.StandinError
        with warnings.catch_warnings(), pytest.raises(AttributeError):
            warnings.simplefilter("ignore")
            dualwrite.testing.NoSuchName  # noqa: B018
