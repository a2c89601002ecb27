"""The ``dualwrite`` command.

Every command reads its settings once (``--config`` / ``DUALWRITE_CONFIG`` plus the environment) and
hands them to the library; the commands themselves only parse arguments and print. One module per
group of commands: ``_flags`` (stages), ``_report``, ``_ops`` (worker, dead letters), ``_serve``
(serve, demo, the stand-in).
"""

from __future__ import annotations

from dualwrite.cli import _flags, _ops, _report, _serve
from dualwrite.cli._common import app

__all__ = ["app", "main"]

_COMMANDS = (_flags, _ops, _report, _serve)  # imported for the commands they register on ``app``


def main() -> None:
    """Console-script entry point."""
    app()
