"""Writing ``[[meters]]`` mappings into the user's TOML config file, keeping everything else as it is.

``tomlkit`` keeps comments, key order and formatting of the rest of the file. The new text is
validated as dualwrite settings before it replaces the file (atomically: a temporary file in the same
directory, then a rename), so a failed apply never leaves a half-written or invalid config.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tomlkit
from tomlkit.items import AoT, Array, Table

from dualwrite.config import Settings
from dualwrite.exceptions import ConfigError

__all__ = ["MeterEntry", "merge_meters", "write_config"]


@dataclass(frozen=True, slots=True)
class MeterEntry:
    """One ``[[meters]]`` mapping to write: the event name, its legacy prices and lookup keys."""

    event_name: str
    legacy_prices: tuple[str, ...]
    lookup_keys: tuple[str, ...]
    meter_id: str
    customer_payload_key: str = "stripe_customer_id"
    value_payload_key: str = "value"
    meter_prices: tuple[tuple[str, str], ...] = ()
    """(legacy price, meter-backed price) pairs for ``meter_prices``."""


def _union(table: Table, key: str, values: tuple[str, ...]) -> list[str]:
    """Add ``values`` missing from the array ``table[key]``; return what was added."""
    current = table.get(key)
    if current is None:
        if not values:
            return []
        table[key] = tomlkit.array()
        current = table[key]
    if not isinstance(current, Array | list):
        msg = f"[[meters]] {key} must be a list of strings"
        raise ConfigError(msg)
    added = [value for value in values if value not in [str(v) for v in current]]
    current.extend(added)
    return added


def _merge_prices(table: Table, pairs: tuple[tuple[str, str], ...]) -> list[str]:
    """Add the ``meter_prices`` pairs whose legacy price ``table`` does not map yet; return what
    was added (a legacy price already mapped keeps its mapping: the plan checked it)."""
    if not pairs:
        return []
    current = table.get("meter_prices")
    if current is None:
        table["meter_prices"] = tomlkit.inline_table()
        current = table["meter_prices"]
    if not isinstance(current, dict):
        msg = "[[meters]] meter_prices must be a table of legacy price = meter-backed price"
        raise ConfigError(msg)
    added = [f"{old} = {new}" for old, new in pairs if old not in current]
    for old, new in pairs:
        current.setdefault(old, new)
    return added


def merge_meters(text: str, entries: list[MeterEntry]) -> tuple[str, list[str]]:
    """The config text with ``entries`` merged into its ``[[meters]]`` tables, and what changed.

    An existing table with the same ``event_name`` gains the missing prices and lookup keys; any
    other entry is appended as a new table. Nothing else in the file changes.

    Raises:
        ConfigError: the text is not TOML, or ``meters`` is not an array of tables.
    """
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        msg = f"the config file is not valid TOML: {exc}"
        raise ConfigError(msg) from None
    meters = doc.get("meters")
    if meters is None:
        meters = tomlkit.aot()
        doc.append("meters", meters)
    if not isinstance(meters, AoT):
        msg = "meters in the config file is not a list of [[meters]] tables; write it as [[meters]]"
        raise ConfigError(msg)
    changes: list[str] = []
    for entry in entries:
        existing = next((t for t in meters if t.get("event_name") == entry.event_name), None)
        if existing is not None:
            added = _union(existing, "legacy_prices", entry.legacy_prices)
            added += _union(existing, "lookup_keys", entry.lookup_keys)
            added += _merge_prices(existing, entry.meter_prices)
            if added:
                changes.append(f"[[meters]] {entry.event_name}: added {', '.join(added)}")
            continue
        table = tomlkit.table()
        table.trivia.indent = "\n"  # a blank line before each new [[meters]] header
        table.add(tomlkit.comment(f"meter {entry.meter_id} (dualwrite meters apply)"))
        table.add("event_name", entry.event_name)
        if entry.customer_payload_key != "stripe_customer_id":
            table.add("customer_payload_key", entry.customer_payload_key)
        if entry.value_payload_key != "value":
            table.add("value_payload_key", entry.value_payload_key)
        table.add("legacy_prices", list(entry.legacy_prices))
        if entry.lookup_keys:
            table.add("lookup_keys", list(entry.lookup_keys))
        _merge_prices(table, entry.meter_prices)
        meters.append(table)
        changes.append(
            f"[[meters]] {entry.event_name}: new, legacy_prices {', '.join(entry.legacy_prices)}"
        )
    return tomlkit.dumps(doc), changes


def write_config(path: Path, text: str) -> None:
    """Replace the config file with ``text`` once it loads as valid settings (atomic rename).

    Raises:
        ConfigError: the new text is not valid configuration, or the file cannot be written.
    """
    try:
        mode = path.stat().st_mode & 0o777
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        msg = f"cannot write the config file {str(path)!r}: {exc.strerror}"
        raise ConfigError(msg) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Settings.load(tmp)
        tmp.chmod(mode)
        tmp.replace(path)
    except OSError as exc:
        msg = f"cannot write the config file {str(path)!r}: {exc.strerror}"
        raise ConfigError(msg) from None
    finally:
        tmp.unlink(missing_ok=True)
