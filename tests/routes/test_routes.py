"""Usage routes: matching requests to routes, and reading a UsageEvent out of a matched request."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.responses import PlainTextResponse
from starlette.routing import Match, Route

from dualwrite.config import ItemMapping, UsageRoute
from dualwrite.exceptions import ConfigError, UsageInputError
from dualwrite.models import MAX_METER_VALUE, UsageEvent
from dualwrite.routes import MAX_FUTURE_SECONDS, RouteMatch, RouteTable, build_event

NOW = 1_700_000_000
CODES = {"parameter_missing", "parameter_invalid_integer", "parameter_invalid"}
FORM = (b"content-type", b"application/x-www-form-urlencoded")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_route(path: str = "/usage/{customer}", **fields: Any) -> UsageRoute:
    """A usage route with sensible defaults for the fields a test does not care about."""
    data: dict[str, Any] = {
        "path": path,
        "customer": "path:customer",
        "event_name": "const:api_calls",
        "quantity": "json:quantity",
    }
    data.update(fields)
    return UsageRoute.model_validate({key: value for key, value in data.items() if value})


def event(
    route: UsageRoute,
    *,
    params: dict[str, str] | None = None,
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    items: dict[str, ItemMapping] | None = None,
) -> UsageEvent:
    """Build the event for ``route`` from the given request parts."""
    match = RouteMatch(route, {"customer": "cus_1"} if params is None else params)
    return build_event(
        match,
        query_string=query,
        headers=headers,
        body=body,
        now=NOW,
        items=items or {},
    )


def refused(call: Callable[[], object]) -> UsageInputError:
    """The UsageInputError ``call`` raises (fails the test if it returns)."""
    with pytest.raises(UsageInputError) as info:
        call()
    return info.value


def outcome(call: Callable[[], UsageEvent]) -> UsageEvent | UsageInputError:
    """Run ``call``: it must give a valid event or a well-formed UsageInputError, nothing else."""
    try:
        result = call()
    except UsageInputError as exc:
        assert exc.code in CODES
        assert exc.param
        assert exc.message == str(exc)
        assert len(exc.message) < 400
        return exc
    assert isinstance(result, UsageEvent)
    assert 0 <= result.quantity <= MAX_METER_VALUE
    assert 0 < result.timestamp <= NOW + MAX_FUTURE_SECONDS
    return result


class TestMatch:
    """RouteTable.match: method, template, convertors and misses."""

    table = RouteTable(
        [
            make_route("/usage/{customer}"),
            make_route("/items/{si}/usage", customer="", subscription_item="path:si"),
            make_route("/count/{customer}/{n:int}", quantity="path:n"),
            make_route("/files/{customer}/{rest:path}", quantity="const:1"),
            make_route("/search", method="GET", customer="header:X-Customer", quantity="const:1"),
        ]
    )

    def test_path_parameters_are_captured_raw(self) -> None:
        """A template parameter comes back as the text in the path."""
        match = self.table.match("POST", "/usage/cus_42")
        assert match is not None
        assert match.route.path == "/usage/{customer}"
        assert match.path_params == {"customer": "cus_42"}

    def test_int_convertor_matches_digits_only(self) -> None:
        """``{n:int}`` matches digits (kept as text) and nothing else."""
        match = self.table.match("POST", "/count/cus_1/007")
        assert match is not None
        assert match.path_params == {"customer": "cus_1", "n": "007"}
        assert self.table.match("POST", "/count/cus_1/7x") is None

    def test_path_convertor_spans_slashes(self) -> None:
        """``{rest:path}`` captures the remainder, slashes included."""
        match = self.table.match("POST", "/files/cus_1/a/b/c")
        assert match is not None
        assert match.path_params["rest"] == "a/b/c"

    def test_other_method_misses(self) -> None:
        """A route answers its own method only; methods are case-sensitive, as in HTTP."""
        assert self.table.match("GET", "/usage/cus_1") is None
        assert self.table.match("post", "/usage/cus_1") is None
        assert self.table.match("PUT", "/usage/cus_1") is None

    def test_get_route_answers_head(self) -> None:
        """As in Starlette, a GET route also serves HEAD (the handler runs, so usage is counted)."""
        assert self.table.match("GET", "/search") is not None
        assert self.table.match("HEAD", "/search") is not None

    def test_trailing_slash_is_not_folded(self) -> None:
        """``/usage/x/`` is not ``/usage/x`` (Starlette redirects it; the retry is what counts)."""
        assert self.table.match("POST", "/usage/cus_1/") is None
        assert self.table.match("GET", "/search/") is None
        slashed = RouteTable([make_route("/usage/{customer}/")])
        assert slashed.match("POST", "/usage/cus_1") is None
        assert slashed.match("POST", "/usage/cus_1/") is not None

    def test_unrelated_paths_miss(self) -> None:
        """Paths outside every template, and an empty table, give None."""
        for path in ("/", "/usage", "/usage/", "/usagex/cus_1", "/static/app.js", ""):
            assert self.table.match("POST", path) is None
        assert RouteTable([]).match("POST", "/usage/cus_1") is None

    def test_first_matching_route_wins(self) -> None:
        """Routes are tried in configuration order."""
        first = make_route("/usage/{customer}", quantity="const:1")
        second = make_route("/usage/{customer}", quantity="const:2")
        match = RouteTable([first, second]).match("POST", "/usage/cus_1")
        assert match is not None
        assert match.route is first

    def test_routes_keep_their_order(self) -> None:
        """``routes`` lists the configured routes in the order they are tried."""
        assert [route.path for route in self.table.routes][:2] == [
            "/usage/{customer}",
            "/items/{si}/usage",
        ]

    @FUZZ
    @given(
        template=st.sampled_from(
            ["/usage/{customer}", "/a/{x:int}/b", "/f/{rest:path}", "/s", "/{x}/y", "/u/{id:uuid}"]
        ),
        path=st.one_of(
            st.text(alphabet="/abusgey0129-\n.", max_size=20).map(lambda text: "/" + text),
            st.sampled_from(["/usage/c\n", "/s\n", "/a/12/b", "/f/", "/u/" + "0" * 32]),
        ),
        method=st.sampled_from(["POST", "GET", "HEAD"]),
    )
    def test_agrees_with_starlette(self, template: str, path: str, method: str) -> None:
        """A request matches exactly when Starlette's router would send it to the same route."""
        route_method = "GET" if template == "/s" else "POST"
        fields: dict[str, Any] = {"customer": "const:c", "quantity": "const:1"}
        ours = RouteTable([make_route(template, method=route_method, **fields)]).match(method, path)
        theirs = Route(template, PlainTextResponse, methods=[route_method])
        scope = {"type": "http", "path": path, "root_path": "", "method": method}
        kind, child = theirs.matches(scope)
        assert (ours is not None) == (kind is Match.FULL)
        if ours is not None:
            converted = {
                name: theirs.param_convertors[name].convert(value)
                for name, value in ours.path_params.items()
            }
            assert converted == child["path_params"]


class TestRouteTableConfig:
    """RouteTable refuses at start-up what would fail on every request."""

    @pytest.mark.parametrize(
        ("fields", "needle"),
        [
            ({"path": "/u/{customer:slug}"}, "unknown path convertor 'slug'"),
            ({"path": "/u/{customer}/{customer}"}, "Duplicated param"),
            ({"path": "/u/{customer}/{1n}", "quantity": "path:1n"}, "no path parameter '1n'"),
            ({"quantity": "form:quantity", "timestamp": "json:ts"}, "both json: and form:"),
            ({"quantity": "json:usage..quantity"}, "empty segment"),
            ({"quantity": "header:X Quantity"}, "not a valid header name"),
            ({"identifier": "const:same"}, "constant identifier"),
            ({"timestamp": "const:1700000000"}, "only constant timestamp is 'now'"),
            ({"quantity": "const:ten"}, "quantity must be a whole number"),
            ({"action": "const:replace"}, "action must be 'increment' or 'set'"),
            ({"customer": "const:not a customer"}, "constant customer is invalid"),
        ],
    )
    def test_bad_routes_are_refused(self, fields: dict[str, Any], needle: str) -> None:
        """Each misconfiguration raises ConfigError naming the route and the problem."""
        path = fields.pop("path", "/u/{customer}")
        with pytest.raises(ConfigError, match="route POST /u/") as info:
            RouteTable([make_route(path, **fields)])
        assert needle in str(info.value)

    def test_good_constants_are_accepted(self) -> None:
        """Valid constants (and a 'now' timestamp) build a table."""
        route = make_route(
            "/u",
            customer="const:cus_1",
            quantity="const:1",
            timestamp="const:now",
            action="const:set",
        )
        assert RouteTable([route]).match("POST", "/u") is not None


class TestSources:
    """Each FieldSource kind reads the field from its place in the request."""

    def test_path(self) -> None:
        """``path:`` reads a template parameter."""
        route = make_route("/u/{customer}/{n}", quantity="path:n")
        assert event(route, params={"customer": "cus_7", "n": "12"}).quantity == 12

    def test_query(self) -> None:
        """``query:`` reads the query string, percent- and plus-decoded."""
        route = make_route(quantity="query:qty", event_name="query:meter")
        got = event(route, query=b"other=1&qty=0%33&meter=api%2Ecalls&x=a+b")
        assert (got.quantity, got.event_name) == (3, "api.calls")

    def test_json_dotted_name(self) -> None:
        """``json:a.b`` walks nested objects."""
        route = make_route(quantity="json:usage.quantity", customer="json:usage.who.id")
        body = json.dumps({"usage": {"quantity": 9, "who": {"id": "cus_9"}}}).encode()
        got = event(route, body=body)
        assert (got.quantity, got.customer) == (9, "cus_9")

    def test_form(self) -> None:
        """``form:`` reads an urlencoded body, with or without a charset."""
        route = make_route(quantity="form:quantity")
        content_type = (b"Content-Type", b"application/x-www-form-urlencoded; charset=utf-8")
        assert event(route, headers=[content_type], body=b"quantity=4&x=y").quantity == 4
        assert event(route, body=b"quantity=5").quantity == 5

    def test_header_is_case_insensitive(self) -> None:
        """``header:`` finds the header whatever the case on either side, and trims blanks."""
        route = make_route(customer="header:X-Customer-Id", quantity="header:x-quantity")
        got = event(route, headers=[(b"x-customer-id", b" cus_3 "), (b"X-QUANTITY", b"6")])
        assert (got.customer, got.quantity) == ("cus_3", 6)

    def test_const(self) -> None:
        """``const:`` supplies a literal."""
        route = make_route(quantity="const:1", event_name="const:search")
        got = event(route)
        assert (got.quantity, got.event_name) == (1, "search")

    def test_body_is_left_alone_when_no_field_reads_it(self) -> None:
        """A route without body sources ignores a body it cannot parse."""
        route = make_route(quantity="query:q")
        assert event(route, query=b"q=1", body=b"\xff{not json").quantity == 1


class TestDefaults:
    """Optional fields take their defaults."""

    def test_timestamp_defaults_to_now(self) -> None:
        """No timestamp source, an absent value, null and 'now' all give the intercept instant."""
        assert event(make_route(), body=b'{"quantity": 1}').timestamp == NOW
        route = make_route(timestamp="json:ts")
        for body in (
            b'{"quantity": 1}',
            b'{"quantity": 1, "ts": null}',
            b'{"quantity":1,"ts":"now"}',
        ):
            assert event(route, body=body).timestamp == NOW

    def test_action_defaults_to_route_default(self) -> None:
        """Without an action in the request, the route's default_action applies."""
        assert event(make_route(), body=b'{"quantity": 1}').action == "increment"
        route = make_route(action="json:action", default_action="set")
        assert event(route, body=b'{"quantity": 1}').action == "set"
        assert event(route, body=b'{"quantity": 1, "action": "increment"}').action == "increment"

    def test_subscription_item_is_optional(self) -> None:
        """An event may carry no subscription item."""
        assert event(make_route(), body=b'{"quantity": 1}').subscription_item is None

    def test_empty_body_means_no_fields(self) -> None:
        """An empty body is a body without fields: required ones are reported missing."""
        error = refused(lambda: event(make_route(), body=b""))
        assert (error.param, error.code) == ("quantity", "parameter_missing")


class TestQuantity:
    """The quantity rules."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (0, 0),
            (7, 7),
            (MAX_METER_VALUE, MAX_METER_VALUE),
            (3.0, 3),
            ("42", 42),
            ("007", 7),
            (str(MAX_METER_VALUE), MAX_METER_VALUE),
            ("0" * 20 + "5", 5),
        ],
    )
    def test_accepted_json_values(self, value: Any, expected: int) -> None:
        """JSON integers, integral floats and digit strings (15 digits after any zeros) count."""
        body = json.dumps({"quantity": value}).encode()
        assert event(make_route(), body=body).quantity == expected

    @pytest.mark.parametrize(
        "value",
        [True, False, 1.5, "1.5", -1, "-1", "", " 1", "+1", "1e3", "\u0661", MAX_METER_VALUE + 1,
         "1" + "0" * 15, "9" * 5000, [1], {"n": 1}, 1e300],
    )  # fmt: skip
    def test_refused_json_values(self, value: Any) -> None:
        """Booleans, fractions, negatives, blanks, signs, non-ASCII digits and >15 digits fail."""
        body = json.dumps({"quantity": value}).encode()
        error = refused(lambda: event(make_route(), body=body))
        assert (error.param, error.code) == ("quantity", "parameter_invalid_integer")
        assert "quantity" in error.message

    @pytest.mark.parametrize(
        "raw", [b"q=", b"q=1.5", b"q=-2", b"q=1000000000000000", b"q=%EF%BC%91"]
    )
    def test_refused_query_values(self, raw: bytes) -> None:
        """Query strings follow the same integer rules."""
        error = refused(lambda: event(make_route(quantity="query:q"), query=raw))
        assert (error.param, error.code) == ("q", "parameter_invalid_integer")

    def test_missing_quantity(self) -> None:
        """No quantity (absent or null) is parameter_missing, named as the request spells it."""
        route = make_route(quantity="json:usage.quantity")
        for body in (b"{}", b'{"usage": {}}', b'{"usage": {"quantity": null}}'):
            error = refused(partial(event, route, body=body))
            assert (error.param, error.code) == ("usage.quantity", "parameter_missing")
            assert error.message == "usage.quantity is required"

    def test_long_values_are_cut_in_messages(self) -> None:
        """A refused value is echoed to about 40 characters at most."""
        body = json.dumps({"quantity": "x" * 10_000}).encode()
        error = refused(lambda: event(make_route(), body=body))
        assert "x" * 41 not in error.message
        assert len(error.message) < 100


class TestTimestamp:
    """The timestamp rules."""

    route = make_route(timestamp="json:ts")

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (NOW - 86_400, NOW - 86_400),
            (str(NOW), NOW),
            (NOW + MAX_FUTURE_SECONDS, NOW + 300),
            (1, 1),
        ],
    )
    def test_accepted(self, value: Any, expected: int) -> None:
        """Past instants, digit strings and up to 300 s ahead are accepted."""
        body = json.dumps({"quantity": 1, "ts": value}).encode()
        assert event(self.route, body=body).timestamp == expected

    def test_future_is_refused(self) -> None:
        """More than 300 s ahead is refused: both Stripe paths would refuse it."""
        body = json.dumps({"quantity": 1, "ts": NOW + MAX_FUTURE_SECONDS + 1}).encode()
        error = refused(lambda: event(self.route, body=body))
        assert (error.param, error.code) == ("ts", "parameter_invalid")
        assert "future" in error.message

    @pytest.mark.parametrize("value", [0, -5, "0", "2024-01-01T00:00:00Z", "NOW", 1.5, True, ""])
    def test_bad_values_are_refused(self, value: Any) -> None:
        """Non-positive, formatted, fractional and boolean timestamps are bad integers."""
        body = json.dumps({"quantity": 1, "ts": value}).encode()
        error = refused(lambda: event(self.route, body=body))
        assert (error.param, error.code) == ("ts", "parameter_invalid_integer")


class TestAction:
    """The action rules."""

    def test_set_and_increment(self) -> None:
        """Both legacy actions are read from the request."""
        route = make_route(action="query:action")
        assert event(route, query=b"action=set", body=b'{"quantity":1}').action == "set"

    @pytest.mark.parametrize("value", ["SET", "replace", "", 1, None])
    def test_bad_action_is_refused(self, value: Any) -> None:
        """Anything but 'increment' or 'set' (null means absent) is refused."""
        route = make_route(action="json:action")
        body = json.dumps({"quantity": 1, "action": value}).encode()
        if value is None:
            assert event(route, body=body).action == "increment"
            return
        error = refused(lambda: event(route, body=body))
        assert (error.param, error.code) == ("action", "parameter_invalid")


class TestItemMapping:
    """A known subscription item supplies the customer and meter event name."""

    items: ClassVar[dict[str, ItemMapping]] = {
        "si_1": ItemMapping(customer="cus_si", event_name="meter_si")
    }
    route = make_route("/items/{si}", customer="", event_name="", subscription_item="path:si")

    def test_mapping_fills_customer_and_event_name(self) -> None:
        """Unconfigured customer and event name come from the item's mapping."""
        got = event(self.route, params={"si": "si_1"}, body=b'{"quantity":2}', items=self.items)
        assert (got.customer, got.event_name, got.subscription_item) == (
            "cus_si",
            "meter_si",
            "si_1",
        )

    def test_mapping_fills_absent_values(self) -> None:
        """A configured but absent customer also falls back to the mapping."""
        route = self.route.model_copy(update={"customer": make_route(customer="json:c").customer})
        got = event(route, params={"si": "si_1"}, body=b'{"quantity":2}', items=self.items)
        assert got.customer == "cus_si"

    def test_matching_values_are_accepted(self) -> None:
        """A request that names the item's own customer is fine."""
        route = make_route(
            "/items/{si}", customer="json:c", event_name="", subscription_item="path:si"
        )
        body = b'{"quantity": 1, "c": "cus_si"}'
        got = event(route, params={"si": "si_1"}, body=body, items=self.items)
        assert (got.customer, got.event_name) == ("cus_si", "meter_si")

    def test_contradicting_customer_is_refused(self) -> None:
        """A customer other than the item's owner would bill two different accounts."""
        route = make_route("/items/{si}", customer="json:c", subscription_item="path:si")
        body = b'{"quantity": 1, "c": "cus_other"}'
        error = refused(lambda: event(route, params={"si": "si_1"}, body=body, items=self.items))
        assert (error.param, error.code) == ("c", "parameter_invalid")
        assert "si_1" in error.message

    def test_contradicting_event_name_is_refused(self) -> None:
        """A meter other than the item's would split usage across meters."""
        route = make_route("/items/{si}", subscription_item="path:si", customer="")
        error = refused(
            lambda: event(route, params={"si": "si_1"}, body=b'{"quantity":1}', items=self.items)
        )
        assert (error.param, error.code) == ("event_name", "parameter_invalid")

    def test_unmapped_item_without_customer(self) -> None:
        """An item with no mapping cannot supply a customer: parameter_missing, with a hint."""
        error = refused(lambda: event(self.route, params={"si": "si_9"}, body=b'{"quantity":1}'))
        assert (error.param, error.code) == ("customer", "parameter_missing")
        assert "si_9" in error.message

    def test_absent_item_without_customer(self) -> None:
        """A route reading the item from the body needs either the item or a customer."""
        route = make_route("/u", customer="", subscription_item="json:si")
        error = refused(lambda: event(route, params={}, body=b'{"quantity":1}', items=self.items))
        assert (error.param, error.code) == ("customer", "parameter_missing")

    def test_missing_event_name_is_named(self) -> None:
        """With a customer but no event name anywhere, event_name is missing."""
        route = make_route(event_name="json:meter")
        error = refused(lambda: event(route, body=b'{"quantity":1}'))
        assert (error.param, error.code) == ("meter", "parameter_missing")


class TestIdentifier:
    """Identifier precedence: configured field, then Idempotency-Key, then minted."""

    key = (b"idempotency-key", b"key_123")

    def test_configured_field_wins(self) -> None:
        """A configured identifier beats the Idempotency-Key header."""
        route = make_route(identifier="json:id")
        got = event(route, headers=[self.key], body=b'{"quantity": 1, "id": "evt_9"}')
        assert (got.identifier, got.identifier_source) == ("evt_9", "field")

    def test_integer_field_becomes_text(self) -> None:
        """A JSON integer identifier is used as its decimal text."""
        got = event(make_route(identifier="json:id"), body=b'{"quantity": 1, "id": 77}')
        assert got.identifier == "77"

    def test_idempotency_key_is_next(self) -> None:
        """Without a configured field (or when it is absent), the Idempotency-Key is used."""
        for route in (make_route(), make_route(identifier="json:id")):
            got = event(route, headers=[self.key], body=b'{"quantity": 1}')
            assert (got.identifier, got.identifier_source) == ("key_123", "idempotency_key")

    def test_other_configured_header_is_a_field(self) -> None:
        """Any other header named as the identifier's source is a field, not an Idempotency-Key."""
        route = make_route(identifier="header:X-Request-Id")
        got = event(route, headers=[(b"x-request-id", b"req_1")], body=b'{"quantity": 1}')
        assert (got.identifier, got.identifier_source) == ("req_1", "field")

    def test_configured_idempotency_header_counts_as_key(self) -> None:
        """A route that names the Idempotency-Key header as its source reports it as such."""
        route = make_route(identifier="header:Idempotency-Key")
        got = event(route, headers=[self.key], body=b'{"quantity": 1}')
        assert got.identifier_source == "idempotency_key"

    def test_minted_otherwise(self) -> None:
        """With neither, a fresh identifier is minted each time."""
        first = event(make_route(), body=b'{"quantity": 1}')
        second = event(make_route(), body=b'{"quantity": 1}')
        assert first.identifier_source == "minted"
        assert first.identifier != second.identifier

    @pytest.mark.parametrize(
        "value", [b"", b"k" * 256, b"bad\x01key"], ids=["empty", "long", "control"]
    )
    def test_bad_keys_are_refused(self, value: bytes) -> None:
        """An empty, over-long or unprintable Idempotency-Key is refused, not replaced."""
        error = refused(
            lambda: event(
                make_route(), headers=[(b"Idempotency-Key", value)], body=b'{"quantity":1}'
            )
        )
        assert (error.param, error.code) == ("Idempotency-Key", "parameter_invalid")

    def test_non_string_field_is_refused(self) -> None:
        """A configured identifier that is a JSON object is refused."""
        route = make_route(identifier="json:id")
        error = refused(lambda: event(route, body=b'{"quantity": 1, "id": {"a": 1}}'))
        assert (error.param, error.code) == ("id", "parameter_invalid")


class TestBodies:
    """Body parsing refusals."""

    @pytest.mark.parametrize(
        "body",
        [b"{", b"not json", b"\xff\xfe\x00", b'{"quantity": NaN}', b'{"quantity": Infinity}',
         b"[" * 50_000, b'{"quantity": 1' + b"0" * 5000 + b"}"],
    )  # fmt: skip
    def test_malformed_json(self, body: bytes) -> None:
        """Invalid JSON (non-standard constants, absurd nesting, huge literals) is refused."""
        error = refused(lambda: event(make_route(), body=body))
        assert (error.param, error.code) == ("quantity", "parameter_invalid")
        assert "not valid JSON" in error.message

    @pytest.mark.parametrize("body", [b"[]", b"3", b'"quantity"', b"null"])
    def test_non_object_json(self, body: bytes) -> None:
        """The body must be a JSON object."""
        error = refused(lambda: event(make_route(), body=body))
        assert "must be a JSON object" in error.message

    def test_wrong_type_on_dotted_path(self) -> None:
        """A scalar where the path needs an object is refused, naming the full path."""
        route = make_route(quantity="json:usage.quantity")
        error = refused(lambda: event(route, body=b'{"usage": [1]}'))
        assert (error.param, error.code) == ("usage.quantity", "parameter_invalid")
        assert "usage must be a JSON object" in error.message

    def test_duplicate_json_key_on_path_is_refused(self) -> None:
        """JSON parsers disagree on duplicate keys, so a duplicated field is ambiguous."""
        error = refused(lambda: event(make_route(), body=b'{"quantity": 1, "quantity": 2}'))
        assert (error.param, error.code) == ("quantity", "parameter_invalid")
        assert event(make_route(), body=b'{"quantity": 1, "x": 1, "x": 2}').quantity == 1

    def test_oversized_body_is_refused(self) -> None:
        """A body beyond the route's max_body_bytes is not parsed."""
        route = make_route(max_body_bytes=16)
        error = refused(lambda: event(route, body=b'{"quantity": 1, "pad": "xxxxxxxx"}'))
        assert "larger than 16 bytes" in error.message

    @pytest.mark.parametrize(
        "content_type", [b"application/json", b"multipart/form-data; boundary=x"]
    )
    def test_form_needs_urlencoded_content_type(self, content_type: bytes) -> None:
        """A form source refuses a body declared as something else."""
        route = make_route(quantity="form:quantity")
        headers = [(b"content-type", content_type)]
        error = refused(lambda: event(route, headers=headers, body=b"quantity=1"))
        assert (error.param, error.code) == ("quantity", "parameter_invalid")

    def test_form_value_must_be_utf8(self) -> None:
        """A percent-encoded value that is not UTF-8 is refused."""
        route = make_route(quantity="form:quantity", event_name="form:meter")
        error = refused(lambda: event(route, headers=[FORM], body=b"quantity=1&meter=%FF"))
        assert (error.param, error.code) == ("meter", "parameter_invalid")


class TestAmbiguity:
    """A field sent more than once is refused rather than guessed."""

    @pytest.mark.parametrize(
        ("route_fields", "request_parts", "param"),
        [
            ({"quantity": "query:q"}, {"query": b"q=1&q=1"}, "q"),
            ({"quantity": "form:q"}, {"body": b"q=1&q=2", "headers": [FORM]}, "q"),
            ({"quantity": "header:X-Q"}, {"headers": [(b"x-q", b"1"), (b"X-Q", b"1")]}, "X-Q"),
            (
                {},
                {"headers": [(b"idempotency-key", b"a"), (b"idempotency-key", b"b")]},
                "Idempotency-Key",
            ),
        ],
    )
    def test_duplicates_are_refused(
        self, route_fields: dict[str, Any], request_parts: dict[str, Any], param: str
    ) -> None:
        """Query, form and header duplicates are parameter_invalid, naming the field."""
        request_parts.setdefault("body", b'{"quantity": 1}')
        error = refused(lambda: event(make_route(**route_fields), **request_parts))
        assert (error.param, error.code) == (param, "parameter_invalid")
        assert "send it once" in error.message


class TestStringFields:
    """Customer, subscription item and event name must pass UsageEvent's patterns."""

    def test_string_pattern(self) -> None:
        """A customer with forbidden characters is refused under the request-side name."""
        route = make_route(customer="query:account")
        error = refused(lambda: event(route, query=b"account=cus+1", body=b'{"quantity":1}'))
        assert (error.param, error.code) == ("account", "parameter_invalid")
        assert "account is invalid" in error.message

    def test_path_customer_with_newline(self) -> None:
        """Starlette lets a trailing newline into a parameter; the pattern still refuses it."""
        error = refused(
            lambda: event(make_route(), params={"customer": "cus_1\n"}, body=b'{"quantity":1}')
        )
        assert (error.param, error.code) == ("customer", "parameter_invalid")

    @pytest.mark.parametrize("value", [7, True, ["cus_1"], {"id": "cus_1"}])
    def test_non_strings_are_refused(self, value: Any) -> None:
        """A JSON customer must be a string."""
        body = json.dumps({"quantity": 1, "c": value}).encode()
        error = refused(lambda: event(make_route(customer="json:c"), body=body))
        assert (error.param, error.code) == ("c", "parameter_invalid")

    def test_event_name_too_long(self) -> None:
        """An event name beyond 100 characters is refused, echoed only in part."""
        route = make_route(event_name="header:X-Meter")
        headers = [(b"x-meter", b"m" * 500)]
        error = refused(lambda: event(route, headers=headers, body=b'{"quantity":1}'))
        assert (error.param, error.code) == ("X-Meter", "parameter_invalid")
        assert "m" * 41 not in error.message


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["now", "set", "increment", "cus_1", "0", "1" * 16, ""]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children)
    ),
    max_leaves=8,
)
FUZZ_ROUTE = make_route(
    "/u/{customer}",
    customer="json:who.customer",
    subscription_item="json:who.item",
    event_name="json:meter",
    quantity="json:usage.quantity",
    timestamp="json:usage.ts",
    action="json:action",
    identifier="json:id",
)
FUZZ_ITEMS = {"si_1": ItemMapping(customer="cus_1", event_name="api_calls")}
HEADER_NAMES = st.sampled_from(
    [b"x-q", b"X-Q", b"x-customer", b"idempotency-key", b"content-type", b"x-other"]
)


class TestFuzz:
    """Every input ends in a valid UsageEvent or a UsageInputError, never another exception."""

    @FUZZ
    @given(body=st.binary(max_size=300))
    def test_arbitrary_json_bodies(self, body: bytes) -> None:
        """Random bytes as a JSON body."""
        outcome(lambda: event(FUZZ_ROUTE, body=body, items=FUZZ_ITEMS))

    @FUZZ
    @given(body=st.binary(max_size=300), content_type=st.binary(max_size=40))
    def test_arbitrary_form_bodies(self, body: bytes, content_type: bytes) -> None:
        """Random bytes as a form body, under any content type."""
        route = make_route(quantity="form:quantity", customer="form:c", timestamp="form:ts")
        headers = [(b"content-type", content_type)]
        outcome(lambda: event(route, headers=headers, body=body))

    @FUZZ
    @given(
        who=JSON_VALUES,
        usage=JSON_VALUES,
        meter=JSON_VALUES,
        action=JSON_VALUES,
        ident=JSON_VALUES,
        quantity=st.one_of(JSON_VALUES, st.integers(), st.floats()),
    )
    def test_arbitrary_json_values(
        self, who: Any, usage: Any, meter: Any, action: Any, ident: Any, quantity: Any
    ) -> None:
        """Any JSON value at any configured path (and around it)."""
        if isinstance(usage, dict):
            usage = {**usage, "quantity": quantity}
        document = {"who": who, "usage": usage, "meter": meter, "action": action, "id": ident}
        body = json.dumps(document).encode()
        result = outcome(lambda: event(FUZZ_ROUTE, body=body, items=FUZZ_ITEMS))
        if isinstance(result, UsageEvent):
            assert result.identifier_source in {"field", "minted"}

    @FUZZ
    @given(
        headers=st.lists(st.tuples(HEADER_NAMES, st.binary(max_size=40)), max_size=6),
        query=st.lists(
            st.tuples(st.sampled_from([b"q", b"c", b"ts", b"q%20", b"x"]), st.binary(max_size=20)),
            max_size=6,
        ),
        raw_query=st.binary(max_size=40),
    )
    def test_arbitrary_headers_and_query(
        self, headers: list[tuple[bytes, bytes]], query: list[tuple[bytes, bytes]], raw_query: bytes
    ) -> None:
        """Any header and query values, duplicated or not, encoded or raw."""
        route = make_route(
            customer="header:X-Customer",
            quantity="header:X-Q",
            timestamp="query:ts",
            event_name="query:c",
            action="query:x",
        )
        encoded = b"&".join(name + b"=" + quote_from_bytes(value).encode() for name, value in query)
        for query_string in (encoded, raw_query, encoded + b"&" + raw_query):
            outcome(partial(event, route, headers=headers, query=query_string))

    @FUZZ
    @given(
        customer=st.text(max_size=300),
        quantity=st.one_of(
            st.integers(min_value=-(10**20), max_value=10**20).map(str),
            st.text(alphabet="0123456789", min_size=1, max_size=40),
            st.text(max_size=20),
        ),
        ts=st.integers(min_value=-(10**12), max_value=10**12),
    )
    def test_unicode_and_huge_numbers_in_path(self, customer: str, quantity: str, ts: int) -> None:
        """Path parameters carrying any text, digits of any length and any instant."""
        route = make_route("/u/{customer}/{n}/{ts}", quantity="path:n", timestamp="path:ts")
        params = {"customer": customer, "n": quantity, "ts": str(ts)}
        result = outcome(lambda: event(route, params=params))
        if isinstance(result, UsageEvent):
            assert result.quantity == int(quantity)
            assert result.customer == customer


class TestRefusalMessages:
    """The exact refusal a caller reads: the field, Stripe's code and the message, one per rule.

    The messages are the only explanation a caller gets of a 400, so each rule's text is pinned
    here, with the kinds of value it names and the cut of a long value.
    """

    SI_ROUTE: ClassVar[dict[str, Any]] = {"event_name": "json:m", "subscription_item": "json:si"}

    @pytest.mark.parametrize(
        ("route_fields", "request_parts", "expected"),
        [
            ({"quantity": "json:u.quantity"}, {"body": b'{"u": true}'},
             ("u.quantity", "parameter_invalid",
              "u must be a JSON object to hold u.quantity, not a boolean")),
            ({"quantity": "json:u.quantity"}, {"body": b'{"u": 1.5}'},
             ("u.quantity", "parameter_invalid",
              "u must be a JSON object to hold u.quantity, not a number")),
            ({"quantity": "json:u.quantity"}, {"body": b'{"u": "x"}'},
             ("u.quantity", "parameter_invalid",
              "u must be a JSON object to hold u.quantity, not a string")),
            ({"quantity": "json:u.quantity"}, {"body": b'{"u": [1]}'},
             ("u.quantity", "parameter_invalid",
              "u must be a JSON object to hold u.quantity, not an array")),
            ({"customer": "json:c"}, {"body": b'{"quantity": 1, "c": {"id": 1}}'},
             ("c", "parameter_invalid", "c must be a string, not an object")),
            ({}, {"body": b"null"},
             ("quantity", "parameter_invalid",
              "the request body must be a JSON object (needed for quantity), not null")),
            ({}, {"body": b"[1]"},
             ("quantity", "parameter_invalid",
              "the request body must be a JSON object (needed for quantity), not an array")),
            ({}, {"body": b'{"quantity": NaN}'},
             ("quantity", "parameter_invalid",
              "the request body is not valid JSON (needed for quantity)")),
            ({"quantity": "json:a.b"}, {"body": b'{"a": {"b": 1, "b": 2}}'},
             ("a.b", "parameter_invalid", "a.b appears more than once in the JSON body")),
            ({"quantity": "json:a.b.c"}, {"body": b'{"a": {"b": 7}}'},
             ("a.b.c", "parameter_invalid",
              "a.b must be a JSON object to hold a.b.c, not a number")),
            ({"quantity": "json:a.b.c"}, {"body": b'{"a": {"b": {"c": 1}, "b": {"c": 2}}}'},
             ("a.b.c", "parameter_invalid", "a.b appears more than once in the JSON body")),
            ({"quantity": "query:q"}, {"query": b"q=1&q=2&q=3"},
             ("q", "parameter_invalid", "q appears 3 times in the query string; send it once")),
            ({"quantity": "form:q"}, {"body": b"q=1&q=2", "headers": [FORM]},
             ("q", "parameter_invalid", "q appears 2 times in the form body; send it once")),
            ({"quantity": "header:X-Q"}, {"headers": [(b"x-q", b"1"), (b"X-Q", b"1")]},
             ("X-Q", "parameter_invalid", "X-Q appears 2 times in the headers; send it once")),
            ({"quantity": "query:q"}, {"query": b"q=%FF"},
             ("q", "parameter_invalid",
              "q in the query string is not valid percent-encoded UTF-8")),
            ({"quantity": "form:q"}, {"body": b"q=%FF", "headers": [FORM]},
             ("q", "parameter_invalid", "q in the form body is not valid percent-encoded UTF-8")),
            ({"quantity": "form:q"}, {"body": b"q=1", "headers": [(b"content-type", b"text/plain")]},
             ("q", "parameter_invalid",
              "q is read from the form body, which must be application/x-www-form-urlencoded")),
            ({"max_body_bytes": 16}, {"body": b'{"quantity": 1, "pad": "xxxxxxxx"}'},
             ("quantity", "parameter_invalid",
              "the request body is larger than 16 bytes (needed for quantity)")),
            ({"action": "json:a"}, {"body": b'{"quantity": 1, "a": "SET"}'},
             ("a", "parameter_invalid", "a must be 'increment' or 'set', got 'SET'")),
            ({"action": "json:a"}, {"body": b'{"quantity": 1, "a": 1}'},
             ("a", "parameter_invalid", "a must be 'increment' or 'set', got 1")),
            ({"action": "json:a"}, {"body": b'{"quantity": 1, "a": "' + b"x" * 38 + b'"}'},
             ("a", "parameter_invalid", "a must be 'increment' or 'set', got '" + "x" * 38 + "'")),
            ({"action": "json:a"}, {"body": b'{"quantity": 1, "a": "' + b"x" * 39 + b'"}'},
             ("a", "parameter_invalid", "a must be 'increment' or 'set', got '" + "x" * 36 + "...")),
            ({}, {"body": b'{"quantity": ""}'},
             ("quantity", "parameter_invalid_integer",
              "quantity must be a whole number, got an empty string")),
            ({}, {"body": b'{"quantity": [1]}'},
             ("quantity", "parameter_invalid_integer",
              "quantity must be a whole number, got an array")),
            ({}, {"body": b'{"quantity": -1}'},
             ("quantity", "parameter_invalid_integer", "quantity must not be negative, got -1")),
            ({}, {"body": b'{"quantity": 1000000000000000}'},
             ("quantity", "parameter_invalid_integer",
              "quantity must be at most 999999999999999 (15 digits), got 1000000000000000")),
            ({"timestamp": "json:ts"}, {"body": b'{"quantity": 1, "ts": 0}'},
             ("ts", "parameter_invalid_integer",
              "ts must be a positive Unix timestamp in seconds or 'now', got 0")),
            ({"timestamp": "json:ts"}, {"body": f'{{"quantity": 1, "ts": {NOW + 301}}}'.encode()},
             ("ts", "parameter_invalid",
              f"ts is more than 300 seconds in the future ({NOW + 301})")),
            ({"customer": "query:account"}, {"query": b"account=cus+1"},
             ("account", "parameter_invalid",
              r"account is invalid: String should match pattern '^[A-Za-z0-9_\-]+$' (got 'cus 1')")),
            ({}, {"headers": [(b"Idempotency-Key", b"bad\x01key")]},
             ("Idempotency-Key", "parameter_invalid",
              "Idempotency-Key is invalid: identifier must contain printable characters only "
              r"(got 'bad\x01key')")),
            ({"customer": "json:c"}, {},
             ("c", "parameter_missing", "c is required")),
            ({"customer": "json:c", "subscription_item": "json:si"},
             {"body": b'{"quantity": 1, "si": ""}'},
             ("c", "parameter_missing", "c is required")),
            (SI_ROUTE, {"body": b'{"quantity": 1, "si": "si_9"}'},
             ("m", "parameter_missing",
              "m is required (subscription item 'si_9' has no [items] mapping)")),
        ],
        ids=[
            "not-object-boolean", "not-object-number", "not-object-string", "not-object-array",
            "string-not-object", "body-null", "body-array", "body-nan", "json-duplicate",
            "not-object-inner", "json-duplicate-inner",
            "query-3-times", "form-2-times", "header-2-times", "query-not-utf8", "form-not-utf8",
            "form-content-type", "body-too-large", "action-text", "action-number",
            "value-40-chars-whole", "value-41-chars-cut", "quantity-empty", "quantity-array",
            "quantity-negative", "quantity-16-digits", "timestamp-zero", "timestamp-future",
            "customer-pattern", "identifier-unprintable", "customer-absent",
            "customer-absent-empty-item", "item-unmapped",
        ],
    )  # fmt: skip
    def test_message(
        self,
        route_fields: dict[str, Any],
        request_parts: dict[str, Any],
        expected: tuple[str, str, str],
    ) -> None:
        """Each refusal names the request-side field, Stripe's code and what is wrong, exactly."""
        request_parts.setdefault("body", b'{"quantity": 1}')
        error = refused(lambda: event(make_route(**route_fields), **request_parts))
        assert (error.param, error.code, error.message) == expected

    def test_contradiction_names_both_sides(self) -> None:
        """A customer contradicting its item's owner names the value, the item and the owner."""
        items = {"si_1": ItemMapping(customer="cus_si", event_name="meter_si")}
        route = make_route("/u", customer="json:c", subscription_item="json:si")
        body = b'{"quantity": 1, "c": "cus_x", "si": "si_1"}'
        error = refused(lambda: event(route, params={}, body=body, items=items))
        assert (error.param, error.code, error.message) == (
            "c",
            "parameter_invalid",
            "c 'cus_x' contradicts subscription item 'si_1', which belongs to customer 'cus_si'",
        )

    def test_invalid_configured_identifier_is_named_as_sent(self) -> None:
        """An over-long identifier from a configured field is refused under that field's name."""
        body = json.dumps({"quantity": 1, "id": "k" * 256}).encode()
        error = refused(lambda: event(make_route(identifier="json:id"), body=body))
        assert (error.param, error.code) == ("id", "parameter_invalid")
        assert error.message.startswith("id is invalid: String should have at most 255 characters")


class TestEncodings:
    """What a query string or form body means: plus signs, equals signs, odd names."""

    def test_plus_and_equals_in_a_value(self) -> None:
        """``+`` in a value is a space, and ``=`` after the first belongs to the value."""
        route = make_route(identifier="query:id")
        got = event(route, query=b"id=order+42==", body=b'{"quantity": 1}')
        assert (got.identifier, got.identifier_source) == ("order 42==", "field")

    def test_names_are_decoded_like_values(self) -> None:
        """A name with a space may be sent as ``+`` or ``%20``, in the query or a form body."""
        route = make_route(quantity="query:page size")
        assert event(route, query=b"page+size=3").quantity == 3
        assert event(route, query=b"page%20size=4").quantity == 4
        form_route = make_route(quantity="form:page size")
        assert event(form_route, headers=[FORM], body=b"page+size=5").quantity == 5

    @pytest.mark.parametrize("source", ["query:q\ud800", "header:X-Q\u20ac"])
    def test_unencodable_name_is_only_missing(self, source: str) -> None:
        """A source name no request can spell (a lone surrogate, a euro sign in a header name)
        is absent, never a crash."""
        route = make_route(quantity=source)
        error = refused(lambda: event(route, query=b"q=1", headers=[(b"x-q", b"1")]))
        assert (error.param, error.code) == (source.partition(":")[2], "parameter_missing")

    def test_header_values_lose_only_spaces_and_tabs(self) -> None:
        """A header value is trimmed of spaces and tabs (RFC 9110's OWS), nothing else."""
        route = make_route(customer="header:X-Customer")
        headers = [(b"x-customer", b" \tcus_X\t ")]
        assert event(route, headers=headers, body=b'{"quantity": 1}').customer == "cus_X"
        headers = [(b"x-customer", b"cus_3\x0c")]
        error = refused(lambda: event(route, headers=headers, body=b'{"quantity": 1}'))
        assert (error.param, error.code) == ("X-Customer", "parameter_invalid")

    def test_body_of_exactly_the_limit_is_read(self) -> None:
        """max_body_bytes is the largest body read, not the first one refused."""
        body = b'{"quantity": 12}'
        assert event(make_route(max_body_bytes=len(body)), body=body).quantity == 12


class TestTimestampSource:
    """Whether the timestamp came from the request or was fixed at intercept."""

    route = make_route(timestamp="json:ts")

    @pytest.mark.parametrize(
        ("body", "source"),
        [
            (b'{"quantity": 1}', "intercept"),
            (b'{"quantity": 1, "ts": "now"}', "intercept"),
            (b'{"quantity": 1, "ts": 1699999000}', "request"),
        ],
        ids=["absent", "now", "sent"],
    )
    def test_source(self, body: bytes, source: str) -> None:
        """``"now"`` and an absent timestamp are the intercept instant; a number is the caller's."""
        assert event(self.route, body=body).timestamp_source == source
