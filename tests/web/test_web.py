"""The report page (``dualwrite.web``): real traffic through an engine (real Redis, the Stripe
stand-in), then the pages read through ``httpx.ASGITransport``."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser

import anyio
import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore
from dualwrite.ledger import DivergenceRecord, LegView
from dualwrite.models import Stage
from dualwrite.outbox import OutboxWorker
from dualwrite.proxy import create_proxy_app
from dualwrite.report import attention_rank, build_report
from dualwrite.server_thread import serve_in_thread
from dualwrite.testing import StripeStandin
from dualwrite.web import COOKIE_NAME, report_app
from dualwrite.web._chart import divergence_chart
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, ScenarioBuilder, make_settings, set_stage, usage

pytestmark = pytest.mark.anyio

TOKEN = "report-token-for-tests-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
REFUSED_QTY = 6
LEAKED_KEY = "sk_live_" + "Q" * 24
HOSTILE_ERROR = f'<script>alert("x")</script> refused with {LEAKED_KEY}'
ROLES = {
    "legacy": Stage.LEGACY,
    "shadow": Stage.SHADOW,
    "refused": Stage.SHADOW,
    "primary": Stage.PRIMARY,
    "meter": Stage.METER,
}
QUANTITIES = {
    "legacy": (3, 4),
    "shadow": (2, 5),
    "refused": (REFUSED_QTY, 1),
    "primary": (9, 2),
    "meter": (8,),
}
# Once drained: stage, events, legacy accepted, meter accepted, difference, failed, divergent, status.
EXPECTED = {
    "legacy": ("legacy", "2", "7", "0", "+7", "0/0", "", "parity"),
    "shadow": ("shadow", "2", "7", "7", "0", "0/0", "", "parity"),
    "refused": ("shadow", "2", "7", "1", "+6", "0/1", "1", "diverged"),
    "primary": ("primary", "2", "11", "11", "0", "0/0", "", "parity"),
    "meter": ("meter", "1", "0", "8", "-8", "0/0", "", "parity"),
}


# ---------------------------------------------------------------------------------------- traffic


@dataclass
class Traffic:
    """The customer id playing each role."""

    customers: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, role: str) -> str:
        return self.customers[role]


def web_settings(redis_url: str, prefix: str, api_base: str, token: str | None = TOKEN) -> Settings:
    """Test settings with the report token (or none)."""
    settings = make_settings(
        redis_url=redis_url, prefix=prefix, api_base=api_base, api_key=STRIPE_KEY
    )
    return settings.model_copy(update={"report_token": SecretStr(token) if token else None})


async def send_traffic(
    engine: DualWriteEngine, builder: ScenarioBuilder, standin: StripeStandin
) -> Traffic:
    """A customer at each stage (two at shadow), one shadow meter event refused for good with a
    hostile error message; delivered (the outbox drained)."""
    scenarios = {role: await builder.customer(role.title()) for role in ROLES}
    traffic = Traffic({role: scenario.customer for role, scenario in scenarios.items()})
    for role, stage in ROLES.items():
        await set_stage(engine, traffic[role], stage)
    standin.faults.refuse(
        path=r"/v1/billing/meter_events",
        where={
            "payload[stripe_customer_id]": traffic["refused"],
            "payload[value]": str(REFUSED_QTY),
        },
        status=400,
        code="parameter_invalid",
        message=HOSTILE_ERROR,
    )
    for role, quantities in QUANTITIES.items():
        for quantity in quantities:
            outcome = await engine.record(usage(scenarios[role], quantity))
            assert outcome.accepted, role
    with anyio.fail_after(20):
        await OutboxWorker(engine.outbox, engine.writer).drain()
    return traffic


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str) -> Settings:
    """Settings on this test's prefix, with the report token."""
    return web_settings(redis_url, key_prefix, standin_url)


@pytest.fixture
async def traffic(engine, builder, standin: StripeStandin) -> Traffic:
    """Usage for five customers, delivered."""
    return await send_traffic(engine, builder, standin)


def client_for(app, *, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """An httpx client on the ASGI app."""
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers)


@contextmanager
def recording_upstream(forwarded: list[str]) -> Iterator[str]:
    """A real upstream on loopback (uvicorn in a thread) that answers every path with an empty
    list and records the paths it was asked for; yields its base URL."""

    async def upstream(request: Request) -> JSONResponse:
        forwarded.append(request.url.path)
        return JSONResponse({"object": "list", "data": []})

    app = Starlette(routes=[Route("/{path:path}", upstream)])
    server = uvicorn.Server(
        uvicorn.Config(app, port=0, lifespan="off", log_config=None, log_level="error")
    )
    failure = RuntimeError("the test upstream did not start")
    with serve_in_thread(server, name="test-upstream", failure=failure, grace=1) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def client(settings, engine) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the report app (sharing the engine), sending the bearer token."""
    async with client_for(report_app(settings, engine=engine), headers=BEARER) as client:
        yield client


# ---------------------------------------------------------------------------------- HTML reading


class Tables(HTMLParser):
    """The body rows of each table of a page, as cell texts, by the table's class."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._in_body = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = dict(attrs).get("class") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table(html: str, name: str) -> list[list[str]]:
    """The body rows of the table of class ``name``."""
    tables = Tables(html).tables
    assert name in tables, f"no table {name!r} in the page (tables: {sorted(tables)})"
    return tables[name]


def customer_rows(html: str) -> dict[str, list[str]]:
    """The overview's customer table by customer id (the first cell)."""
    return {row[0]: row[1:] for row in table(html, "customers")}


def data_value(html: str, attribute: str, value: str) -> str:
    """The text of the element carrying ``attribute="value"`` (summary figures)."""
    match = re.search(rf'{attribute}="{re.escape(value)}">([^<]*)<', html)
    assert match, f"no element with {attribute}={value!r}"
    return match.group(1)


# ------------------------------------------------------------------------------------------ tests


class TestOverview:
    """The overview's summary, leg totals, chart and customer table hold the traffic's numbers."""

    async def test_customer_table(self, client, traffic):
        """Each customer's line: stage, events, both legs, difference, failed, divergent, status."""
        response = await client.get("/")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        rows = customer_rows(response.text)
        assert set(rows) == {traffic[role] for role in ROLES}
        for role, expected in EXPECTED.items():
            row = rows[traffic[role]]
            # Columns: stage, events, legacy, meter, difference, pending, failed, divergent, status.
            cells = (row[0], row[1], row[2], row[3], row[4].split(" ")[0], *row[6:9])
            assert cells == expected, role
            assert row[5] == "", role  # nothing pending once drained
        assert "(+85.71 %)" in rows[traffic["refused"]][4]
        assert rows[traffic["legacy"]][9] == "ready for shadow"

    async def test_summary(self, client, traffic):
        """Customers per stage and per status, and the totals on each leg."""
        html = (await client.get("/")).text
        assert data_value(html, "id", "customer-count") == "5"
        stages = {stage.value: data_value(html, "data-stage", stage.value) for stage in Stage}
        assert stages == {"legacy": "1", "shadow": "2", "primary": "1", "meter": "1"}
        statuses = {
            s: data_value(html, "data-status", s) for s in ("parity", "pending", "diverged")
        }
        assert statuses == {"parity": "4", "pending": "0", "diverged": "1"}
        legs = {row[0]: row[1:] for row in table(html, "legs")}
        # expected, accepted, pending, failed, late refused, retired, refused to callers
        assert legs["legacy"] == ["32", "32", "0", "0", "0", "0", "0"]
        assert legs["meter"] == ["33", "27", "0", "6", "0", "0", "0"]

    async def test_divergences_over_time(self, client, traffic):
        """The chart has the refused event as one bar segment, hourly, and its data table."""
        html = (await client.get("/")).text
        assert "<svg" in html and "Divergent events per hour" in html
        assert re.search(r'class="bar"[^>]*data-kind="shadow_refused" data-count="1"', html)
        [bucket] = table(html, "chart-data")
        assert bucket[1:] == ["1", "shadow_refused 1"]

    async def test_latest_divergences(self, client, traffic):
        """The refused event with both legs: legacy accepted with its Stripe id, meter refused."""
        html = (await client.get("/")).text
        [row] = table(html, "divergences")
        assert row[1] == traffic["refused"] and row[2] == "shadow_refused"
        assert row[3].startswith(f"{EVENT_NAME} in ") and row[4] == str(REFUSED_QTY)
        assert row[5].startswith("accepted ") and len(row[5].split()) == 2  # status and Stripe id
        assert row[6].startswith("refused ") and "parameter_invalid" in row[6]

    async def test_own_connection(self, settings, traffic):
        """Without an engine the app reads through a Redis connection of its own, closed by
        aclose()."""
        async with report_app(settings) as app, client_for(app, headers=BEARER) as client:
            html = (await client.get("/")).text
        assert set(customer_rows(html)) == set(traffic.customers.values())

    async def test_empty(self, client):
        """No traffic yet: an empty overview that says so."""
        response = await client.get("/")
        assert response.status_code == 200
        assert (
            'id="no-customers"' in response.text
            and "nothing has been recorded yet" in response.text
        )
        assert "No divergent event in the log" in response.text

    async def test_needing_a_look_first_by_default(self, client, traffic, engine, settings):
        """Without a sort, the table is in the CLI's order: those needing a look first; the old
        sort=status links give the same order."""
        default = list(customer_rows((await client.get("/")).text))
        assert default[0] == traffic["refused"]
        report = await build_report(engine.ledger, engine.resolver, settings=settings.report)
        assert default == [line.customer for line in sorted(report.customers, key=attention_rank)]
        assert list(customer_rows((await client.get("/?sort=status")).text)) == default
        by_id = list(customer_rows((await client.get("/?sort=customer")).text))
        assert by_id == sorted(by_id)

    async def test_paging(self, client, traffic, monkeypatch):
        """Pages of PAGE_SIZE customers, with links that keep the filters."""
        monkeypatch.setattr("dualwrite.web._app.PAGE_SIZE", 2)
        first = (await client.get("/?sort=difference")).text
        assert len(customer_rows(first)) == 2 and "page 1 of 3" in first
        assert 'href="/?sort=difference&amp;page=2"' in first
        last = (await client.get("/?sort=difference&page=3")).text
        assert len(customer_rows(last)) == 1 and "page 3 of 3" in last
        beyond = (await client.get("/?page=9")).text
        assert "page 3 of 3" in beyond


def divergence(at: float, kind: str = "shadow_refused") -> DivergenceRecord:
    """A divergence log entry at ``at`` (only the fields the chart reads matter)."""
    view = LegView(status="accepted", stripe_id="mbur_1")
    return DivergenceRecord(
        id="0-1", at=at, kind=kind, identifier="i", customer="cus_a", event_name=EVENT_NAME,
        period="2026-11-01", stage="shadow", quantity=1, action="increment",
        subscription_item=None, legacy=view, meter=LegView(status="refused", error="no"), note="",
    )  # fmt: skip


class TestChart:
    """Divergence log entries bucketed per hour (recent) or per day, stacked by kind."""

    NOW = 1_800_001_800.0  # 2027-01-15 08:30:00Z

    def test_hourly(self):
        """Entries of the last 48 hours: hourly buckets (at least 24), counts per kind."""
        records = [divergence(self.NOW - 60), divergence(self.NOW - 120, "late_refusal")]
        records += [divergence(self.NOW - 5 * 3600)] * 3
        chart = divergence_chart(records, now=self.NOW)
        assert chart.unit == "hour" and len(chart.buckets) == 24 and chart.older == 0
        last, five_ago = chart.buckets[-1], chart.buckets[-6]
        assert [(s.kind, s.count) for s in last.segments] == [
            ("shadow_refused", 1),
            ("late_refusal", 1),
        ]
        assert five_ago.total == 3 and last.label == "2027-01-15 08:00Z"
        assert chart.peak == 5 and [tick for tick, _ in chart.y_ticks] == [0, 5]
        assert [kind for kind, _ in chart.legend] == ["shadow_refused", "late_refusal"]

    def test_daily_and_older(self):
        """Older entries switch to days (at most 60); beyond the window they are only counted."""
        records = [divergence(self.NOW - days * 86_400) for days in (3, 3, 10, 59, 75, 400)]
        chart = divergence_chart(records, now=self.NOW)
        assert chart.unit == "day" and len(chart.buckets) == 60
        assert (chart.shown, chart.older) == (4, 2)
        assert {bucket.label: bucket.total for bucket in chart.buckets if bucket.total} == {
            "2027-01-12": 2,
            "2027-01-05": 1,
            "2026-11-17": 1,
        }
        assert chart.peak == 2 and [tick for tick, _ in chart.y_ticks] == [0, 1, 2]
        assert len(chart.x_labels) <= 8 and chart.x_labels[0][1] == "Jan 15"

    def test_future_and_empty(self):
        """An entry stamped after now lands in the last bucket; no entries draw no bar."""
        chart = divergence_chart([divergence(self.NOW + 30)], now=self.NOW)
        assert chart.buckets[-1].total == 1
        empty = divergence_chart([], now=self.NOW)
        assert empty.shown == 0 and all(not bucket.segments for bucket in empty.buckets)
        assert empty.peak == 1

    def test_bars_fit(self):
        """Bars stay inside the plot, stacked segments up from the baseline, the peak at the top."""
        records = [divergence(self.NOW - 3600 * hours) for hours in range(30) for _ in range(hours)]
        chart = divergence_chart(records, now=self.NOW)
        assert chart.peak == 50  # the busiest hour has 29
        for bucket in chart.buckets:
            assert chart.left <= bucket.x and bucket.x + chart.bar_width <= chart.right_edge
            for segment in bucket.segments:
                assert segment.y >= 0 and segment.y + segment.height <= chart.baseline + 0.01


class TestFilters:
    """The GET form narrows the table (and the summary) and keeps its values."""

    async def test_stage(self, client, traffic):
        """stage=shadow keeps the two shadow customers, and the form shows shadow selected."""
        html = (await client.get("/", params={"stage": "shadow"})).text
        assert set(customer_rows(html)) == {traffic["shadow"], traffic["refused"]}
        assert '<option value="shadow" selected>' in html
        assert data_value(html, "id", "customer-count") == "2"

    async def test_only_divergent(self, client, traffic):
        """divergent=1 keeps the diverged customer."""
        html = (await client.get("/", params={"divergent": "1"})).text
        assert list(customer_rows(html)) == [traffic["refused"]]
        assert 'name="divergent" value="1" checked' in html

    async def test_customer(self, client, traffic):
        """customer=<id> keeps that customer; an unknown one matches nothing."""
        html = (await client.get("/", params={"customer": traffic["meter"]})).text
        assert list(customer_rows(html)) == [traffic["meter"]]
        html = (await client.get("/", params={"customer": "cus_nobody"})).text
        assert 'id="no-customers"' in html and "customers" not in Tables(html).tables

    async def test_period(self, client, traffic):
        """A range of days after today holds nothing."""
        html = (await client.get("/", params={"since": "2999-01-01", "until": "2999-01-31"})).text
        assert 'id="no-customers"' in html

    async def test_sort(self, client, traffic):
        """sort=difference puts the largest absolute difference first."""
        html = (await client.get("/", params={"sort": "difference"})).text
        assert next(iter(customer_rows(html))) == traffic["meter"]  # -8

    @pytest.mark.parametrize(
        "query",
        [
            "stage=bogus",
            "since=yesterday",
            "since=\uff12\uff10\uff12\uff16-01-01",  # full-width digits
            "sort=random",
            "page=0",
            "page=²",
            "customer=" + "c" * 300,
        ],
    )
    async def test_bad_values(self, client, query):
        """A value the form never sends is a 400 page naming the field."""
        response = await client.get(f"/?{query}")
        assert response.status_code == 400
        assert query.split("=")[0] in response.text


class TestCustomerPage:
    """A customer's lines per period, its divergent events and its flag history."""

    async def test_periods(self, client, engine, traffic):
        """One line per ledger row, whose quantities add up to the customer's totals."""
        customer = traffic["refused"]
        html = (await client.get(f"/customers/{customer}")).text
        rows = table(html, "periods")
        ledger_rows = await engine.ledger.rows(customer=customer)
        assert len(rows) == len(ledger_rows) >= 1
        assert sum(int(row[3]) for row in rows) == REFUSED_QTY + 1
        assert sum(int(row[4]) for row in rows) == REFUSED_QTY + 1  # legacy accepted
        assert sum(int(row[5]) for row in rows) == 1  # meter accepted
        assert {row[1] for row in rows} == {EVENT_NAME}

    async def test_divergent_events(self, client, traffic):
        """Its refused event, with the legacy Stripe id and the meter's error."""
        html = (await client.get(f"/customers/{traffic['refused']}")).text
        [row] = table(html, "divergences")
        assert row[1] == "shadow_refused" and row[3] == str(REFUSED_QTY)
        assert row[4].startswith("accepted ") and row[5].startswith("refused ")
        assert 'class="pill diverged">diverged<' in html

    async def test_flag_history(self, client, traffic):
        """The override the traffic set, with actor, old and new value, and reason."""
        html = (await client.get(f"/customers/{traffic['primary']}")).text
        [entry] = table(html, "audit")
        assert entry[1:] == [
            "tests",
            "set_override",
            traffic["primary"],
            "unset",
            "primary",
            "test set-up",
        ]
        assert "decided by the override rule" in html

    async def test_without_divergence(self, client, traffic):
        """A customer at parity: no divergent event, and its verdict."""
        html = (await client.get(f"/customers/{traffic['legacy']}")).text
        assert "None in the divergence log." in html
        assert 'id="verdict"' in html and "shadow" in html

    async def test_unknown(self, client, traffic):
        """A customer nothing is recorded for is a 404 page."""
        response = await client.get("/customers/cus_unknown")
        assert response.status_code == 404
        assert "Nothing is recorded for customer cus_unknown" in response.text

    async def test_linked_from_the_overview(self, client, traffic):
        """The overview links each customer to its page."""
        html = (await client.get("/")).text
        assert f'href="/customers/{traffic["shadow"]}"' in html


class TestFlagHistory:
    """The audit log, newest first, with the global flags now."""

    async def test_newest_first(self, client, engine):
        """Every change, newest first; global ones say so; the current default is shown."""
        store = RedisFlagStore(engine.redis, engine.keys)
        await store.set_override("cus_a", Stage.SHADOW, actor="alice", reason="first")
        await store.set_default(Stage.SHADOW, actor="bob", reason="second")
        await store.set_override("cus_b", Stage.PRIMARY, actor="carol", reason="third")
        html = (await client.get("/flags")).text
        rows = table(html, "audit")
        assert [row[1] for row in rows] == ["carol", "bob", "alice"]
        assert rows[1][3] == "all customers" and rows[1][4:6] == ["unset", "shadow"]
        assert "<dt>default stage</dt><dd>shadow</dd>" in html

    async def test_filter_and_limit(self, client, engine):
        """customer= keeps that customer's changes; limit= caps the entries."""
        store = RedisFlagStore(engine.redis, engine.keys)
        for stage in (Stage.SHADOW, Stage.PRIMARY, Stage.METER):
            await store.set_override("cus_a", stage, actor="alice")
        await store.set_override("cus_b", Stage.SHADOW, actor="bob")
        rows = table((await client.get("/flags", params={"customer": "cus_a"})).text, "audit")
        assert [row[5] for row in rows] == ["meter", "primary", "shadow"]
        rows = table((await client.get("/flags", params={"limit": "2"})).text, "audit")
        assert len(rows) == 2
        for bad in ("0", "²", "2001", "-1"):
            assert (await client.get("/flags", params={"limit": bad})).status_code == 400


class TestEscaping:
    """Untrusted text is escaped, and secrets never reach a page."""

    async def test_divergence_message(self, client, traffic):
        """A divergence error holding <script> and a Stripe key shows escaped and masked."""
        for path in ("/", f"/customers/{traffic['refused']}"):
            html = (await client.get(path)).text
            assert "<script>" not in html
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
            assert LEAKED_KEY not in html and "sk_live_****QQQQ" in html

    async def test_audit_reason_and_customer_id(self, client, engine):
        """Hostile text in the audit log (written by hand: the store refuses such ids) is inert,
        and links quote ids."""
        hostile = {
            "at": "1700000000.0",
            "actor": "<b>eve</b>",
            "action": "set_override",
            "customer": 'cus_"><img src=x onerror=alert(1)>',
            "old": "",
            "new": "shadow",
            "reason": "<i>x",
        }
        await engine.redis.xadd(engine.keys.flags_audit, hostile)
        html = (await client.get("/flags")).text
        assert "<img" not in html and "<b>eve" not in html and "<i>x" not in html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html
        assert 'href="/customers/cus_%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E"' in html


class TestAccess:
    """Every page needs the token; without one configured, nothing is served."""

    @pytest.mark.parametrize("path", ["/", "/flags", "/customers/x", "/nope"])
    async def test_no_credentials(self, settings, engine, traffic, path):
        """401 with a Bearer challenge and a sign-in form, and no data at all."""
        async with client_for(report_app(settings, engine=engine)) as client:
            response = await client.get(path)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="dualwrite report"'
        assert all(customer not in response.text for customer in traffic.customers.values())
        assert "<table" not in response.text and 'name="token"' in response.text

    @pytest.mark.parametrize(
        "header", [f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN[:-1]}"]
    )
    async def test_wrong_token(self, settings, engine, traffic, header):
        """A wrong or malformed credential: 401 invalid_token, no data."""
        async with client_for(report_app(settings, engine=engine)) as client:
            response = await client.get("/", headers={"Authorization": header})
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        assert all(customer not in response.text for customer in traffic.customers.values())

    @pytest.mark.parametrize("token", [None, "", "short-token"])
    async def test_no_token_configured(self, redis_url, key_prefix, standin_url, token):
        """Unset, empty or too short: 403 for everyone, saying to set DUALWRITE_REPORT_TOKEN."""
        settings = web_settings(redis_url, key_prefix, standin_url, token=None)
        if token is not None:
            settings = settings.model_copy(update={"report_token": SecretStr(token)})
        async with report_app(settings) as app, client_for(app) as client:
            for headers in ({}, {"Authorization": f"Bearer {token}"}):
                response = await client.get("/", headers=headers)
                assert response.status_code == 403
                assert "set it to" in response.text.lower()
                assert "DUALWRITE_REPORT_TOKEN" in response.text
            response = await client.get("/", params={"token": token or ""})
            assert response.status_code == 403 and "set-cookie" not in response.headers

    async def test_token_from_the_environment(self, monkeypatch):
        """DUALWRITE_REPORT_TOKEN is read from the environment only."""
        monkeypatch.setenv("DUALWRITE_REPORT_TOKEN", TOKEN)
        assert Settings.load().report_token_value() == TOKEN
        monkeypatch.setenv("DUALWRITE_REPORT_TOKEN", "")
        assert Settings.load().report_token_value() is None

    async def test_token_refused_in_config_files(self, tmp_path):
        """A config file holding the report token is refused."""
        from dualwrite.exceptions import ConfigError

        path = tmp_path / "dualwrite.toml"
        path.write_text(f'report_token = "{TOKEN}"\n')
        with pytest.raises(ConfigError, match="DUALWRITE_REPORT_TOKEN environment variable"):
            Settings.load(path)

    async def test_security_headers(self, client, settings, engine):
        """Pages and refusals are not cached, and may run no script."""
        async with client_for(report_app(settings, engine=engine)) as anonymous:
            refused = await anonymous.get("/")
        for response in (await client.get("/"), refused):
            assert response.headers["cache-control"] == "no-store"
            assert "default-src 'none'" in response.headers["content-security-policy"]
            assert "script-src" not in response.headers["content-security-policy"]
            assert response.headers["x-content-type-options"] == "nosniff"


class TestCookie:
    """A browser signs in once (?token= or the form) and then carries an HttpOnly cookie."""

    async def test_query_token(self, settings, engine, traffic):
        """?token= redirects to the same URL without it, setting the cookie that then suffices."""
        async with client_for(report_app(settings, engine=engine)) as client:
            response = await client.get(f"/customers/{traffic['shadow']}?token={TOKEN}&x=1")
            assert response.status_code == 303
            assert response.headers["location"] == f"/customers/{traffic['shadow']}?x=1"
            cookie = response.headers["set-cookie"]
            assert cookie.startswith(f"{COOKIE_NAME}=") and TOKEN not in cookie
            for attribute in ("HttpOnly", "SameSite=strict", "Path=/", "Max-Age=43200"):
                assert attribute in cookie
            assert "Secure" not in cookie  # plain http here
            page = await client.get(response.headers["location"])
            assert page.status_code == 200 and traffic["shadow"] in page.text

    async def test_wrong_query_token(self, settings, engine):
        """A wrong ?token= is a 401 and sets nothing."""
        async with client_for(report_app(settings, engine=engine)) as client:
            response = await client.get("/", params={"token": "nope"})
        assert response.status_code == 401 and "set-cookie" not in response.headers

    async def test_forged_cookie(self, settings, engine):
        """A cookie that is not the token's MAC (the token itself, say) is refused."""
        for value in (TOKEN, "0" * 64, ""):
            async with client_for(report_app(settings, engine=engine)) as client:
                client.cookies.set(COOKIE_NAME, value)
                assert (await client.get("/")).status_code == 401

    async def test_login_form(self, settings, engine):
        """The 401 page's form posts the token; the cookie is set and the page opens."""
        async with client_for(report_app(settings, engine=engine)) as client:
            refused = await client.get("/flags?customer=cus_a")
            assert 'name="next" value="/flags?customer=cus_a"' in refused.text
            response = await client.post(
                "/login", data={"token": TOKEN, "next": "/flags?customer=cus_a"}
            )
            assert response.status_code == 303
            assert response.headers["location"] == "/flags?customer=cus_a"
            assert (await client.get("/flags")).status_code == 200
            wrong = await client.post("/login", data={"token": "nope", "next": "/"})
            assert wrong.status_code == 401 and "not the report token" in wrong.text

    @pytest.mark.parametrize(
        "target", ["https://evil.example/", "//evil.example/", "/\\evil", "/login", "flags"]
    )
    async def test_login_redirects_only_inside(self, settings, engine, target):
        """After signing in, only a path of the app itself is followed (no open redirect)."""
        async with client_for(report_app(settings, engine=engine)) as client:
            response = await client.post("/login", data={"token": TOKEN, "next": target})
        assert response.status_code == 303 and response.headers["location"] == "/"

    async def test_login_limits(self, settings, engine):
        """The form's body is capped; the login path itself needs the token too."""
        async with client_for(report_app(settings, engine=engine)) as client:
            response = await client.post("/login", data={"token": "x" * 5000})
            assert response.status_code == 413
            page = await client.get("/login")
            assert page.status_code == 401 and 'name="next" value="/"' in page.text

    async def test_mounted(self, settings, engine, traffic):
        """Mounted under /_dualwrite: links, the cookie's path and redirects carry the prefix."""
        outer = Starlette(routes=[Mount("/_dualwrite", report_app(settings, engine=engine))])
        async with client_for(outer) as client:
            response = await client.get(f"/_dualwrite/?token={TOKEN}")
            assert response.headers["location"] == "/_dualwrite/"
            assert "Path=/_dualwrite/" in response.headers["set-cookie"]
            html = (await client.get("/_dualwrite/")).text
            assert f'href="/_dualwrite/customers/{traffic["meter"]}"' in html
            assert 'action="/_dualwrite/"' in html and 'href="/_dualwrite/flags"' in html


class TestRedisDown:
    """Redis unreachable: a 503 page that says so, and nothing about where Redis is."""

    async def test_503(self, key_prefix, standin_url):
        """Every page is a 503 naming Redis, with no address and no stack trace."""
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        settings = web_settings(f"redis://:hunter2@127.0.0.1:{port}/0", key_prefix, standin_url)
        async with report_app(settings) as app, client_for(app, headers=BEARER) as client:
            for path in ("/", "/customers/cus_a", "/flags"):
                response = await client.get(path)
                assert response.status_code == 503, path
                assert "Redis is unavailable" in response.text
                assert response.headers["retry-after"] == "10"
                for leak in (str(port), "127.0.0.1", "hunter2", "Traceback", "Error"):
                    assert leak not in response.text, (path, leak)


class TestProxy:
    """The proxy serves the report under /_dualwrite/, and still health and everything else."""

    async def test_report_health_and_forwarding(self, settings, engine, traffic):
        """/_dualwrite/ is the report (token required); health, the webhook path and the Stripe API
        are answered as before."""
        forwarded: list[str] = []
        with recording_upstream(forwarded) as upstream_url:
            stripe = settings.stripe.model_copy(update={"api_base": upstream_url})
            proxy = create_proxy_app(settings.model_copy(update={"stripe": stripe}), engine=engine)
            try:
                async with client_for(proxy) as client:
                    refused = await client.get("/_dualwrite/")
                    assert refused.status_code == 401 and "www-authenticate" in refused.headers
                    page = await client.get("/_dualwrite/", headers=BEARER)
                    assert page.status_code == 200
                    assert set(customer_rows(page.text)) == set(traffic.customers.values())
                    assert f'href="/_dualwrite/customers/{traffic["refused"]}"' in page.text
                    customer = await client.get(
                        f"/_dualwrite/customers/{traffic['refused']}", headers=BEARER
                    )
                    assert customer.status_code == 200 and "shadow_refused" in customer.text
                    flags = await client.get("/_dualwrite/flags", headers=BEARER)
                    assert flags.status_code == 200
                    signed_in = await client.get(f"/_dualwrite/flags?token={TOKEN}")
                    assert signed_in.headers["location"] == "/_dualwrite/flags"
                    assert "Path=/_dualwrite/" in signed_in.headers["set-cookie"]
                    bare = await client.get("/_dualwrite", headers=BEARER)
                    assert bare.status_code in (307, 308)
                    assert bare.headers["location"].endswith("/_dualwrite/")
                    health = await client.get("/_dualwrite/health")
                    assert health.status_code == 200 and health.json()["redis"] == "ok"
                    webhook = await client.get(settings.webhooks.path)  # no signing secret
                    assert webhook.status_code == 404 and "www-authenticate" not in webhook.headers
                    assert forwarded == []
                    stripe_call = await client.get(
                        "/v1/customers", headers={"Authorization": "Bearer sk"}
                    )
                    assert stripe_call.status_code == 200 and forwarded == ["/v1/customers"]
            finally:
                await proxy.aclose()
