"""Compatibility: the ledger rollups live in ``dualwrite.ledger`` now."""

from __future__ import annotations

from dualwrite.ledger._rollups import (
    PACKED_FIELDS,
    PACKED_VERSION,
    ROLLUP_LUA,
    RolledRow,
    backfill,
    collector_paused,
    list_customer_rows,
    parse_counters,
    read_customer_rows,
    read_packed,
    read_rollups,
    rollup_key,
)

__all__ = [
    "PACKED_FIELDS",
    "PACKED_VERSION",
    "ROLLUP_LUA",
    "RolledRow",
    "backfill",
    "collector_paused",
    "list_customer_rows",
    "parse_counters",
    "read_customer_rows",
    "read_packed",
    "read_rollups",
    "rollup_key",
]
