"""Compatibility: the commit of an accepted event lives in ``dualwrite.ledger`` now."""

from __future__ import annotations

from dualwrite.ledger._commit import (
    _APPLY as _APPLY,  # the script, for tests that watch its SHA
    IN_DOUBT_MARKER_TTL,
    SPOOL_MARKER_TTL,
    Commit,
    CommitWriter,
)

__all__ = ["IN_DOUBT_MARKER_TTL", "SPOOL_MARKER_TTL", "Commit", "CommitWriter"]
