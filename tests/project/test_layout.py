"""The tests mirror the packages (issue 18): no test module at the top of ``tests/``, and every
folder of tests is named for a part of dualwrite (or is one of the few cross-cutting folders)."""

from pathlib import Path

import dualwrite

TESTS = Path(__file__).resolve().parents[1]
PACKAGE = Path(dualwrite.__file__).parent
# Folders named for a top-level module or a concept spread over a few modules, not a package.
CONCEPTS = {
    "engine": "engine.py and the claim, idempotency, rate limits, periods it uses",
    "middleware": "middleware.py, wsgi.py, the HTTP edge, the SDK hook",
    "config": "config.py, config_template.py",
    "observability": "dualwrite/metrics/, logging.py, health.py",
    "scenarios": "end-to-end runs across the whole system",
    "project": "whole-project rules: imports, docs, exports, deploy files",
    "standin": "stripe_standin/, the judge of the other tests",
}


def test_no_test_module_at_the_top() -> None:
    """A new test goes in the folder of what it tests, not beside the shared helpers."""
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []


def test_every_folder_is_named_for_what_it_tests() -> None:
    """Each folder is a dualwrite package or one of the named concepts, and is a package."""
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    for folder in sorted(p for p in TESTS.iterdir() if p.is_dir() and list(p.glob("test_*.py"))):
        assert folder.name in packages | set(CONCEPTS), (
            f"tests/{folder.name}/ is named for nothing in dualwrite/: rename it after the package "
            "it tests, or add it to CONCEPTS with what it covers"
        )
        assert (folder / "__init__.py").exists(), f"tests/{folder.name}/ needs an __init__.py"
