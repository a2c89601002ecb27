"""Only ``dualwrite.config`` reads the environment: every variable dualwrite honours is found there."""

from __future__ import annotations

import ast
from pathlib import Path

import dualwrite

PACKAGE = Path(dualwrite.__file__).parent


def environment_reads(source: str) -> list[int]:
    """The lines of ``source`` that read the process environment (``os.environ``, ``os.getenv``,
    ``from os import environ/getenv``)."""
    names = ("environ", "environb", "getenv")
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr in names) or (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name in names for alias in node.names)
        ):
            lines.append(node.lineno)
    return lines


def test_only_config_reads_the_environment():
    """No module but ``config.py`` reads an environment variable."""
    found = {
        path.relative_to(PACKAGE).as_posix(): reads
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "config.py" or path.parent != PACKAGE
        if (reads := environment_reads(path.read_text()))
    }
    assert found == {}


def test_a_read_is_found():
    """The scan sees each way of reading the environment (so the test above can fail)."""
    assert environment_reads("import os\nos.environ.get('X')\n") == [2]
    assert environment_reads("import os\nos.getenv('X')\n") == [2]
    assert environment_reads("from os import environ\n") == [1]
    assert environment_reads("import os\nos.path.join('a')\n") == []
