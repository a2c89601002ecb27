"""Reading a usage export (CSV) for ``dualwrite backfill --from-export``.

Columns (a header row names them, in any order): ``customer``, ``subscription_item`` or
``event_name`` (one of the two per row), ``quantity``, ``timestamp`` (Unix seconds or ISO 8601),
``identifier`` (the usage's own id: it makes the meter event's identifier, so a rerun is harmless).
The whole file is checked before anything is sent: one bad row refuses the file, naming the row, the
column and the fix.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dualwrite.exceptions import BackfillInputError
from dualwrite.models import MAX_METER_VALUE

__all__ = ["BackfillInputError", "ExportRow", "read_export"]

_REQUIRED = ("customer", "quantity", "timestamp", "identifier")
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One valid row of a usage export."""

    line: int
    customer: str
    subscription_item: str | None
    event_name: str | None
    quantity: int
    timestamp: int
    identifier: str


def parse_time(value: str) -> int:
    """Unix seconds from digits or an ISO 8601 instant (UTC unless it says otherwise).

    Raises:
        ValueError: it is neither.
    """
    text = value.strip()
    if text.isdigit():
        return int(text)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def _id(value: str) -> bool:
    return bool(value) and len(value) <= 255 and set(value) <= _ID_CHARS


def _row(path: Path, line: int, raw: dict[str, str]) -> ExportRow:
    def bad(column: str, why: str) -> BackfillInputError:
        value = raw.get(column)
        shown = "" if value is None else f" {value[:60]!r}"
        return BackfillInputError(f"{path}, line {line}: column {column}{shown} {why}")

    customer = (raw.get("customer") or "").strip()
    if not _id(customer):
        raise bad("customer", "is not a Stripe customer id; fix: give one like cus_123")
    item = (raw.get("subscription_item") or "").strip() or None
    event_name = (raw.get("event_name") or "").strip() or None
    if item is None and event_name is None:
        raise bad("subscription_item", "and event_name are both empty; fix: give one of them")
    if item is not None and not _id(item):
        raise bad("subscription_item", "is not a subscription item id; fix: give one like si_123")
    quantity_text = (raw.get("quantity") or "").strip()
    if not quantity_text.isdigit() or int(quantity_text) > MAX_METER_VALUE:
        raise bad("quantity", f"is not a whole number from 0 to {MAX_METER_VALUE}")
    try:
        timestamp = parse_time(raw.get("timestamp") or "")
    except ValueError:
        raise bad("timestamp", "is not a time; fix: Unix seconds or ISO 8601") from None
    identifier = (raw.get("identifier") or "").strip()
    if not identifier or len(identifier) > 200 or not identifier.isprintable():
        raise bad("identifier", "must be 1 to 200 printable characters (the usage's own id)")
    return ExportRow(line, customer, item, event_name, int(quantity_text), timestamp, identifier)


def read_export(path: Path) -> list[ExportRow]:
    """Every row of the export, checked.

    Raises:
        BackfillInputError: the file cannot be read, lacks a column, or a row is bad.
    """
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            missing = [name for name in _REQUIRED if name not in columns]
            if not columns & {"subscription_item", "event_name"}:
                missing.append("subscription_item or event_name")
            if missing:
                msg = (
                    f"{path}: the header lacks column(s) {', '.join(missing)}; fix: the first row "
                    "names the columns customer, subscription_item or event_name, quantity, "
                    "timestamp, identifier"
                )
                raise BackfillInputError(msg)
            rows = [_row(path, reader.line_num, raw) for raw in reader]
    except OSError as exc:
        msg = f"--from-export {str(path)!r} cannot be read ({exc.strerror})"
        raise BackfillInputError(msg) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        msg = f"--from-export {str(path)!r} is not a UTF-8 CSV file: {exc}"
        raise BackfillInputError(msg) from None
    seen: dict[str, int] = {}
    for row in rows:
        first = seen.setdefault(row.identifier, row.line)
        if first != row.line:
            msg = (
                f"{path}, line {row.line}: column identifier {row.identifier!r} repeats line "
                f"{first}; fix: each usage row needs its own identifier"
            )
            raise BackfillInputError(msg)
    return rows
