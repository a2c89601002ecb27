"""Hostile usage-record requests through the proxy (hypothesis): ``POST
/v1/subscription_items/{si}/usage_records`` ends in a 2xx with exactly its usage written, or a 4xx
with Stripe's error shape and no usage written, never a 5xx or a partial write.

The proxy runs in-process (``httpx.ASGITransport``) in front of the Stripe stand-in on a real socket,
on real Redis; after every request the stand-in's totals on both paths, the outbox and every usage
key under the test's prefix are compared with what the reply says happened.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import given, strategies as st

from dualwrite.config import MeterMapping, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.proxy import create_proxy_app
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.routes.test_fuzz_routes import (
    CURRENT,
    FRESH_KEYS,
    FUZZ,
    HOSTILE_TEXT,
    IDEMPOTENCY_KEYS,
    NO_EXTRA,
    TIMESTAMPS,
    Observer,
    Sent,
    Snapshot,
    mostly,
    shadow_and_primary,
)
from tests.support import EVENT_NAME, Scenario, set_stage

pytestmark = pytest.mark.anyio

PARAMS = ["timestamp", "action", "expand[]", "quantity", "expand[0]", "metadata[a]", "colour"]
VALUES = st.one_of(
    st.integers(min_value=0, max_value=30).map(str),
    st.sampled_from(["increment", "set", "now", "-3", "2.5", "1e2", "999999999999999999"]),
    TIMESTAMPS.map(str),
    HOSTILE_TEXT,
)
AUTH = st.sampled_from(["bearer"] * 6 + ["basic", "none", "wrong", "empty"])
CONTENT_TYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=utf-8",
        "application/json",
        "multipart/form-data; boundary=x",
        None,
    ]
)


def authorization(kind: str) -> bytes | None:
    """The caller's ``Authorization`` header: the key as Bearer or Basic, a wrong key, or none."""
    if kind == "bearer":
        return f"Bearer {STRIPE_KEY}".encode()
    if kind == "basic":
        return b"Basic " + base64.b64encode(f"{STRIPE_KEY}:".encode())
    if kind == "wrong":
        return b"Bearer sk_test_notAKeyTheStandinKnows000000"
    if kind == "empty":
        return b"Bearer "
    return None


class ProxyOracle(Observer):
    """Checks one proxied usage request's reply against Stripe's totals and Redis."""

    async def check(
        self,
        before: Snapshot,
        response: httpx.Response,
        *,
        scenario: Scenario | None,
        dual_written: bool,
        sent: Sent | None,
    ) -> None:
        """2xx: exactly the quantity ``sent`` (None: raw bytes the test cannot read) on the right
        path(s); 4xx: Stripe's error shape and no usage; no 5xx."""
        after = await self.observe(response)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["type"] and error["message"], error
            self.check_refused(before, after)
            return
        totals, outbox = before[0], before[2]
        after_totals, after_outbox = after[0], after[2]
        record = response.json()
        assert record["object"] == "usage_record", record
        assert scenario is not None, "only a real item can take usage"
        if sent is not None:
            sent.check(record["quantity"])
        if response.headers.get("Idempotent-Replayed") == "true":
            assert (after_totals, after_outbox) == (totals, outbox)
            return
        legacy = after_totals.legacy[scenario.item] - totals.legacy[scenario.item]
        meter = after_totals.meter[scenario.customer] - totals.meter[scenario.customer]
        stage = self.stages[scenario.customer] if dual_written else Stage.LEGACY
        if record.get("action", "increment") == "increment" and "set" not in str(record):
            quantity = record["quantity"] if sent is None else sent.quantity
            expected = (quantity, 0) if stage in (Stage.LEGACY, Stage.SHADOW) else (0, quantity)
            assert (legacy, meter) == expected, (stage, record)
        shadow = stage in (Stage.SHADOW, Stage.PRIMARY)
        assert after_outbox - outbox == (1 if shadow else 0)
        for other in self.scenarios:
            if other is not scenario:
                assert after_totals.legacy[other.item] == totals.legacy[other.item]
                assert after_totals.meter[other.customer] == totals.meter[other.customer]


@pytest.fixture
async def scenarios(standin_url: str) -> list[Scenario]:
    """Two customers on the legacy metered price."""
    return await shadow_and_primary(standin_url)


@pytest.fixture
def settings(standin_settings: SettingsFactory, scenarios: list[Scenario]) -> Settings:
    """Proxy settings mapping the customers' legacy price to the meter; no in-request retries."""
    base = standin_settings(stripe={"request_retries": 0})
    meter = MeterMapping(event_name=EVENT_NAME, legacy_prices=(scenarios[0].legacy_price,))
    return base.model_copy(update={"meters": (meter,)})


@pytest.fixture
async def world(
    settings: Settings, engine: DualWriteEngine, standin: StripeStandin, scenarios: list[Scenario]
) -> AsyncIterator[tuple[httpx.AsyncClient, ProxyOracle]]:
    """The proxy in-process (sharing the test's engine, no worker) and its oracle."""
    stages = {scenarios[0].customer: Stage.SHADOW, scenarios[1].customer: Stage.PRIMARY}
    for scenario in scenarios:
        await set_stage(engine, scenario.customer, stages[scenario.customer])
    app = create_proxy_app(settings, engine=engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        yield client, ProxyOracle(engine, standin, scenarios, stages)
    await app.aclose()


@pytest.mark.slow
class TestUsageRecordFuzz:
    """Every usage-record request through the proxy: 2xx and its usage, or 4xx and none."""

    @FUZZ
    @given(
        who=st.integers(min_value=0, max_value=1),
        quantity=st.one_of(
            st.integers(min_value=0, max_value=10**6).map(str),
            st.integers(min_value=0, max_value=10**6).map(lambda n: "0" * 20 + str(n)),
        ),
        timestamp=CURRENT.map(str),
        key=FRESH_KEYS,
        auth=st.sampled_from(["bearer", "basic"]),
    )
    async def test_valid_extremes(self, world, who, quantity, timestamp, key, auth):
        """Valid but unusual: large quantities, leading zeros, Basic auth, any key: all written."""
        client, oracle = world
        scenario = oracle.scenarios[who]
        body = urlencode({"quantity": quantity, "timestamp": timestamp}).encode()
        headers = [
            (b"Authorization", authorization(auth) or b""),
            (b"Content-Type", b"application/x-www-form-urlencoded"),
        ]
        if key is not None:
            headers.append((b"Idempotency-Key", key.encode("latin-1")))
        before = await oracle.snapshot()
        response = await client.post(
            f"/v1/subscription_items/{scenario.item}/usage_records", content=body, headers=headers
        )
        await oracle.check(
            before, response, scenario=scenario, dual_written=True, sent=Sent.of([quantity])
        )

    @FUZZ
    @pytest.mark.stripe_spec_unchecked_requests(
        reason="the proxy forwards the fuzzer's malformed usage records to the stand-in as sent"
    )
    @given(
        who=st.integers(min_value=0, max_value=2),
        junk=st.text(min_size=1, max_size=12),
        pairs=mostly(NO_EXTRA, st.lists(st.tuples(st.sampled_from(PARAMS), VALUES), max_size=5)),
        quantity=mostly(st.integers(min_value=0, max_value=40).map(str), st.none()),
        raw=mostly(st.none(), st.binary(max_size=40)),
        auth=AUTH,
        content_type=CONTENT_TYPES,
        key=IDEMPOTENCY_KEYS,
        connect=st.sampled_from([False] * 6 + [True]),
        oversized=st.sampled_from([False] * 12 + [True]),
    )
    async def test_usage_records(
        self, world, who, junk, pairs, quantity, raw, auth, content_type, key, connect, oversized
    ):
        """Wrong types, huge and fractional numbers, unknown and repeated params, bad keys."""
        client, oracle = world
        scenario = oracle.scenarios[who] if who < 2 else None
        item = scenario.item if scenario is not None else quote(junk, safe="")
        fields = list(pairs)
        if quantity is not None:
            fields.insert(0, ("quantity", quantity))
        body = raw if raw is not None else urlencode(fields).encode()
        if oversized:
            body += b"&colour=" + b"x" * 70_000
        headers: list[tuple[bytes, bytes]] = []
        if (value := authorization(auth)) is not None:
            headers.append((b"Authorization", value))
        if content_type is not None:
            headers.append((b"Content-Type", content_type.encode()))
        if key is not None:
            headers.append((b"Idempotency-Key", key.encode("latin-1")))
        if connect:
            headers.append((b"Stripe-Account", b"acct_1Fuzz"))
        headers.append((b"Stripe-Version", b"2025-02-24.acacia"))
        before = await oracle.snapshot()
        response = await client.post(
            f"/v1/subscription_items/{item}/usage_records", content=body, headers=headers
        )
        dual_written = not connect and auth in ("bearer", "basic")
        # Only what the proxy parses is read by the test: a request it forwards as is (Connect,
        # another key) is parsed by Stripe, whose rules (a repeated field) are Stripe's.
        sent = Sent.in_pairs(fields) if raw is None and dual_written else None
        await oracle.check(
            before, response, scenario=scenario, dual_written=dual_written, sent=sent
        )


class TestHeadersHttpCannotCarry:
    """Found by the fuzzer: header values the upstream request cannot carry are the caller's fault."""

    @pytest.mark.parametrize("value", [b"Bearer ", b"  Bearer x  "])
    async def test_surrounding_whitespace_is_trimmed(self, world, value):
        """``Authorization: Bearer `` reaches Stripe trimmed (its 401), never a 502."""
        client, _ = world
        response = await client.get("/v1/customers", headers=[(b"Authorization", value)])
        assert response.status_code == 401, response.text

    async def test_line_breaks_are_400(self, world):
        """A line break in a forwarded header (injection): 400, nothing sent upstream."""
        client, oracle = world
        before = len(oracle.standin.requests)
        response = await client.get(
            "/v1/customers",
            headers=[
                (b"Authorization", f"Bearer {STRIPE_KEY}".encode()),
                (b"Stripe-Account", b"a\r\nX-Injected: 1"),
            ],
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert len(oracle.standin.requests) == before
