"""Hostile input on the middleware's usage routes (hypothesis): every request ends in a 2xx with
exactly its usage written, or a 4xx with Stripe's error shape and no usage written; never a 5xx.

Two layers: ``build_event`` alone (pure, many examples) and the middleware end to end in front of a
small Starlette app, with real Redis and the Stripe stand-in, where after every request the
stand-in's totals, the outbox and every usage key under the test's prefix are compared with what
the reply says happened.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import (
    HealthCheck,
    event,
    example,
    given,
    settings as hypothesis_settings,
    strategies as st,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dualwrite.config import ItemMapping, Settings, UsageRoute
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import UsageInputError
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import MAX_METER_VALUE, RecordOutcome, Stage, UsageEvent
from dualwrite.routes import MAX_FUTURE_SECONDS, RouteTable, build_event
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, set_stage

pytestmark = pytest.mark.anyio

FUZZ = hypothesis_settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON_ROUTE = {
    "method": "POST",
    "path": "/usage/{customer}",
    "customer": "path:customer",
    "subscription_item": "json:item",
    "quantity": "json:usage.quantity",
    "timestamp": "json:timestamp",
    "action": "json:action",
    "event_name": f"const:{EVENT_NAME}",
}
FORM_ROUTE = {
    "method": "POST",
    "path": "/form/usage",
    "customer": "header:X-Customer",
    "subscription_item": "form:item",
    "quantity": "form:quantity",
    "timestamp": "form:timestamp",
    "event_name": f"const:{EVENT_NAME}",
    "max_body_bytes": 4096,
}
QUERY_ROUTE = {
    "method": "PUT",
    "path": "/q/{customer}/usage",
    "customer": "path:customer",
    "subscription_item": "query:item",
    "quantity": "query:quantity",
    "identifier": "query:id",
    "event_name": f"const:{EVENT_NAME}",
}
ROUTES = (JSON_ROUTE, FORM_ROUTE, QUERY_ROUTE)

# ------------------------------------------------------------------------------------ strategies

NOW = int(time.time())
HOSTILE_TEXT = st.one_of(
    st.text(max_size=30),
    # Digits with leading zeros: valid, and easy for a parser to misread.
    st.integers(min_value=0, max_value=10**9).map(lambda n: "0" * 5 + str(n)),
    st.sampled_from(
        [
            "",
            " ",
            "now",
            "NaN",
            "1e3",
            "0x10",
            "-1",
            "1.5",
            "٣",
            "²",
            "\uff11\uff12",
            "0" * 40,
            "9" * 400,
        ]
    ),
)
QUANTITIES = st.one_of(
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just(MAX_METER_VALUE),
    st.just(MAX_METER_VALUE + 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 2.0, -0.0, 1e300, True, False, None, [], {}, [1], {"a": 1}]),
    HOSTILE_TEXT,
)
TIMESTAMPS = st.one_of(
    st.just("now"),
    st.integers(min_value=NOW - 60 * 86400, max_value=NOW + 2 * MAX_FUTURE_SECONDS),
    st.sampled_from([0, -1, 1, NOW - 36 * 86400, NOW + MAX_FUTURE_SECONDS + 5, 2**63, 10**20]),
    st.floats(allow_nan=True, allow_infinity=True),
    HOSTILE_TEXT,
    st.none(),
)
ACTIONS = st.one_of(
    st.sampled_from(["increment", "increment", "set", "INCREMENT", "", "delete"]), st.integers()
)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
IDEMPOTENCY_KEYS = st.one_of(
    st.none(),
    st.sampled_from(["k1", "k2", "k3"]),
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), min_size=1, max_size=40
    ),
)


def mostly(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Valid five times in six, so that whole requests get through about as often as they fail."""
    return st.one_of(valid, valid, valid, valid, valid, hostile)


NO_EXTRA: st.SearchStrategy[list[Any]] = st.just([])
#: Printable latin-1 keys, made unique per example (a reused key replays or is refused).
FRESH_KEYS = st.one_of(
    st.none(),
    st.text(
        alphabet=st.characters(codec="latin-1").filter(str.isprintable), min_size=1, max_size=40
    ).map(lambda key: f"{key}-{uuid.uuid4().hex[:8]}"),
)
#: Timestamps every path accepts: the intercept instant, or the current second.
CURRENT = st.one_of(st.just("now"), st.builds(lambda: int(time.time())))


def json_text(pairs: list[tuple[str, Any]]) -> str:
    """A JSON object written pair by pair, so that a field can appear twice."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


def whole_number(value: Any) -> int | None:
    """The quantity a sent value stands for, read by the test itself (not by dualwrite's parser):
    a JSON integer or integral float, or a string of ASCII digits, within ``0..MAX_METER_VALUE``;
    None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    if isinstance(value, str):
        if re.fullmatch(r"[0-9]+", value) is None:
            return None
        value = int(value)
    if not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_METER_VALUE else None


@dataclass(frozen=True, slots=True)
class Sent:
    """The quantity a request carried: the whole number it stands for, or None when the request
    holds no single valid quantity (it must then be refused)."""

    quantity: int | None

    @classmethod
    def of(cls, values: list[Any]) -> Sent:
        """From every value the request sent as its quantity (a repeated field is refused)."""
        return cls(whole_number(values[0]) if len(values) == 1 else None)

    @classmethod
    def in_pairs(cls, pairs: list[tuple[str, Any]], name: str = "quantity") -> Sent:
        """From the values of ``name`` among form or query pairs."""
        return cls.of([value for key, value in pairs if key == name])

    def check(self, parsed: int) -> None:
        """An accepted request's quantity is exactly the one sent."""
        assert self.quantity is not None, f"accepted with no valid quantity sent (parsed {parsed})"
        assert parsed == self.quantity, f"sent {self.quantity}, recorded {parsed}"


def sent_in_usage(fields: list[tuple[str, Any]]) -> Sent:
    """The quantity of a JSON body whose ``usage`` object holds it (``usage.quantity``)."""
    usages = [value for key, value in fields if key == "usage"]
    if len(usages) != 1 or not isinstance(usages[0], dict) or "quantity" not in usages[0]:
        return Sent(None)
    return Sent.of([usages[0]["quantity"]])


# --------------------------------------------------------------------------------- build_event


def _route(data: dict[str, Any]) -> RouteTable:
    return RouteTable([UsageRoute.model_validate(data)])


JSON_TABLE = _route(JSON_ROUTE)
FORM_TABLE = _route(FORM_ROUTE)
QUERY_TABLE = _route(QUERY_ROUTE)
ITEMS = {"si_known": ItemMapping(customer="cus_known", event_name=EVENT_NAME)}


def pairs_or_raw_query(query: list[tuple[str, str]] | bytes) -> bytes:
    """A query string: the pairs url-encoded, or raw bytes as they came."""
    return query if isinstance(query, bytes) else urlencode(query).encode()


def check_event_or_refusal(call: Any) -> UsageEvent | None:
    """Run ``call``: it returns a valid event or raises ``UsageInputError`` naming a field."""
    try:
        event: UsageEvent = call()
    except UsageInputError as exc:
        assert exc.param, exc.message
        assert exc.code in {"parameter_missing", "parameter_invalid_integer", "parameter_invalid"}
        assert len(exc.message) < 400, exc.message  # never echoes a huge value
        return None
    assert 0 <= event.quantity <= MAX_METER_VALUE
    assert 0 < event.timestamp <= NOW + MAX_FUTURE_SECONDS + 60
    assert event.action in ("increment", "set")
    assert event.customer and event.event_name and event.identifier
    return event


#: Every way a valid quantity may be written: integers up to 15 digits, integral floats (JSON),
#: digit strings with and without leading zeros.
VALID_QUANTITIES = st.one_of(
    st.integers(min_value=0, max_value=MAX_METER_VALUE),
    st.integers(min_value=0, max_value=10**6).map(float),
    st.integers(min_value=0, max_value=MAX_METER_VALUE).map(str),
    st.tuples(st.integers(min_value=1, max_value=30), st.integers(0, 10**9)).map(
        lambda zeros_and_n: "0" * zeros_and_n[0] + str(zeros_and_n[1])
    ),
)


class TestBuildEventFuzz:
    """``build_event`` returns a valid event or a ``UsageInputError``, whatever the request holds."""

    @hypothesis_settings(max_examples=300, deadline=None)
    @given(quantity=VALID_QUANTITIES, where=st.sampled_from(["json", "form", "query"]))
    def test_valid_quantities_are_read_exactly(self, quantity, where):
        """A valid quantity, however written, becomes exactly the number sent, on every route."""
        expected = whole_number(quantity)
        assert expected is not None  # the strategy makes valid quantities only
        # Form and query values are text: a number is written in digits there (no "2.0").
        text = quantity if isinstance(quantity, str) else str(expected)
        if where == "json":
            match = JSON_TABLE.match("POST", "/usage/cus_known")
            body, query, headers = json_text([("usage", {"quantity": quantity})]).encode(), b"", []
        elif where == "form":
            match = FORM_TABLE.match("POST", "/form/usage")
            body = urlencode([("item", "si_known"), ("quantity", text)]).encode()
            query, headers = b"", [(b"x-customer", b"cus_known")]
        else:
            match = QUERY_TABLE.match("PUT", "/q/cus_known/usage")
            body, headers = b"", []
            query = urlencode([("item", "si_known"), ("quantity", text)]).encode()
        assert match is not None
        event = build_event(
            match, query_string=query, headers=headers, body=body, now=NOW, items=ITEMS
        )
        assert event.quantity == expected

    @hypothesis_settings(max_examples=400, deadline=None)
    @given(
        customer=st.text(min_size=1, max_size=20),
        pairs=st.lists(
            st.tuples(
                st.sampled_from(["item", "usage", "timestamp", "action", "other"]), JSON_VALUES
            ),
            max_size=6,
        ),
        usage=st.one_of(
            st.fixed_dictionaries({"quantity": QUANTITIES}), JSON_VALUES, st.just({"quantity": 1})
        ),
        timestamp=TIMESTAMPS,
        action=ACTIONS,
        raw=st.one_of(st.none(), st.binary(max_size=40)),
    )
    def test_json_bodies(self, customer, pairs, usage, timestamp, action, raw):
        """Wrong types, huge numbers, NaN, duplicates, nesting, bytes that are not JSON."""
        match = JSON_TABLE.match("POST", "/usage/x")
        assert match is not None
        match.path_params["customer"] = customer
        fields = [("usage", usage), ("timestamp", timestamp), ("action", action), *pairs]
        body = raw if raw is not None else json_text(fields).encode()
        event = check_event_or_refusal(
            lambda: build_event(match, query_string=b"", headers=[], body=body, now=NOW)
        )
        if event is not None and raw is None:
            sent_in_usage(fields).check(event.quantity)

    @hypothesis_settings(max_examples=400, deadline=None)
    @given(
        pairs=st.lists(
            st.tuples(
                st.sampled_from(["item", "quantity", "timestamp", "x", "quantity"]),
                st.one_of(HOSTILE_TEXT, st.integers().map(str)),
            ),
            max_size=6,
        ),
        raw=st.one_of(st.none(), st.binary(max_size=60)),
        customers=st.lists(st.text(max_size=10).map(lambda t: t.encode("utf-8")), max_size=2),
        content_type=st.sampled_from(
            [None, b"application/x-www-form-urlencoded", b"application/json", b"text/plain; x"]
        ),
        big=st.booleans(),
    )
    def test_form_bodies_and_headers(self, pairs, raw, customers, content_type, big):
        """Form bodies (repeated, percent-broken, oversized) and missing or repeated headers."""
        match = FORM_TABLE.match("POST", "/form/usage")
        assert match is not None
        body = raw if raw is not None else urlencode(pairs).encode()
        if big:
            body += b"&pad=" + b"a" * 5000
        headers = [(b"x-customer", value) for value in customers]
        if content_type is not None:
            headers.append((b"content-type", content_type))
        event = check_event_or_refusal(
            lambda: build_event(
                match, query_string=b"", headers=headers, body=body, now=NOW, items=ITEMS
            )
        )
        if event is not None:
            assert len(body) <= 4096 and len(customers) <= 1
            if raw is None:
                Sent.in_pairs(pairs).check(event.quantity)

    @hypothesis_settings(max_examples=300, deadline=None)
    @given(
        customer=st.text(min_size=1, max_size=20),
        query=st.one_of(
            st.lists(
                st.tuples(st.sampled_from(["item", "quantity", "id", "zz"]), HOSTILE_TEXT),
                max_size=6,
            ),
            st.binary(max_size=40),
        ),
        key=IDEMPOTENCY_KEYS,
    )
    def test_query_and_path(self, customer, query, key):
        """Query strings (repeated, broken percent-encoding) and path values of any text."""
        match = QUERY_TABLE.match("PUT", "/q/x/usage")
        assert match is not None
        match.path_params["customer"] = customer
        headers = [] if key is None else [(b"idempotency-key", key.encode("latin-1"))]
        event = check_event_or_refusal(
            lambda: build_event(
                match,
                query_string=pairs_or_raw_query(query),
                headers=headers,
                body=b"",
                now=NOW,
                items=ITEMS,
            )
        )
        if event is not None and not isinstance(query, bytes):
            Sent.in_pairs(query).check(event.quantity)


# ---------------------------------------------------------------------- the middleware end to end

#: Keys that are caches or rate-limit state, not usage: a refused request may warm them.
CACHE_MARKERS = (":{items}:", ":{rl}:", ":{m")


async def usage_state(engine: DualWriteEngine) -> dict[str, Any]:
    """Every usage key under the engine's prefix (ledger, outbox, idempotency, ...) with its value."""
    redis = engine.redis
    state: dict[str, Any] = {}
    async for raw in redis.scan_iter(match=f"{engine.keys.prefix}:*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        if any(marker in key for marker in CACHE_MARKERS):
            continue
        kind = await redis.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            state[key] = await redis.get(key)
        elif kind == "hash":
            state[key] = await redis.hgetall(key)
        elif kind == "stream":
            state[key] = [entry_id for entry_id, _ in await redis.xrange(key) or []]
        elif kind == "zset":
            state[key] = await redis.zrange(key, 0, -1, withscores=True)
        else:
            state[key] = kind
    return state


def only_refusals_counted(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed between two states beyond authoritative-refusal counters (empty: nothing)."""
    problems = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key.endswith("-index") or ":rollup:" in key:
            continue  # indexes and rollups: copies of the ledger rows checked here
        if key.endswith((":customer-rows", ":guard-changed")):
            continue  # the guard's rows by customer and changed set: bookkeeping of those rows
        if ":idem:" in key and isinstance(new, dict) and new.get("state") == "open":
            continue  # the caller's key stays open, holding the event, for its retry
        if isinstance(new, dict):  # a ledger hash
            old = old or {}
            changed = {f for f in set(old) | set(new) if old.get(f) != new.get(f)}
            if all("_refused_" in str(f) for f in changed):
                continue
            problems.append(f"{key}: {sorted(changed)}")
            continue
        problems.append(key)
    return problems


@dataclass
class Totals:
    """What the stand-in holds for the scenarios, on both paths."""

    legacy: dict[str, int]
    meter: dict[str, float]

    @classmethod
    def of(cls, standin: StripeStandin, scenarios: list[Scenario]) -> Totals:
        """Read both paths' totals for every scenario."""
        return cls(
            {s.item: standin.legacy_total(s.item) for s in scenarios},
            {s.customer: standin.meter_total(s.customer, EVENT_NAME) for s in scenarios},
        )


async def shadow_and_primary(standin_url: str) -> list[Scenario]:
    """Two customers on the legacy metered price (to be put in shadow and in primary)."""
    async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
        return [await builder.customer("shadow"), await builder.customer("primary")]


async def outbox_length(engine: DualWriteEngine) -> int:
    """Entries in every shard's outbox stream."""
    return sum([await engine.redis.xlen(shard.outbox) for shard in engine.keys.all_shards()])


#: Stripe's totals, the usage keys, the outbox length and the stand-in's request count.
Snapshot = tuple[Totals, dict[str, Any], int, int]


@dataclass
class Observer:
    """What a fuzzed request runs against (engine, stand-in, customers and their stages), and the
    checks every reply shares; ``Oracle`` and the proxy's add what a 2xx must have written."""

    engine: DualWriteEngine
    standin: StripeStandin
    scenarios: list[Scenario]
    stages: dict[str, Stage]

    async def snapshot(self) -> Snapshot:
        """Stripe's totals, the usage keys, the outbox length and the stand-in's request count."""
        return (
            Totals.of(self.standin, self.scenarios),
            await usage_state(self.engine),
            await outbox_length(self.engine),
            len(self.standin.requests),
        )

    async def observe(self, response: httpx.Response) -> Snapshot:
        """The state after ``response`` (no 5xx, ever); its status is a hypothesis event."""
        after = await self.snapshot()
        status = response.status_code
        event(f"HTTP {status}") if status < 400 else event(f"HTTP {status} {response.text[:70]}")
        assert status < 500, (status, response.text[:500])
        return after

    @staticmethod
    def check_refused(before: Snapshot, after: Snapshot) -> None:
        """A refused request changed neither Stripe nor the outbox, and counted only the refusal
        (nothing at all when it never reached Stripe)."""
        totals, state, outbox, requests = before
        after_totals, after_state, after_outbox, after_requests = after
        assert after_totals == totals, "a refused request changed Stripe's totals"
        assert after_outbox == outbox, "a refused request enqueued a shadow write"
        if after_requests == requests:  # refused before Stripe: Redis untouched
            assert after_state == state, only_refusals_counted(state, after_state)
        else:  # Stripe refused it: only the refusal is counted
            assert only_refusals_counted(state, after_state) == []


class Oracle(Observer):
    """Checks one request's reply against what it did to Stripe and Redis."""

    async def check(
        self, before: Snapshot, response: httpx.Response, sent: Sent | None = None
    ) -> None:
        """A 2xx wrote exactly the quantity ``sent`` (None: the test cannot tell, raw bytes), as
        the app was told; a 4xx wrote none; nothing is a 5xx."""
        after = await self.observe(response)
        if 200 <= response.status_code < 300:
            data = response.json()
            assert data["recorded"] is True, data
            if sent is not None:
                sent.check(data["quantity"])
            self._check_written(data, before[0], after[0], before[2], after[2])
            return
        error = response.json()["error"]
        assert error["type"] in {"invalid_request_error", "idempotency_error"} and error["message"]
        self.check_refused(before, after)

    def _check_written(
        self, data: dict[str, Any], totals: Totals, after: Totals, outbox: int, after_outbox: int
    ) -> None:
        if data["replayed"]:
            assert after == totals and after_outbox == outbox
            return
        customer, item, quantity = data["customer"], data["item"], data["quantity"]
        stage = self.stages[customer]
        # The item may be another customer's: without an [items] mapping nothing can tell.
        legacy_delta = after.legacy[item] - totals.legacy[item]
        meter_delta = after.meter[customer] - totals.meter[customer]
        if data["action"] == "increment":
            if stage in (Stage.LEGACY, Stage.SHADOW):
                assert (legacy_delta, meter_delta) == (quantity, 0)
            else:
                assert (legacy_delta, meter_delta) == (0, quantity)
        shadow = stage in (Stage.SHADOW, Stage.PRIMARY)
        assert after_outbox - outbox == (1 if shadow else 0)
        assert all(after.meter[c] == totals.meter[c] for c in totals.meter if c != customer)
        assert all(after.legacy[i] == totals.legacy[i] for i in totals.legacy if i != item)


def usage_app() -> Starlette:
    """The user's app: each usage route answers what the middleware recorded."""

    async def recorded(request: Request) -> JSONResponse:
        outcome: RecordOutcome = request.state.dualwrite
        event = outcome.event
        return JSONResponse(
            {
                "recorded": outcome.accepted,
                "replayed": outcome.replayed,
                "customer": event.customer,
                "item": event.subscription_item,
                "quantity": event.quantity,
                "action": event.action,
            }
        )

    return Starlette(
        routes=[
            Route("/usage/{customer}", recorded, methods=["POST"]),
            Route("/form/usage", recorded, methods=["POST"]),
            Route("/q/{customer}/usage", recorded, methods=["PUT"]),
        ]
    )


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """Settings with the three fuzzed routes."""
    return standin_settings(
        routes=ROUTES,
        stripe={"request_retries": 0},
    )


@pytest.fixture
async def world(
    engine: DualWriteEngine, standin: StripeStandin, standin_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Oracle]]:
    """Two customers (shadow and primary) and a client on the wrapped app."""
    scenarios = await shadow_and_primary(standin_url)
    stages = {scenarios[0].customer: Stage.SHADOW, scenarios[1].customer: Stage.PRIMARY}
    for scenario in scenarios:
        await set_stage(engine, scenario.customer, stages[scenario.customer])
    app = DualWriteMiddleware(usage_app(), engine=engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        yield client, Oracle(engine, standin, scenarios, stages)


async def untouched_non_usage_path(
    oracle: Oracle, before: Snapshot, response: httpx.Response
) -> None:
    """A customer holding a slash: the escaped slash is decoded into the path, which then matches
    no usage route, so the app answers as it would without the middleware (404, or Starlette's
    307 to the path without its trailing slash, whose empty body is what failed this test under
    an oracle that read every reply as JSON), and nothing is written."""
    assert response.status_code in (307, 404), (response.status_code, response.text[:200])
    oracle.check_refused(before, await oracle.observe(response))


def pick(oracle: Oracle, index: int, junk: str) -> tuple[str, str]:
    """A real customer and item (index 0, 1), the other customer's item (2) or junk (3)."""
    scenarios = oracle.scenarios
    if index < 2:
        return scenarios[index].customer, scenarios[index].item
    if index == 2:
        return scenarios[0].customer, scenarios[1].item
    return junk or "cus_nobody", junk or "si_nothing"


@pytest.mark.slow
class TestMiddlewareFuzz:
    """The middleware end to end: 2xx and exactly the usage, or 4xx and nothing, never a 5xx."""

    @FUZZ
    @given(
        who=st.integers(min_value=0, max_value=1),
        quantity=st.one_of(
            st.integers(min_value=0, max_value=MAX_METER_VALUE),
            st.integers(min_value=0, max_value=10**6).map(float),
            st.integers(min_value=0, max_value=10**6).map(lambda n: "0" * 20 + str(n)),
        ),
        timestamp=CURRENT,
        key=FRESH_KEYS,
    )
    async def test_valid_extremes(self, world, who, quantity, timestamp, key):
        """Valid but unusual: 15-digit quantities, integral floats, leading zeros, any key."""
        client, oracle = world
        customer, item = pick(oracle, who, "")
        body = json_text(
            [("item", item), ("usage", {"quantity": quantity}), ("timestamp", timestamp)]
        )
        headers = {b"Content-Type": b"application/json"}
        if key is not None:
            headers[b"Idempotency-Key"] = key.encode("latin-1")
        before = await oracle.snapshot()
        response = await client.post(f"/usage/{customer}", content=body, headers=headers)
        await oracle.check(before, response, Sent.of([quantity]))

    @FUZZ
    @given(
        who=st.integers(min_value=0, max_value=3),
        junk=st.text(max_size=12),
        quantity=mostly(st.integers(min_value=0, max_value=50), QUANTITIES),
        timestamp=mostly(st.sampled_from(["now", None, NOW - 60]), TIMESTAMPS),
        action=mostly(st.just("increment"), ACTIONS),
        extra=mostly(
            NO_EXTRA,
            st.lists(st.tuples(st.sampled_from(["item", "usage", "x"]), JSON_VALUES), max_size=2),
        ),
        key=IDEMPOTENCY_KEYS,
        raw=mostly(st.none(), st.binary(max_size=20)),
    )
    # The reply with an empty body (issue 13, case 8): the app's 307 for a customer ending in "/".
    @example(
        who=3,
        junk="x/",
        quantity=1,
        timestamp="now",
        action="increment",
        extra=[],
        key=None,
        raw=None,
    )
    async def test_json_route(self, world, who, junk, quantity, timestamp, action, extra, key, raw):
        """JSON bodies: wrong types, huge and fractional numbers, duplicates, bad timestamps."""
        client, oracle = world
        customer, item = pick(oracle, who, junk)
        pairs = [("item", item), ("usage", {"quantity": quantity}), ("action", action)]
        if timestamp is not None:
            pairs.append(("timestamp", timestamp))
        body = raw if raw is not None else json_text([*pairs, *extra]).encode()
        headers = {b"Content-Type": b"application/json"}
        if key is not None:  # bytes: httpx would encode a str header as ASCII
            headers[b"Idempotency-Key"] = key.encode("latin-1")
        before = await oracle.snapshot()
        response = await client.post(
            f"/usage/{quote(customer, safe='')}", content=body, headers=headers
        )
        if "/" in customer:
            await untouched_non_usage_path(oracle, before, response)
            return
        if response.status_code == 404 and quote(customer, safe="") != customer:
            return  # an escaped character: neither the app nor the middleware has such a route
        await oracle.check(
            before, response, None if raw is not None else sent_in_usage(pairs + extra)
        )

    @FUZZ
    @given(
        who=st.integers(min_value=0, max_value=3),
        junk=st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=12),
        customers=st.sampled_from([1, 1, 1, 0, 2]),
        pairs=mostly(
            NO_EXTRA,
            st.lists(
                st.tuples(
                    st.sampled_from(["quantity", "timestamp", "item", "x"]),
                    st.one_of(st.integers(min_value=0, max_value=9).map(str), HOSTILE_TEXT),
                ),
                max_size=4,
            ),
        ),
        quantity=mostly(st.integers(min_value=0, max_value=20).map(str), st.none()),
        content_type=mostly(
            st.sampled_from(["application/x-www-form-urlencoded", None]),
            st.sampled_from(
                ["application/json", "text/plain", "application/x-www-form-urlencoded;"]
            ),
        ),
    )
    async def test_form_route_and_headers(
        self, world, who, junk, customers, pairs, quantity, content_type
    ):
        """Form bodies and a customer header: missing, repeated, unicode, latin-1."""
        client, oracle = world
        customer, item = pick(oracle, who, junk)
        fields = [("item", item), *pairs]
        if quantity is not None:
            fields.insert(0, ("quantity", quantity))
        value = (customer.strip() or "cus_blank").encode("latin-1")
        headers = [(b"X-Customer", value)] * customers
        if content_type is not None:
            headers.append((b"Content-Type", content_type.encode()))
        before = await oracle.snapshot()
        response = await client.post(
            "/form/usage", content=urlencode(fields).encode(), headers=headers
        )
        await oracle.check(before, response, Sent.in_pairs(fields))

    @FUZZ
    @given(
        who=st.integers(min_value=0, max_value=3),
        junk=st.text(max_size=12),
        query=mostly(
            NO_EXTRA,
            st.lists(
                st.tuples(st.sampled_from(["quantity", "id", "zz"]), HOSTILE_TEXT), max_size=3
            ),
        ),
        quantity=mostly(st.integers(min_value=0, max_value=20).map(str), st.none()),
        identifier=st.one_of(st.none(), st.sampled_from(["a", "b"]), st.text(max_size=8)),
    )
    async def test_query_route(self, world, who, junk, query, quantity, identifier):
        """Query values: repeated, missing, unicode; identifiers reused with other usage."""
        client, oracle = world
        customer, item = pick(oracle, who, junk)
        fields = [("item", item), *query]
        if quantity is not None:
            fields.insert(0, ("quantity", quantity))
        if identifier is not None:
            fields.append(("id", identifier))
        before = await oracle.snapshot()
        path = f"/q/{quote(customer, safe='')}/usage?{urlencode(fields)}"
        response = await client.put(path)
        if "/" in customer:
            await untouched_non_usage_path(oracle, before, response)
            return
        await oracle.check(before, response, Sent.in_pairs(fields))
