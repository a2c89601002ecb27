"""The ``dualwrite`` command.

Every command reads its settings once (``--config`` / ``DUALWRITE_CONFIG`` plus the environment) and
hands them to the library; the commands themselves only parse arguments and print. One module per
group of commands: ``_flags`` (stages), ``_report``, ``_reconcile``, ``_ops`` (worker, dead
letters), ``_serve`` (serve, demo, the stand-in), ``_meters`` (meters plan|apply),
``_backfill``, ``_cutover`` (rollout, cutover, rollback, guard), ``_config`` (config init|check),
``_durability`` (Redis's settings and data-loss record).
``_common`` also holds the conventions every command follows: ``-c/--config`` before or after
the command, ``-h``, ``--version``, commands listed by section, values shown as what to type.
"""

from __future__ import annotations

from dualwrite.cli import (
    _backfill,
    _config,
    _cutover,
    _durability,
    _flags,
    _meters,
    _ops,
    _reconcile,
    _report,
    _serve,
)
from dualwrite.cli._common import app

__all__ = ["app", "main"]

# Imported for the commands they register on ``app``.
_COMMANDS = (
    _backfill,
    _config,
    _cutover,
    _durability,
    _flags,
    _meters,
    _ops,
    _reconcile,
    _report,
    _serve,
)


def main() -> None:
    """Console-script entry point."""
    app()
