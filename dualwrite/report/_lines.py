"""A report's lines as plain data: counters as fixed-position tuples, lines as tuples, and the
``CustomerReport`` models made only when a line is looked at.

Issue 20 asked for a report over a million customers in under 10 s and 2 GiB. Four models per
line (the line, two ``LegTotals``, their dicts) were about 2.4 KiB a customer and most of the
build's time, and named counters (a dict per ledger row) the rest. Here a row's counters are a
tuple in the order of ``COUNTERS`` (the rollups' packed layout, then the few line counters it
lacks), parsed from the packed row copies without a dict per row; a line is a tuple of its values
(``RawLine``); and ``CustomerLines`` is the ``Report.customers`` sequence that holds them and
builds each line's models when asked for them (the JSON, the CSV, the table, the guard and the
report page all read it as a sequence of ``CustomerReport``).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, overload

from dualwrite.ledger import PACKED_FIELDS, DivergenceRecord
from dualwrite.models import Stage
from dualwrite.report._models import (
    CustomerDrift,
    CustomerReport,
    CustomerStatus,
    LegTotals,
    Verdict,
    legacy_held,
    trusted,
)

__all__ = [
    "AT",
    "COUNTERS",
    "CustomerLines",
    "RawLine",
    "RowCounters",
    "counters_of",
    "line_difference",
    "line_model",
    "parse_columns",
    "parse_packed",
    "sum_counters",
]

_LEG_FIELDS = tuple(LegTotals.model_fields)
_LINE_COUNTERS = (
    *(f"legacy_{field}" for field in _LEG_FIELDS),
    *(f"meter_{field}" for field in _LEG_FIELDS),
    "events",
    "quantity",
    "translated_events",
    "divergent_events",
    "delayed_events",
)
COUNTERS: tuple[str, ...] = PACKED_FIELDS + tuple(
    name for name in _LINE_COUNTERS if name not in PACKED_FIELDS
)
"""The counters a row's tuple holds, by position: the rollups' packed layout first (so a packed
row's positions need no mapping), then the line's counters that layout lacks."""
AT: dict[str, int] = {name: at for at, name in enumerate(COUNTERS)}
"""A counter's position in ``COUNTERS``."""
_ZERO = (0,) * len(COUNTERS)

RowCounters = tuple[tuple[int, ...], dict[str, int] | None]
"""A row's counters: the ``COUNTERS`` tuple, and any other counters (failure codes) by name."""


def counters_of(counters: Mapping[str, int]) -> RowCounters:
    """Named counters (a ledger hash as read) as a row's tuple and its other counters."""
    values = list(_ZERO)
    others: dict[str, int] | None = None
    for name, value in counters.items():
        at = AT.get(name)
        if at is not None:
            values[at] = value
        else:
            if others is None:
                others = {}
            others[name] = value
    return tuple(values), others


# One getter per packed shape (which positions a row holds, in which order): rows written by the
# same code paths share a handful of shapes, so a row becomes its tuple in one C call.
_SHAPES: dict[tuple[int, ...], Any] = {}


def _getter(shape: tuple[int, ...]) -> Any:
    where = {at: 2 * index + 2 for index, at in enumerate(shape)}
    zero = 2 * len(shape) + 1  # a 0 appended after the row's last value
    getter = operator.itemgetter(*(where.get(at, zero) for at in range(len(COUNTERS))))
    _SHAPES[shape] = getter
    return getter


_ODD = operator.itemgetter(slice(1, None, 2))
_CALL: Any = operator.call  # getter(row), in C


def parse_packed(packed: Sequence[str]) -> list[RowCounters]:
    """The counters of many rollup row copies (``dualwrite.ledger.parse_counters``' input), parsed
    at once into row tuples: exactly the counters ``parse_counters`` would name."""
    values, others = parse_columns(packed)
    return list(zip(values, others, strict=True))


def parse_columns(
    packed: Sequence[str],
) -> tuple[list[tuple[int, ...]], list[dict[str, int] | None]]:
    """``parse_packed`` as two lists, the rows' tuples and their other counters (no pair made per
    row: the report parses a million)."""
    text = "[" + ",".join(packed) + "]"
    rows: list[Any] = json.loads(text)
    if "{" not in text:
        # Every copy is a packed list of known counters (the usual case): each becomes its tuple
        # through its shape's getter, without a Python-level step per row.
        shapes = list(map(tuple, map(_ODD, rows)))
        for shape in set(shapes).difference(_SHAPES):
            _getter(shape)
        for row in rows:
            row.append(0)
        getters = map(_SHAPES.get, shapes)
        return list(map(_CALL, getters, rows)), [None] * len(rows)
    parsed: list[RowCounters] = []
    for row in rows:
        if type(row) is dict:  # a copy written before issue 20: named counters
            parsed.append(counters_of(row))
        elif type(row[-1]) is dict:  # a packed copy with other counters (failure codes)
            named = dict(zip(map(PACKED_FIELDS.__getitem__, row[1:-1:2]), row[2:-1:2], strict=True))
            named.update(row[-1])
            parsed.append(counters_of(named))
        else:
            row.append(0)
            parsed.append(
                ((_SHAPES.get(tuple(row[1:-1:2])) or _getter(tuple(row[1:-1:2])))(row), None)
            )
    return [values for values, _ in parsed], [others for _, others in parsed]


def sum_counters(values: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Position by position, the sum of row tuples."""
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(map(operator.add, values[0], values[1]))
    return tuple(map(sum, zip(*values, strict=True)))


RawLine = tuple[
    str,  # customer
    Stage,
    tuple[str, ...],  # event names
    tuple[str, ...],  # periods
    tuple[int, ...],  # the line's counters (COUNTERS)
    int,  # unfinished events
    CustomerStatus,
    float | None,  # difference_pct
    dict[str, int] | None,  # failures
    list[DivergenceRecord] | None,  # recent divergences
    Verdict,
    CustomerDrift | None,
]
"""One customer's line as plain values (``CustomerLines`` builds its models from them)."""

# Positions in a ``RawLine`` read outside ``line_model`` (filters, ranking, the data-loss rewrite).
CUSTOMER: Final = 0
VALUES: Final = 4
STATUS: Final = 6
DIFFERENCE_PCT: Final = 7
VERDICT: Final = 10
DRIFT: Final = 11

_LEGACY = operator.itemgetter(*(AT[f"legacy_{field}"] for field in _LEG_FIELDS))
_METER = operator.itemgetter(*(AT[f"meter_{field}"] for field in _LEG_FIELDS))
_EVENTS, _QUANTITY = AT["events"], AT["quantity"]
_TRANSLATED, _DIVERGENT, _DELAYED = (
    AT["translated_events"],
    AT["divergent_events"],
    AT["delayed_events"],
)


_LEGACY_ACCEPTED, _LEGACY_RETIRED = AT["legacy_accepted_qty"], AT["legacy_retired_qty"]
_METER_ACCEPTED = AT["meter_accepted_qty"]


def line_difference(values: tuple[int, ...]) -> int:
    """``CustomerReport.difference`` of a line's counters (``COUNTERS``)."""
    return legacy_held(values[_LEGACY_ACCEPTED], values[_LEGACY_RETIRED]) - values[_METER_ACCEPTED]


def line_model(raw: RawLine) -> CustomerReport:
    """The ``CustomerReport`` of a raw line (built without validation: ``trusted``)."""
    (
        customer,
        stage,
        event_names,
        periods,
        values,
        unfinished,
        status,
        difference_pct,
        failures,
        recent,
        verdict,
        drift,
    ) = raw
    return trusted(
        CustomerReport,
        {
            "customer": customer,
            "stage": stage,
            "event_names": list(event_names),
            "periods": list(periods),
            "events": values[_EVENTS],
            "quantity": values[_QUANTITY],
            "legacy": trusted(LegTotals, dict(zip(_LEG_FIELDS, _LEGACY(values), strict=True))),
            "meter": trusted(LegTotals, dict(zip(_LEG_FIELDS, _METER(values), strict=True))),
            "translated_events": values[_TRANSLATED],
            "divergent_events": values[_DIVERGENT],
            "delayed_events": values[_DELAYED],
            "unfinished_events": unfinished,
            "status": status,
            "difference_pct": difference_pct,
            "failures": dict(failures) if failures else {},
            "recent_divergences": list(recent) if recent else [],
            "verdict": verdict,
            "drift": drift,
        },
    )


class CustomerLines(Sequence[CustomerReport]):
    """``Report.customers`` as built: the raw lines, each made a ``CustomerReport`` when read
    (indexing, slicing, iterating), never all of them at once. Equal to a list of equal lines."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[RawLine]):
        self._raw = raw

    @property
    def raw(self) -> Sequence[RawLine]:
        """The lines as plain values, for renderers that need no models."""
        return self._raw

    def __len__(self) -> int:
        return len(self._raw)

    @overload
    def __getitem__(self, index: int) -> CustomerReport: ...

    @overload
    def __getitem__(self, index: slice) -> list[CustomerReport]: ...

    def __getitem__(self, index: int | slice) -> CustomerReport | list[CustomerReport]:
        if isinstance(index, slice):
            return [line_model(raw) for raw in self._raw[index]]
        return line_model(self._raw[index])

    def __iter__(self) -> Iterator[CustomerReport]:
        return map(line_model, self._raw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(
            mine == theirs for mine, theirs in zip(self, other, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CustomerLines({len(self._raw):,} lines)"
