"""Ledger rollups: every writer keeps each row's copy equal to the row, and reports read them."""

from __future__ import annotations

import anyio
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from dualwrite.deadletters import DeadLetters
from dualwrite.engine import DualWriteEngine
from dualwrite.keys import KeySpace
from dualwrite.ledger import Ledger, LedgerRow, period_score
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import Stage
from dualwrite.outbox import OutboxWorker
from dualwrite.redis_client import as_str, as_str_list
from dualwrite.rollups import (
    backfill,
    list_customer_rows,
    parse_counters,
    read_customer_rows,
    rollup_key,
)
from dualwrite.testing import StripeStandin, serve_app
from tests.conftest import STRIPE_KEY
from tests.support import (
    make_settings,
    refuse_meter_event,
    refuse_usage_record_once,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio

DAY = 86_400


async def rows_and_copies(
    engine: DualWriteEngine,
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Every ledger row (from its own hash) and its rollup copy, by index member."""
    redis, shard = engine.redis, engine.keys.shard(0)
    rows: dict[str, dict[str, int]] = {}
    copies: dict[str, dict[str, int]] = {}
    for member in as_str_list(await redis.zrange(shard.ledger_index, 0, -1)):
        period, customer, event_name = member.split("|", 2)
        raw = await redis.hgetall(shard.ledger(period, customer, event_name))
        rows[member] = {str(name): int(value) for name, value in raw.items()}
        packed = as_str(await redis.hget(rollup_key(shard, period), member))
        copies[member] = parse_counters([packed])[0] if packed is not None else {}
    return rows, copies


async def listed_rows(engine: DualWriteEngine) -> set[str]:
    """Every row listed under its customer (``customer-rows``), as index members."""
    raw = await engine.redis.hgetall(engine.keys.shard(0).customer_rows)
    found: set[str] = set()
    for customer, lines in raw.items():
        for line in str(as_str(lines)).split("\n"):
            period, event_name = line.split("|", 1)
            found.add(f"{period}|{as_str(customer)}|{event_name}")
    return found


async def assert_listed(
    engine: DualWriteEngine, rows: dict[str, dict[str, int]], *changed: str
) -> None:
    """Every row is listed under its customer once, and ``changed`` are the changed customers."""
    assert await listed_rows(engine) == set(rows)
    found = await engine.redis.smembers(engine.keys.shard(0).guard_changed)
    assert {str(as_str(name)) for name in found} == set(changed)


async def test_every_writer_keeps_the_copy_equal(engine, builder, standin: StripeStandin):
    """Recording (commit script), an authoritative refusal (queued update), shadow deliveries and
    a dead letter (settle script), and a dead letter retried (retry script): after each, every
    rollup copy equals its row, and the rolled-up read equals the per-customer read."""
    shadow = await builder.customer("Shadow")
    legacy = await builder.customer("Legacy")
    await set_stage(engine, shadow.customer, Stage.SHADOW)
    await set_stage(engine, legacy.customer, Stage.LEGACY)
    refuse_meter_event(standin, shadow.customer, 6)
    refuse_usage_record_once(standin, legacy.item)
    assert not (await engine.record(usage(legacy, 50))).accepted
    for quantity in (2, 6, 5):
        assert (await engine.record(usage(shadow, quantity))).accepted
    assert (await engine.record(usage(legacy, 3))).accepted
    rows, copies = await rows_and_copies(engine)
    assert rows == copies and len(rows) == 2
    await assert_listed(engine, rows, shadow.customer, legacy.customer)
    assert rows[next(m for m in rows if legacy.customer in m)]["legacy_refused_events"] == 1

    await engine.redis.delete(engine.keys.shard(0).guard_changed)
    with anyio.fail_after(20):
        await OutboxWorker(engine.outbox, engine.writer).drain()
    rows, copies = await rows_and_copies(engine)
    assert rows == copies
    await assert_listed(engine, rows, shadow.customer)
    shadow_row = rows[next(m for m in rows if shadow.customer in m)]
    assert shadow_row["meter_failed_events"] == 1 and shadow_row["meter_accepted_qty"] == 7

    letters = DeadLetters(engine.redis, engine.keys)
    [letter] = await letters.find(customer=shadow.customer)
    standin.faults.clear()
    await engine.redis.delete(engine.keys.shard(0).guard_changed)
    await letters.retry([letter.id])
    rows, copies = await rows_and_copies(engine)
    assert rows == copies
    await assert_listed(engine, rows, shadow.customer)
    assert rows[next(m for m in rows if shadow.customer in m)]["meter_failed_events"] == 0

    rolled = {(row.customer, row.period): row for row in await engine.ledger.rows()}
    one_by_one = {
        (row.customer, row.period): row
        for customer in (shadow.customer, legacy.customer)
        for row in await engine.ledger.rows(customer=customer)
    }
    assert rolled == one_by_one


def counters(quantity: int) -> dict[str, int]:
    """A ledger row's counters, as a writer would leave them."""
    return {"events": 1, "quantity": quantity, "legacy_expected_qty": quantity}


async def write_rows(redis, keys: KeySpace, rows: list[LedgerRow]) -> None:
    """Ledger rows written without rollups (as before rollups existed)."""
    shard = keys.shard(0)
    pipe = redis.pipeline(transaction=False)
    for row in rows:
        pipe.hset(shard.ledger(row.period, row.customer, row.event_name), mapping=row.counters)
        member = f"{row.period}|{row.customer}|{row.event_name}"
        pipe.zadd(shard.ledger_index, {member: row.span.start // DAY})
    await pipe.execute()


async def test_rows_older_than_rollups_are_copied_once(redis_client, key_prefix):
    """Rows written before rollups existed are copied in on the first read, the shard is marked,
    and a second backfill changes nothing (a copy is a snapshot, never an increment)."""
    keys = KeySpace(key_prefix)
    days = ("2026-11-01", "2026-11-02", "2026-11-30", "2026-12-01")
    rows = [
        LedgerRow(day, f"cus_{index}", "api_requests", counters(index + 10))
        for index, day in enumerate(days)
    ] + [
        LedgerRow("20261015T120000Z/20261115T120000Z", "cus_billing", "api_requests", counters(99))
    ]
    await write_rows(redis_client, keys, rows)
    ledger = Ledger(redis_client, keys)
    found = await ledger.rows(since="2026-11-02", until="2026-11-30")
    assert sorted((row.customer, row.counters["quantity"]) for row in found) == [
        ("cus_1", 11),
        ("cus_2", 12),
        ("cus_billing", 99),
    ]
    assert await redis_client.get(keys.shard(0).rollup_ready) == "1"
    assert await backfill(redis_client, keys.shard(0)) == len(rows)
    again = await ledger.rows()
    assert sorted(row.counters["quantity"] for row in again) == [10, 11, 12, 13, 99]
    assert (await ledger.rows(since="2026-11-16", until="2026-11-29")) == []


async def test_rows_older_than_customer_rows_are_listed_once(redis_client, key_prefix):
    """A customer's rows written before the writers listed them are listed on the first read (the
    shard is then marked), and reading a few customers returns exactly their rows in the window,
    the same as the rolled-up read filtered to them."""
    keys = KeySpace(key_prefix)
    shard = keys.shard(0)
    days = ("2026-11-01", "2026-11-02", "2026-11-30", "2026-12-01")
    rows = [LedgerRow(day, "cus_a", "api_requests", counters(n)) for n, day in enumerate(days)]
    rows += [
        LedgerRow("2026-11-02", "cus_a", "storage", counters(7)),
        LedgerRow("20261015T120000Z/20261115T120000Z", "cus_b", "api_requests", counters(99)),
        LedgerRow("2026-11-02", "cus_other", "api_requests", counters(5)),
    ]
    await write_rows(redis_client, keys, rows)
    found = await read_customer_rows(
        redis_client,
        shard,
        ["cus_a", "cus_b", "cus_none"],
        low=period_score("2026-11-02"),
        high=period_score("2026-11-30"),
    )
    assert await redis_client.get(shard.customer_rows_ready) == "1"
    by_member = {member: parse_counters([packed])[0]["quantity"] for member, packed in found}
    assert by_member == {
        "2026-11-02|cus_a|api_requests": 1,
        "2026-11-02|cus_a|storage": 7,
        "2026-11-30|cus_a|api_requests": 2,
        "20261015T120000Z/20261115T120000Z|cus_b|api_requests": 99,
    }
    rolled = await Ledger(redis_client, keys).rows(since="2026-11-02", until="2026-11-30")
    assert {
        f"{row.period}|{row.customer}|{row.event_name}"
        for row in rolled
        if row.customer != "cus_other"
    } == set(by_member)
    assert await list_customer_rows(redis_client, shard) == 3  # again: nothing listed twice
    lines = await redis_client.hget(shard.customer_rows, "cus_a")
    assert sorted(lines.split("\n")) == sorted(
        f"{row.period}|{row.event_name}" for row in rows if row.customer == "cus_a"
    )


async def test_large_rollup_is_read_in_chunks(redis_client, key_prefix):
    """A rollup too large for one call is scanned in chunks, every row read once, exactly."""
    keys = KeySpace(key_prefix)
    big = 2**62 + 7  # beyond a double's precision: the copy must not round it
    rows = [
        LedgerRow("2026-11-05", f"cus_{index:05d}", "api_requests", counters(index))
        for index in range(6_001)
    ]
    rows[0] = LedgerRow("2026-11-05", "cus_00000", "api_requests", counters(big))
    await write_rows(redis_client, keys, rows)
    found = await Ledger(redis_client, keys).rows(since="2026-11-05", until="2026-11-05")
    assert len(found) == len(rows)
    by_customer = {row.customer: row.counters["quantity"] for row in found}
    assert by_customer["cus_00000"] == big and by_customer["cus_06000"] == 6000
    packed = await redis_client.hget(
        rollup_key(keys.shard(0), "2026-11-05"), "2026-11-05|cus_00000|api_requests"
    )
    assert packed.startswith("[1,")  # packed (issue 20)
    assert parse_counters([packed])[0]["quantity"] == big


WEBHOOK_SECRET = "whsec_dualwriteRollupTestsSecret001"


async def test_a_late_refusal_keeps_the_copy_equal(
    redis_url, key_prefix, standin_url, standin: StripeStandin, builder
):
    """A meter event Stripe refuses after accepting it (the late-refusal script) changes the row
    and its copy alike: the rolled-up read shows the refusal."""
    settings = make_settings(
        redis_url=redis_url, prefix=key_prefix, api_base=standin_url, api_key=STRIPE_KEY
    ).model_copy(update={"stripe_webhook_secret": SecretStr(WEBHOOK_SECRET)})
    engine = DualWriteEngine.from_settings(settings)
    await engine.start(worker=False)
    try:
        app = DualWriteMiddleware(Starlette(), config=settings)
        with serve_app(app, lifespan=True) as url:
            standin.add_event_destination(url + "/_dualwrite/stripe/events", WEBHOOK_SECRET)
            scenario = await builder.customer()
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            for index, quantity in enumerate((2, 5)):
                await engine.record(usage(scenario, quantity, identifier=f"late-{index}"))
            with anyio.fail_after(10):
                await engine.new_worker().drain()
            refused = usage(scenario, 5, identifier="late-1").meter_identifier
            await engine.redis.delete(engine.keys.shard(0).guard_changed)
            standin.refuse_later(refused)
            await anyio.to_thread.run_sync(standin.report_meter_errors)
        rows, copies = await rows_and_copies(engine)
        assert rows == copies
        await assert_listed(engine, rows, scenario.customer)
        [row] = await engine.ledger.rows()
        assert row["meter_late_refused_qty"] == 5 and row["meter_accepted_qty"] == 2
    finally:
        await engine.aclose()


def test_parse_reads_packed_and_named_copies():
    """A packed copy (by position, other counters in a final object) and a copy written before
    packing (every counter named) parse to the same counters."""
    named = '{"events":40,"quantity":1234,"meter_failed_code:expired":2}'
    packed = '[1,0,40,1,1234,{"meter_failed_code:expired":2}]'
    plain = "[1,1,1234,0,40]"
    empty = "[1]"
    assert parse_counters([named, packed, plain, empty]) == [
        {"events": 40, "quantity": 1234, "meter_failed_code:expired": 2},
        {"events": 40, "quantity": 1234, "meter_failed_code:expired": 2},
        {"quantity": 1234, "events": 40},
        {},
    ]
