"""The admin API's cutover operations (``dualwrite.admin._cutover``): each one over HTTP leaves the
same flags and audit log as ``CutoverOps`` on a second key prefix, dry runs change nothing, bad
input is refused as the CLI refuses it, and the OpenAPI document describes what is served."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
import redis.asyncio as aioredis
from openapi_spec_validator import validate as validate_spec
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.routing import Mount
from typer.testing import CliRunner

from dualwrite.admin import AdminApp
from dualwrite.cli import app as cli_app
from dualwrite.config import Settings
from dualwrite.cutover import GUARD_ACTOR, CutoverOps
from dualwrite.engine import DualWriteEngine
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.testing import StripeStandin
from tests.admin.test_admin import AUTH, ROOT, TOKEN, assert_stripe_error
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.cutover.test_cutover import FakeClock
from tests.cutover.test_guard import record_and_deliver, refuse_meter_events
from tests.support import ScenarioBuilder, make_settings, set_stage, unreachable_redis_settings

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("clean_environment")]


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """The stand-in and its key, the admin token, guardrails tight enough for two customers."""
    return standin_settings(guardrails={"max_divergent_events": 0, "min_customers": 3}).model_copy(
        update={"admin_token": SecretStr(TOKEN)}
    )


@pytest.fixture
def clock(standin: StripeStandin) -> FakeClock:
    """Stopped at the stand-in's now (its subscriptions' periods are around it)."""
    return FakeClock(float(int(standin.clock.now())))


@pytest.fixture
async def http(settings: Settings, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    """The admin API on this test's prefix, mounted under ``/_dualwrite/admin`` as a user would."""
    api = AdminApp(settings, clock=clock)
    outer = Starlette(routes=[Mount(ROOT, api)])
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client
    await api.aclose()


@pytest.fixture
def ops(redis_client: aioredis.Redis, settings: Settings, clock: FakeClock) -> CutoverOps:
    """The library on the API's prefix (to set up and to read)."""
    return CutoverOps(redis_client, KeySpace(settings.redis.key_prefix), settings, clock=clock)


@pytest.fixture
async def twin(
    redis_client: aioredis.Redis, settings: Settings, clock: FakeClock
) -> AsyncIterator[CutoverOps]:
    """The library on a second prefix of this test's own (deleted afterwards), same clock."""
    prefix = f"dwtest-{uuid.uuid4().hex[:12]}"
    redis = settings.redis.model_copy(update={"key_prefix": prefix})
    yield CutoverOps(
        redis_client, KeySpace(prefix), settings.model_copy(update={"redis": redis}), clock=clock
    )
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await redis_client.unlink(*keys)


async def state(ops: CutoverOps, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """Every flag and every audit entry (ids aside) under ``ops``'s prefix; ``rename`` swaps
    customer ids so that two customers' states compare."""
    keys, redis = ops.keys, ops.redis
    found = {
        "config": await redis.hgetall(keys.flags_config),
        "override": await redis.hgetall(keys.flags_override),
        "schedule": await redis.hgetall(keys.flags_schedule),
        "guard": await redis.hgetall(keys.guard_state),
        "audit": [e.model_dump(exclude={"id"}) for e in await ops.store.history(limit=10_000)],
    }
    text = json.dumps(found, sort_keys=True)
    for old, new in (rename or {}).items():
        text = text.replace(old, new)
    loaded: dict[str, Any] = json.loads(text)
    return loaded


async def post(http: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    """POST ``body`` as JSON to the admin API with the token."""
    return await http.post(f"{ROOT}{path}", json=body, headers=AUTH)


def ok(response: httpx.Response) -> dict[str, Any]:
    """The JSON of a 200."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


class TestSameAsTheLibrary:
    """Each operation over HTTP leaves the flags and audit log ``CutoverOps`` leaves."""

    async def test_rollouts(self, http: httpx.AsyncClient, ops: CutoverOps, twin: CutoverOps):
        """Percentages (a number or "25%") and named cohorts, forced and not."""
        steps: list[tuple[dict[str, Any], Callable[[CutoverOps], Any]]] = [
            (
                {"stage": "shadow", "percent": "25%", "actor": "ann", "reason": "pilot"},
                lambda o: o.rollout(Stage.SHADOW, percent=25, actor="ann", reason="pilot"),
            ),
            (
                {"stage": "Shadow", "percent": 30.5},
                lambda o: o.rollout(Stage.SHADOW, percent=30.5, actor="admin-api"),
            ),
            (
                {"stage": "shadow", "customers": ["cus_a", "cus_b,cus_c", "cus_a"], "actor": "b"},
                lambda o: o.rollout(Stage.SHADOW, customers=["cus_a", "cus_b", "cus_c"], actor="b"),
            ),
            (
                {"stage": "meter", "customers": ["cus_b"], "force": True, "reason": "vip"},
                lambda o: o.rollout(
                    Stage.METER, customers=["cus_b"], actor="admin-api", reason="vip", force=True
                ),
            ),
            (
                {"stage": "shadow", "customers": ["cus_a"]},
                lambda o: o.rollout(Stage.SHADOW, customers=["cus_a"], actor="admin-api"),
            ),
        ]
        for body, call in steps:
            answer = ok(await post(http, "/rollout", body))
            assert answer == (await call(twin)).model_dump(mode="json")
        assert answer["unchanged"] == ["cus_a is already shadow"]
        assert await state(ops) == await state(twin)
        assert (await ops.stage_of("cus_b"))[0] is Stage.METER

    async def test_cutover_at_the_period_end(
        self, http: httpx.AsyncClient, ops: CutoverOps, twin: CutoverOps, builder: ScenarioBuilder
    ):
        """The period end read from Stripe (no schedule), then now and an ISO time."""
        scenario = await builder.customer()
        customer = scenario.customer
        for lib in (ops, twin):
            await lib.store.set_override(customer, Stage.SHADOW, actor="setup")
        answer = ok(await post(http, f"/customers/{customer}/cutover", {"to": "primary"}))
        expected = await twin.cutover(customer, Stage.PRIMARY, at="period-end", actor="admin-api")
        assert answer == expected.model_dump(mode="json")
        assert [c["path"] for c in answer["stripe_calls"]] == ["/v1/subscriptions"]
        assert await state(ops) == await state(twin)

        for lib in (ops, twin):
            await lib.store.set_override("cus_now", Stage.SHADOW, actor="setup")
            await lib.store.set_override("cus_iso", Stage.PRIMARY, actor="setup")
        body = {"to": "primary", "at": "now", "actor": "ann", "reason": "go"}
        ok(await post(http, "/customers/cus_now/cutover", body))
        await twin.cutover("cus_now", Stage.PRIMARY, at="now", actor="ann", reason="go")
        at = "2030-01-01T00:00:00+01:00"
        ok(await post(http, "/customers/cus_iso/cutover", {"to": "meter", "at": at}))
        await twin.cutover("cus_iso", Stage.METER, at=1_893_452_400, actor="admin-api")
        assert await state(ops) == await state(twin)
        assert (await ops.stage_of("cus_now"))[0] is Stage.PRIMARY

    async def test_cutover_with_the_stripe_schedule(
        self,
        http: httpx.AsyncClient,
        ops: CutoverOps,
        twin: CutoverOps,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        clock: FakeClock,
    ):
        """The schedule is created in Stripe and the flags switch at the same instant."""
        mine, theirs = await builder.customer("api"), await builder.customer("library")
        await ops.store.set_override(mine.customer, Stage.SHADOW, actor="setup")
        await twin.store.set_override(theirs.customer, Stage.SHADOW, actor="setup")
        body = {
            "to": "primary",
            "with_schedule": True,
            "price": mine.meter_price,
            "actor": "ann",
            "reason": "wave 1",
        }
        answer = ok(await post(http, f"/customers/{mine.customer}/cutover", body))
        expected = await twin.cutover(
            theirs.customer,
            Stage.PRIMARY,
            at="period-end",
            with_schedule=True,
            price=theirs.meter_price,
            actor="ann",
            reason="wave 1",
        )
        assert (
            answer["changes"]
            == json.loads(
                expected.model_dump_json(include={"changes"}).replace(
                    theirs.customer, mine.customer
                )
            )["changes"]
        )
        assert await state(ops) == await state(twin, {theirs.customer: mine.customer})
        created = [call for call in answer["stripe_calls"] if call["method"] == "POST"]
        schedule = created[0]["result_id"]
        assert schedule.startswith("sub_sched_") and created[1]["result_id"] == schedule
        (end,) = [c["at"] for c in answer["changes"] if c["new"] == "primary"]
        standin.clock.set(end)
        item = await builder.client.v1.subscription_items.retrieve_async(mine.item)
        assert item["price"]["id"] == mine.meter_price
        clock.now = end
        assert (await ops.stage_of(mine.customer))[0] is Stage.PRIMARY

    async def test_rollbacks(self, http: httpx.AsyncClient, ops: CutoverOps, twin: CutoverOps):
        """One customer back a stage, named ones to a stage, then everyone to shadow and legacy."""
        for lib in (ops, twin):
            await lib.rollout(Stage.SHADOW, percent=60, actor="setup")
            await lib.rollout(Stage.PRIMARY, percent=30, actor="setup")
            await lib.store.set_override("cus_p", Stage.PRIMARY, actor="setup")
            await lib.store.set_override("cus_m", Stage.METER, actor="setup")
            await lib.cutover("cus_q", Stage.SHADOW, at="now", actor="setup")
        steps: list[tuple[dict[str, Any], Callable[[CutoverOps], Any]]] = [
            (
                {"customers": ["cus_p"], "actor": "oncall", "reason": "invoices look wrong"},
                lambda o: o.rollback(["cus_p"], actor="oncall", reason="invoices look wrong"),
            ),
            (
                {"customers": ["cus_q", "cus_m"], "to": "legacy", "force": True},
                lambda o: o.rollback(
                    ["cus_q", "cus_m"], to=Stage.LEGACY, actor="admin-api", force=True
                ),
            ),
            (
                {"all": True, "to": "shadow", "reason": "incident"},
                lambda o: o.rollback_all(to=Stage.SHADOW, actor="admin-api", reason="incident"),
            ),
            ({"all": True}, lambda o: o.rollback_all(actor="admin-api")),
        ]
        for body, call in steps:
            answer = ok(await post(http, "/rollback", body))
            assert answer == (await call(twin)).model_dump(mode="json")
            assert answer["changes"]
        assert await state(ops) == await state(twin)
        assert (await ops.stage_of("cus_p"))[0] is Stage.LEGACY


async def test_guard_once(
    http: httpx.AsyncClient,
    engine: DualWriteEngine,
    builder: ScenarioBuilder,
    standin: StripeStandin,
    ops: CutoverOps,
):
    """A dry pass reports the diverging customer and changes nothing; a real one rolls it back,
    audited as the guard, as ``guard_once`` does."""
    bad, good = await builder.customer("bad"), await builder.customer("good")
    for scenario in (bad, good):
        await set_stage(engine, scenario.customer, Stage.SHADOW)
    refuse_meter_events(standin, bad)
    await record_and_deliver(engine, bad, good)
    before = await state(ops)
    dry = ok(await post(http, "/guard", {"dry_run": True}))
    assert dry == (await ops.guard_once(dry_run=True)).model_dump(mode="json")
    assert [trip["customer"] for trip in dry["tripped"]] == [bad.customer]
    assert await state(ops) == before
    done = ok(await post(http, "/guard", {}))
    assert done["tripped"] == dry["tripped"] and done["dry_run"] is False
    assert (await ops.stage_of(bad.customer))[0] is Stage.LEGACY
    assert (await ops.stage_of(good.customer))[0] is Stage.SHADOW
    (entry,) = await ops.store.history(customer=bad.customer, limit=1)
    assert entry.actor == GUARD_ACTOR and "divergent events > 0" in entry.reason
    assert ok(await post(http, "/guard", {}))["tripped"] == []


async def test_dry_runs_change_nothing(
    http: httpx.AsyncClient,
    ops: CutoverOps,
    builder: ScenarioBuilder,
    standin: StripeStandin,
):
    """Every operation's dry run returns the changes (and Stripe calls) and makes none of them."""
    scenario = await builder.customer()
    await ops.rollout(Stage.SHADOW, percent=10, actor="setup")
    await ops.store.set_override(scenario.customer, Stage.SHADOW, actor="setup")
    await ops.store.set_override("cus_p", Stage.PRIMARY, actor="setup")
    before = await state(ops)
    standin.reset_requests()
    cutover = {
        "to": "primary",
        "with_schedule": True,
        "price": scenario.meter_price,
        "dry_run": True,
    }
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/rollout", {"stage": "shadow", "percent": 50, "dry_run": True}),
        ("/rollout", {"stage": "primary", "customers": ["cus_p", "cus_x"], "force": True}),
        (f"/customers/{scenario.customer}/cutover", cutover),
        ("/rollback", {"customers": ["cus_p"], "dry_run": True}),
        ("/rollback", {"all": True, "force": True, "dry_run": True}),
    ]
    requests[1][1]["dry_run"] = True
    for path, body in requests:
        answer = ok(await post(http, path, body))
        assert answer["dry_run"] is True and answer["changes"], (path, answer)
    assert [c["method"] for c in answer["stripe_calls"]] == []
    schedule_calls = ok(await post(http, f"/customers/{scenario.customer}/cutover", cutover))
    assert [c["method"] for c in schedule_calls["stripe_calls"]] == ["GET", "POST", "POST"]
    assert await state(ops) == before
    assert all(request.method == "GET" for request in standin.requests)


# -- bad input -----------------------------------------------------------------------------------

BAD: list[tuple[str, dict[str, Any], str, str, tuple[str, ...]]] = [
    # (path, body, param, message, the CLI arguments refused with the same message)
    (
        "/rollout",
        {"stage": "sideways", "percent": 10},
        "stage",
        "unknown stage 'sideways'; use one of legacy, shadow, primary, meter",
        ("rollout", "sideways", "10%"),
    ),
    (
        "/rollout",
        {"stage": "shadow", "percent": "12.345%"},
        "percent",
        "percentage '12.345%' must be 0 to 100 with at most two decimals (e.g. 25%)",
        ("rollout", "shadow", "12.345%"),
    ),
    (
        "/rollout",
        {"stage": "shadow", "percent": "lots"},
        "percent",
        "percentage 'lots' is not a number; write e.g. 25% or 12.5",
        ("rollout", "shadow", "lots"),
    ),
    (
        "/rollout",
        {"stage": "shadow", "customers": ["cus_ok", "cus;b"]},
        "customers",
        "--customers: 'cus;b' is not a customer id",
        ("rollout", "shadow", "--customers", "cus_ok,cus;b"),
    ),
    (
        "/rollout",
        {"stage": "shadow", "percent": 5},
        "percent",
        "a percentage rollout only adds customers: shadow is at 25%",
        ("rollout", "shadow", "5%"),
    ),
    (
        "/rollout",
        {"stage": "primary", "percent": 30},
        "percent",
        "30% to primary would take customers straight from legacy",
        ("rollout", "primary", "30"),
    ),
    (
        "/rollout",
        {"stage": "meter", "customers": ["cus_p", "cus_new"]},
        "customers",
        "cus_new is at legacy: moves go one stage at a time (next: shadow)",
        ("rollout", "meter", "--customers", "cus_p,cus_new"),
    ),
    (
        "/rollout",
        {"stage": "legacy", "percent": 5},
        "stage",
        "no percentage rollout to legacy; use shadow, primary or meter",
        ("rollout", "legacy", "5"),
    ),
    ("/rollout", {"stage": "shadow"}, "percent", "give exactly one of percent or customers", ()),
    (
        "/rollout",
        {"stage": "shadow", "percent": 5, "customers": ["cus_a"]},
        "percent",
        "give exactly one of percent or customers",
        (),
    ),
    ("/rollout", {"stage": "shadow", "percent": True}, "percent", "a percentage is a number", ()),
    ("/rollout", {"stage": "shadow", "customers": "cus_a"}, "customers", "a list of customer", ()),
    (
        "/customers/cus_p/cutover",
        {"to": "shadow", "at": "now"},
        "to",
        "cus_p is at primary: moving it back to shadow is a rollback",
        ("cutover", "cus_p", "--to", "shadow", "--at", "now"),
    ),
    (
        "/customers/cus_p/cutover",
        {"to": "meter", "at": "tomorrow"},
        "at",
        "--at 'tomorrow' is not a time",
        ("cutover", "cus_p", "--to", "meter", "--at", "tomorrow"),
    ),
    (
        "/customers/cus_p/cutover",
        {"to": "meter", "at": "2020-01-01T00:00:00Z"},
        "at",
        "--at 2020-01-01T00:00:00Z is in the past",
        ("cutover", "cus_p", "--to", "meter", "--at", "2020-01-01T00:00:00Z"),
    ),
    (
        "/customers/cus_p/cutover",
        {"to": "meter", "at": "now", "with_schedule": True, "price": "price_x"},
        "with_schedule",
        "--with-schedule moves the item to the meter-backed price at the period end",
        ("cutover", "cus_p", "--to", "meter", "--at", "now", "--with-schedule", "--price", "p"),
    ),
    (
        "/customers/cus_p/cutover",
        {"to": "upward"},
        "to",
        "unknown --to stage 'upward'",
        ("cutover", "cus_p", "--to", "upward"),
    ),
    ("/customers/cus_p/cutover", {"to": "meter", "at": 2**41}, "at", "too far ahead", ()),
    ("/customers/cus_p/cutover", {"to": "meter", "at": None}, "at", "at is period-end", ()),
    ("/customers/cus_p/cutover", {"to": "meter", "price": "../x"}, "price", "pattern", ()),
    ("/customers/cus_p/cutover", {"to": "meter", "colour": 1}, "colour", "unknown parameter", ()),
    ("/customers/cus%20p/cutover", {"to": "meter"}, "customer", "pattern", ()),
    (
        "/rollback",
        {"customers": ["cus_p"], "to": "meter"},
        "to",
        "cus_p is at primary: meter is forward, not back",
        ("rollback", "cus_p", "--to", "meter"),
    ),
    (
        "/rollback",
        {"customers": ["cus_p"], "to": "upward"},
        "to",
        "unknown --to stage 'upward'",
        ("rollback", "cus_p", "--to", "upward"),
    ),
    (
        "/rollback",
        {"customers": ["cus_p"], "to": "legacy"},
        "to",
        "cus_p is at primary: rollbacks go one stage at a time (back: shadow)",
        ("rollback", "cus_p", "--to", "legacy"),
    ),
    (
        "/rollback",
        {"all": True},
        "to",
        "rollback --all --to legacy would move cus_p (primary) more than one stage at once",
        ("rollback", "--all"),
    ),
    ("/rollback", {}, "customers", "give customers, or all: true", ()),
    ("/rollback", {"customers": ["cus_p"], "all": True}, "customers", "give customers", ()),
    ("/rollback", {"all": "yes"}, "all", "valid boolean", ()),
    ("/guard", {"dry_run": "yes"}, "dry_run", "valid boolean", ()),
    ("/guard", {"force": True}, "force", "unknown parameter", ()),
]


async def _bad_input_setup(ops: CutoverOps) -> None:
    await ops.rollout(Stage.SHADOW, percent=25, actor="setup")
    await ops.store.set_override("cus_p", Stage.PRIMARY, actor="setup")


@pytest.mark.parametrize(("path", "body", "param", "message", "cli"), BAD)
async def test_bad_input_is_refused_and_changes_nothing(
    http: httpx.AsyncClient,
    ops: CutoverOps,
    path: str,
    body: dict[str, Any],
    param: str,
    message: str,
    cli: tuple[str, ...],
):
    """400 in Stripe's shape naming the parameter, the cutover package's message, no change."""
    await _bad_input_setup(ops)
    before = await state(ops)
    response = await post(http, path, body)
    assert message in assert_stripe_error(response, 400, param)
    assert await state(ops) == before


@pytest.fixture
def run_cli(redis_url: str, key_prefix: str, standin_url: str) -> Callable[..., Any]:
    """Runs ``dualwrite ARGS`` on this test's Redis prefix and the stand-in."""
    runner = CliRunner()
    env = {
        "DUALWRITE_REDIS__URL": redis_url,
        "DUALWRITE_REDIS__KEY_PREFIX": key_prefix,
        "DUALWRITE_STRIPE__API_BASE": standin_url,
        "STRIPE_API_KEY": STRIPE_KEY,
        "COLUMNS": "400",
    }
    return lambda *args: runner.invoke(cli_app, list(args), env=env)


def test_messages_are_the_cli_messages(
    run_cli: Callable[..., Any], settings: Settings, redis_url: str, standin: StripeStandin
) -> None:
    """Each bad request the CLI can also make is refused there (exit 2) with the API's message."""

    async def setup() -> None:
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await _bad_input_setup(CutoverOps(redis, KeySpace(settings.redis.key_prefix), settings))
        finally:
            await redis.aclose()

    async def ask(path: str, body: dict[str, Any]) -> str:
        async with AdminApp(settings) as api:
            transport = httpx.ASGITransport(app=Starlette(routes=[Mount(ROOT, api)]))
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
                return assert_stripe_error(await post(client, path, body), 400)

    anyio.run(setup)
    compared = 0
    for path, body, param, message, cli in BAD:
        if not cli:
            continue
        refused = run_cli(*cli)
        printed = " ".join(refused.output.replace("│", " ").split())
        assert refused.exit_code == 2, (cli, refused.output)
        answer = anyio.run(ask, path, body)
        assert message in answer
        assert answer.removeprefix(f"Invalid {param}: ") in printed, (answer, printed)
        compared += 1
    assert compared == 17


# -- limits, auth, errors ------------------------------------------------------------------------


async def test_large_cohorts(http: httpx.AsyncClient, ops: CutoverOps):
    """A cohort beyond the flag API's 64 KiB goes in one request; past 4 MiB it is a 413."""
    customers = [f"cus_cohort{index:06d}" for index in range(4000)]
    body = {"stage": "shadow", "customers": customers, "dry_run": True}
    assert len(json.dumps(body)) > 64 * 1024
    answer = ok(await post(http, "/rollout", body))
    assert len(answer["changes"]) == 4000
    huge = {"customers": [f"cus_{index:016d}" for index in range(250_000)], "all": False}
    assert_stripe_error(await post(http, "/rollback", huge), 413)
    assert await ops.store.overrides() == {}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/rollout", {"stage": "shadow", "percent": 50}),
        ("/customers/cus_a/cutover", {"to": "shadow", "at": "now"}),
        ("/rollback", {"all": True}),
        ("/guard", {}),
    ],
)
async def test_token_required(
    http: httpx.AsyncClient, ops: CutoverOps, path: str, body: dict[str, Any]
):
    """Without the token, or with a wrong one: 401 and nothing changed."""
    await ops.rollout(Stage.SHADOW, percent=10, actor="setup")
    before = await state(ops)
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}x"}):
        response = await http.post(f"{ROOT}{path}", json=body, headers=headers)
        assert_stripe_error(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert await state(ops) == before


async def test_stripe_refusals(
    http: httpx.AsyncClient, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin
):
    """Stripe refusing the schedule: 502 naming the created schedule, no flag changed; a customer
    without a subscription has no period end: 400 on ``at``."""
    scenario = await builder.customer()
    await ops.store.set_override(scenario.customer, Stage.SHADOW, actor="setup")
    before = await state(ops)
    standin.faults.refuse(path=r"/v1/subscription_schedules/sub_sched_\w+", count=1)
    body = {"to": "primary", "with_schedule": True, "price": scenario.meter_price}
    response = await post(http, f"/customers/{scenario.customer}/cutover", body)
    message = assert_stripe_error(response, 502)
    assert response.json()["error"]["type"] == "api_error"
    assert "Stripe answered" in message and "was created" in message
    assert STRIPE_KEY not in response.text
    assert await state(ops) == before
    response = await post(http, "/customers/cus_nosub/cutover", {"to": "shadow"})
    assert "no active subscription" in assert_stripe_error(response, 400, "at")
    response = await post(http, f"/customers/{scenario.customer}/cutover", body)
    assert "already has schedule" in assert_stripe_error(response, 400, "with_schedule")
    assert await state(ops) == before


async def test_stripe_unreachable_and_no_key(
    redis_url: str, key_prefix: str, ops: CutoverOps, clock: FakeClock
):
    """Stripe unreachable: 502; no STRIPE_API_KEY: 400 on ``at`` (``now`` needs no key)."""
    await ops.store.set_override("cus_a", Stage.SHADOW, actor="setup")
    for api_key, status in ((STRIPE_KEY, 502), (None, 400)):
        settings = make_settings(
            redis_url=redis_url, prefix=key_prefix, api_base="http://127.0.0.1:9", api_key=api_key
        ).model_copy(update={"admin_token": SecretStr(TOKEN)})
        async with AdminApp(settings, clock=clock) as api:
            transport = httpx.ASGITransport(app=Starlette(routes=[Mount(ROOT, api)]))
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
                response = await post(client, "/customers/cus_a/cutover", {"to": "primary"})
                message = assert_stripe_error(response, status, "at" if api_key is None else None)
                assert ("STRIPE_API_KEY" in message) is (api_key is None)
                now = {"to": "primary", "at": "now", "dry_run": True}
                ok(await post(client, "/customers/cus_a/cutover", now))


async def test_redis_down(key_prefix: str):
    """Redis unreachable: every cutover operation gets 503, without the Redis URL's secrets."""
    settings = unreachable_redis_settings(key_prefix).model_copy(
        update={"admin_token": SecretStr(TOKEN)}
    )
    async with AdminApp(settings) as api:
        transport = httpx.ASGITransport(app=Starlette(routes=[Mount(ROOT, api)]))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            for path, body in [
                ("/rollout", {"stage": "shadow", "percent": 5}),
                ("/rollout", {"stage": "shadow", "customers": ["cus_a"]}),
                ("/customers/cus_a/cutover", {"to": "shadow", "at": "now"}),
                ("/rollback", {"customers": ["cus_a"]}),
                ("/rollback", {"all": True}),
                ("/guard", {"dry_run": True}),
            ]:
                response = await post(client, path, body)
                assert_stripe_error(response, 503)
                assert "s3cret" not in response.text and "127.0.0.1" not in response.text


# -- the OpenAPI document ------------------------------------------------------------------------


class TestOpenAPI:
    """The document lists the cutover operations and real responses match it."""

    async def test_document(self, http: httpx.AsyncClient):
        """It validates, and describes each cutover operation with its body and statuses."""
        document = ok(await http.get(f"{ROOT}/openapi.json", headers=AUTH))
        validate_spec(document)
        cutover = {
            (method.upper(), path)
            for path, item in document["paths"].items()
            for method, operation in item.items()
            if operation["tags"] == ["cutover"]
        }
        assert cutover == {
            ("POST", "/rollout"),
            ("POST", "/customers/{customer}/cutover"),
            ("POST", "/rollback"),
            ("POST", "/guard"),
        }
        operation = document["paths"]["/customers/{customer}/cutover"]["post"]
        assert {"200", "400", "401", "409", "502", "503"} <= set(operation["responses"])
        body = document["components"]["schemas"]["CutoverRequest"]
        assert set(body["properties"]) == {
            "to",
            "at",
            "with_schedule",
            "price",
            "force",
            "dry_run",
            "actor",
            "reason",
        }
        assert body["required"] == ["to"]

    async def test_responses_match_the_document(
        self, http: httpx.AsyncClient, ops: CutoverOps, builder: ScenarioBuilder, standin
    ):
        """Successes, refusals, Stripe failures and auth failures validate against their schemas."""
        document = ok(await http.get(f"{ROOT}/openapi.json", headers=AUTH))
        scenario = await builder.customer()
        await ops.store.set_override(scenario.customer, Stage.SHADOW, actor="setup")
        standin.faults.refuse(path=r"/v1/subscription_schedules/sub_sched_\w+", count=1)
        cutover = "/customers/{customer}/cutover"
        schedule = {"to": "primary", "with_schedule": True, "price": scenario.meter_price}
        calls: list[tuple[str, str, dict[str, Any], int]] = [
            ("/rollout", "/rollout", {"stage": "shadow", "percent": 20}, 200),
            ("/rollout", "/rollout", {"stage": "shadow", "customers": ["cus_a"]}, 200),
            ("/rollout", "/rollout", {"stage": "shadow", "percent": 1}, 400),
            (cutover, f"/customers/{scenario.customer}/cutover", {"to": "primary"}, 200),
            (cutover, f"/customers/{scenario.customer}/cutover", schedule, 502),
            (cutover, "/customers/cus_a/cutover", {"to": "primary", "at": "now"}, 200),
            ("/rollback", "/rollback", {"customers": ["cus_a"], "reason": "x"}, 200),
            ("/rollback", "/rollback", {"all": True, "dry_run": True}, 200),
            ("/guard", "/guard", {"dry_run": True}, 200),
            ("/guard", "/guard", {}, 200),
        ]
        for template, path, body, status in calls:
            response = await post(http, path, body)
            assert response.status_code == status, (path, body, response.text)
            documented = document["paths"][template]["post"]["responses"][str(status)]
            schema = documented["content"]["application/json"]["schema"]
            root = {**schema, "components": document["components"]}
            jsonschema.Draft202012Validator(root).validate(response.json())
        refused = await http.post(f"{ROOT}/guard", json={})
        assert refused.status_code == 401
        documented = document["paths"]["/guard"]["post"]["responses"]["401"]
        schema = documented["content"]["application/json"]["schema"]
        root = {**schema, "components": document["components"]}
        jsonschema.Draft202012Validator(root).validate(refused.json())
