"""The report's lines as plain data (``dualwrite.report._lines``): row tuples parsed from packed
rollup copies name exactly the counters ``parse_counters`` names, and ``CustomerLines`` reads,
compares and serialises as the list of models it stands for."""

from __future__ import annotations

import io
import json

from dualwrite.ledger import PACKED_FIELDS, parse_counters
from dualwrite.models import Stage
from dualwrite.report import (
    CustomerReport,
    LegTotals,
    Report,
    Verdict,
    _build,
    render_csv,
    write_csv,
    write_json,
)
from dualwrite.report._lines import (
    AT,
    COUNTERS,
    CustomerLines,
    RawLine,
    counters_of,
    line_model,
    parse_packed,
)

PACKED = [
    # The usual copy: known counters only, in the order a hash happened to hold them.
    "[1,0,40,1,492,26,40,2,40,3,492,4,40,5,492,6,40,7,492,8,40,9,492,12,0,13,0,24,0]",
    # Another shape, one counter beyond a double's exact integers.
    f"[1,1,{2**60 + 1},0,3,10,1,11,7]",
    # Failure codes ride in a final object.
    '[1,0,2,12,1,13,5,{"meter_failed_code:parameter_invalid":1}]',
    # Written before issue 20: every counter named.
    '{"events":4,"quantity":9,"legacy_failed_code:card_declined":2}',
    # A row with no counter at all.
    "[1]",
]


def _named(values: tuple[int, ...], others: dict[str, int] | None) -> dict[str, int]:
    """A row tuple back as the counters it names (zeros left out)."""
    named = {name: value for name, value in zip(COUNTERS, values, strict=True) if value}
    named.update(others or {})
    return named


def test_packed_rows_parse_to_the_counters_parse_counters_names():
    """Every kind of packed copy gives the same counters as ``parse_counters``, zeros aside, in
    one chunk or copy by copy (the fast path serves chunks without a final object)."""
    expected = [
        {name: value for name, value in row.items() if value} for row in parse_counters(PACKED)
    ]
    assert [_named(*row) for row in parse_packed(PACKED)] == expected
    assert [_named(*parse_packed([one])[0]) for one in PACKED] == expected
    assert parse_packed([PACKED[1]])[0][0][AT["quantity"]] == 2**60 + 1


def test_rows_grouped_by_customer_in_read_order(monkeypatch):
    """``_group`` holds a customer's only row as itself and several rows (across chunks too) in a
    list, in the order they were read; ``found`` is emptied on the way."""
    monkeypatch.setattr(_build, "_PARSE_CHUNK", 2)
    period_a, period_b = "20261101T000000Z/20261201T000000Z", "20261201T000000Z/20270101T000000Z"
    found = [
        (f"{period_a}|cus_one|api", "[1,0,1]"),
        (f"{period_a}|cus_many|api", "[1,0,2]"),
        (f"{period_b}|cus_many|api", "[1,0,3]"),
        (f"{period_b}|cus_many|other|name", "[1,0,4]"),
        (f"{period_a}|cus_two|api", '[1,0,5,{"meter_failed_code:x":1}]'),
        (f"{period_b}|cus_two|api", "[1,0,6]"),
    ]
    into: dict[str, _build.Held] = {}
    _build._group(found, into)
    assert found == []

    def events(held: _build.Held) -> object:
        if isinstance(held, list):
            return [(row[0], row[1], row[2][AT["events"]], row[3]) for row in held]
        return (held[0], held[1], held[2][AT["events"]], held[3])

    # Read from the end, a chunk at a time: the last chunk first, each chunk in order.
    assert {name: events(held) for name, held in into.items()} == {
        "cus_two": [
            (period_a, "api", 5, {"meter_failed_code:x": 1}),
            (period_b, "api", 6, None),
        ],
        "cus_many": [
            (period_b, "api", 3, None),
            (period_b, "other|name", 4, None),
            (period_a, "api", 2, None),
        ],
        "cus_one": (period_a, "api", 1, None),
    }


def test_counters_keep_the_packed_layout_first():
    """A packed position is the row tuple's position: no mapping between the two layouts."""
    assert COUNTERS[: len(PACKED_FIELDS)] == PACKED_FIELDS
    assert len(set(COUNTERS)) == len(COUNTERS)
    values, others = counters_of({"events": 3, "meter_retired_qty": 2, "x_code:y": 1})
    assert values[AT["events"]] == 3 and values[AT["meter_retired_qty"]] == 2
    assert others == {"x_code:y": 1}


def _raw(customer: str, quantity: int) -> RawLine:
    values, _ = counters_of(
        {
            "events": 2,
            "quantity": quantity,
            "legacy_expected_events": 2,
            "legacy_expected_qty": quantity,
            "legacy_accepted_events": 2,
            "legacy_accepted_qty": quantity,
        }
    )
    verdict = Verdict(ready=False, next_stage=Stage.SHADOW, reason="why")
    return (
        customer,
        Stage.LEGACY,
        ("api_requests",),
        ("2026-11-01",),
        values,
        0,
        "parity",
        None,
        {"legacy:card_declined": 1} if quantity == 7 else None,
        None,
        verdict,
        None,
    )


class TestCustomerLines:
    """``Report.customers`` as ``build_report`` returns it."""

    def test_reads_as_a_list_of_validated_lines(self):
        """Indexing, slicing and iterating give lines equal to their validated copies."""
        lines = CustomerLines([_raw("cus_a", 5), _raw("cus_b", 7)])
        assert len(lines) == 2 and lines[1].customer == "cus_b"
        assert [line.customer for line in lines[:1]] == ["cus_a"]
        for line in lines:
            copy = CustomerReport.model_validate(line.model_dump())
            assert copy == line and copy.model_fields_set == line.model_fields_set
        assert lines[1].failures == {"legacy:card_declined": 1} and lines[0].failures == {}
        assert lines[0].legacy == LegTotals(
            expected_events=2, expected_qty=5, accepted_events=2, accepted_qty=5
        )
        assert lines == list(lines) and list(lines) == lines and lines != [lines[0]]

    def test_a_line_made_twice_shares_nothing_mutable(self):
        """Each read makes its own lists and dicts: changing one read changes no other."""
        lines = CustomerLines([_raw("cus_a", 7)])
        first = lines[0]
        first.failures["meter:x"] = 1
        first.periods.append("2026-12-01")
        assert lines[0].failures == {"legacy:card_declined": 1}
        assert lines[0].periods == ["2026-11-01"]

    def test_serialises_as_the_list_it_stands_for(self):
        """A report holding ``CustomerLines`` dumps (JSON, indented JSON, Python) exactly as one
        holding the same lines in a list, and reads back equal."""
        raws = [_raw("cus_a", 5), _raw("cus_b", 7)]
        values: dict[str, object] = {
            "generated_at": 1.5,
            "since": None,
            "until": None,
            "divergences": [],
            "outbox": None,
        }
        lazy = Report.model_validate({**values, "customers": []}).model_copy(
            update={"customers": CustomerLines(raws)}
        )
        listed = Report.model_validate({**values, "customers": [line_model(raw) for raw in raws]})
        assert lazy.model_dump_json() == listed.model_dump_json()
        assert lazy.model_dump_json(indent=2) == listed.model_dump_json(indent=2)
        assert lazy.model_dump() == listed.model_dump()
        assert json.loads(lazy.model_dump_json())["customers"][1]["customer"] == "cus_b"
        assert Report.model_validate_json(lazy.model_dump_json()) == lazy


class TestStreamedOutput:
    """``write_json`` and ``write_csv`` write what the one-string renderings hold."""

    def _report(self, raws: list[RawLine]) -> Report:
        empty = Report.model_validate(
            {"generated_at": 1.5, "since": "2026-11-01", "until": None, "divergences": []}
            | {"outbox": None, "customers": [], "backpressure": {"meter_waits": 2}}
        )
        return empty.model_copy(update={"customers": CustomerLines(raws)})

    def test_json_equals_model_dump_json(self):
        """Compact and indented, with lines and without."""
        for raws in ([_raw("cus_a", 5), _raw("cus_b", 7)], [_raw("cus_a", 5)], []):
            report = self._report(raws)
            for indent in (None, 2, 4):
                out = io.StringIO()
                write_json(report, out, indent=indent)
                assert out.getvalue() == report.model_dump_json(indent=indent), (raws, indent)

    def test_csv_equals_render_csv(self):
        """The same text, written a line at a time."""
        report = self._report([_raw("cus_a", 5), _raw("cus_b", 7)])
        out = io.StringIO()
        write_csv(report, out)
        assert out.getvalue() == render_csv(report) and out.getvalue().count("\n") == 3
