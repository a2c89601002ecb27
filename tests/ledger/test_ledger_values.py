"""The ledger's counters, divergence entries and reads, pinned value by value: the counter names a
failure is counted under, what each kind of outcome adds, what a divergence entry says about each
leg, and which rows and entries a read returns. The mutation run of the ``ledger`` group (issue 22)
showed these were reached by the engine tests but not checked."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from dualwrite.exceptions import StoreUnavailableError
from dualwrite.keys import KeySpace
from dualwrite.ledger import Ledger, LedgerRow
from dualwrite.ledger._divergence import (
    DivergenceRecord,
    LegView,
    describe_failure,
    divergence_fields,
)
from dualwrite.ledger._update import (
    LEDGER_KEYS,
    LedgerUpdate,
    failure_code,
    ledger_block,
    ledger_script,
    period_score,
    safe_code,
)
from dualwrite.models import Leg, Stage, StripeFailure, UsageEvent, WriteResult
from dualwrite.periods import Period

DAY = 86_400
NOV_25 = 20_782  # 2026-11-25 as a day number


def an_event(customer: str = "cus_a", quantity: int = 5, **fields: object) -> UsageEvent:
    """One event on 2026-11-25."""
    return UsageEvent.model_validate(
        {
            "identifier": f"evt-{customer}-{quantity}",
            "customer": customer,
            "event_name": "api",
            "quantity": quantity,
            "timestamp": NOV_25 * DAY + 3600,
            **fields,
        }
    )


class TestCounterNames:
    def test_a_stripe_code_keeps_letters_digits_underscore_and_dash_only(self) -> None:
        assert safe_code("card_declined") == "card_declined"
        assert safe_code("rate-limit 429:{x}") == "rate-limit429x"

    def test_a_code_is_cut_at_64_characters(self) -> None:
        assert safe_code("a" * 64) == "a" * 64
        assert safe_code("b" * 65) == "b" * 64

    def test_no_code_or_nothing_left_of_it_is_unknown(self) -> None:
        assert safe_code(None) == "unknown"
        assert safe_code("") == "unknown"
        assert safe_code(":: //") == "unknown"

    def test_a_failure_is_counted_under_its_code_else_its_type(self) -> None:
        assert (
            failure_code(StripeFailure(type="card_error", code="card_declined")) == "card_declined"
        )
        assert failure_code(StripeFailure(type="invalid_request_error")) == "invalid_request_error"
        assert failure_code(StripeFailure(code="bad code!")) == "badcode"
        assert failure_code(None) == "unknown"

    def test_an_expired_write_is_counted_as_expired_whatever_its_last_failure(self) -> None:
        assert failure_code(StripeFailure(code="card_declined"), expired=True) == "expired"
        assert failure_code(None, expired=True) == "expired"


class TestPeriodScore:
    def test_a_day_scores_as_its_day_number(self) -> None:
        assert period_score("2026-11-25") == NOV_25
        assert period_score("1970-01-01") == 0

    def test_a_billing_period_scores_as_its_first_day(self) -> None:
        period = Period(start=NOV_25 * DAY, end=(NOV_25 + 30) * DAY, kind="billing")
        assert period_score(period.id) == NOV_25


class TestLedgerUpdate:
    def test_a_recorded_event_counts_once_in_each_counter_it_touches(self) -> None:
        update = LedgerUpdate(KeySpace("p").shard(0), an_event(quantity=7))
        update.recorded(Stage.SHADOW, Leg.LEGACY, Leg.METER, 7, translated=True)
        assert update.increments == {
            "events": 1,
            "quantity": 7,
            "stage_shadow_events": 1,
            "legacy_expected_events": 1,
            "legacy_expected_qty": 7,
            "legacy_accepted_events": 1,
            "legacy_accepted_qty": 7,
            "meter_expected_events": 1,
            "meter_expected_qty": 7,
            "translated_events": 1,
        }

    def test_without_a_shadow_or_translation_only_the_authoritative_leg_counts(self) -> None:
        update = LedgerUpdate(KeySpace("p").shard(0), an_event(quantity=3))
        update.recorded(Stage.LEGACY, Leg.LEGACY, None, 3, translated=False)
        assert update.increments == {
            "events": 1,
            "quantity": 3,
            "stage_legacy_events": 1,
            "legacy_expected_events": 1,
            "legacy_expected_qty": 3,
            "legacy_accepted_events": 1,
            "legacy_accepted_qty": 3,
        }

    def test_a_refusal_counts_the_refused_event_and_its_code(self) -> None:
        update = LedgerUpdate(KeySpace("p").shard(0), an_event()).refused(Leg.METER, "bad code")
        assert update.increments == {"meter_refused_events": 1, "meter_refused_code:badcode": 1}

    def test_a_shadow_failure_is_divergence_a_retired_one_is_not(self) -> None:
        failed = LedgerUpdate(KeySpace("p").shard(0), an_event())
        failed.shadow_failed(Leg.METER, 4, retired=False, code="x")
        assert failed.increments == {
            "meter_failed_code:x": 1,
            "meter_failed_events": 1,
            "meter_failed_qty": 4,
            "divergent_events": 1,
        }
        retired = LedgerUpdate(KeySpace("p").shard(0), an_event())
        retired.shadow_failed(Leg.METER, 4, retired=True, code="x")
        assert retired.increments == {"meter_retired_events": 1, "meter_retired_qty": 4}

    def test_a_late_refusal_moves_the_event_from_accepted_to_late_refused(self) -> None:
        update = LedgerUpdate(KeySpace("p").shard(0), an_event()).late_refused(6)
        assert update.increments == {
            "meter_accepted_events": -1,
            "meter_accepted_qty": -6,
            "meter_late_refused_events": 1,
            "meter_late_refused_qty": 6,
            "divergent_events": 1,
        }

    def test_undone_takes_every_count_back_out_and_leaves_the_original(self) -> None:
        shard = KeySpace("p").shard(0)
        update = LedgerUpdate(shard, an_event(), "2026-11-24").shadow_accepted(Leg.METER, 9)
        undone = update.undone()
        assert undone.increments == {"meter_accepted_events": -1, "meter_accepted_qty": -9}
        assert update.increments == {"meter_accepted_events": 1, "meter_accepted_qty": 9}
        assert (undone.keys, undone.event, undone.period) == (shard, update.event, "2026-11-24")

    def test_the_row_is_the_event_s_day_unless_a_period_is_given(self) -> None:
        shard = KeySpace("p").shard(0)
        by_day = LedgerUpdate(shard, an_event())
        assert by_day.key == shard.ledger("2026-11-25", "cus_a", "api")
        assert (by_day.index_member, by_day.index_score) == ("2026-11-25|cus_a|api", NOV_25)
        billing = Period(start=(NOV_25 - 10) * DAY, end=(NOV_25 + 20) * DAY, kind="billing").id
        in_period = LedgerUpdate(shard, an_event(), billing)
        assert in_period.key == shard.ledger(billing, "cus_a", "api")
        assert (in_period.index_member, in_period.index_score) == (
            f"{billing}|cus_a|api",
            NOV_25 - 10,
        )

    def test_the_block_lists_the_ledger_keys_then_counts_then_the_divergence_entry(self) -> None:
        shard = KeySpace("p").shard(0)
        update = LedgerUpdate(shard, an_event()).add("events").add("quantity", 5)
        keys, args = update.block(divergence={"kind": "translated"}, divergence_maxlen=10)
        assert len(keys) == LEDGER_KEYS
        assert keys[0] == update.key
        assert (
            keys[1:]
            == ledger_block(shard, row="r", member="2026-11-25|x", score=1, increments={})[0][1:]
        )
        assert args == [
            "2026-11-25|cus_a|api",
            NOV_25,
            10,
            2,
            "events",
            1,
            "quantity",
            5,
            1,
            "kind",
            "translated",
        ]
        assert update.block()[1][-1] == 0  # no divergence entry


@pytest.mark.anyio
async def test_a_script_s_own_keys_and_arguments_follow_the_ledger_s(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """``OWN_KEYS`` and ``OWN_ARGS`` point past the ledger's keys and arguments, whatever the
    number of counters and divergence fields."""
    shard = KeySpace(key_prefix).shard(0)
    script = ledger_script("ledger_update()\nreturn {KEYS[OWN_KEYS], ARGV[OWN_ARGS]}\n")
    update = LedgerUpdate(shard, an_event()).add("events").add("quantity", 5)
    keys, args = update.block(divergence={"kind": "translated", "note": "n"}, divergence_maxlen=10)
    own_key = f"{key_prefix}:own"
    reply = await redis_client.eval(script, len(keys) + 1, *keys, own_key, *args, "own-arg")
    assert reply == [own_key, "own-arg"]
    assert await redis_client.hgetall(update.key) == {"events": "1", "quantity": "5"}
    assert await redis_client.xlen(shard.divergence) == 1


class TestDivergenceEntries:
    def test_a_failure_is_described_by_status_code_and_message(self) -> None:
        declined = StripeFailure(http_status=402, type="card_error", code="declined", message="no")
        assert describe_failure(declined) == "402 declined: no"
        assert (
            describe_failure(StripeFailure(type="api_error", message="m")) == "network api_error: m"
        )
        assert describe_failure(None) is None

    def test_a_leg_view_shows_the_stripe_id_of_an_accepted_write_the_error_of_a_refused_one(
        self,
    ) -> None:
        accepted = WriteResult(leg=Leg.METER, accepted=True, stripe_id="mtrusg_1")
        assert LegView.of(accepted) == LegView(status="accepted", stripe_id="mtrusg_1")
        refused = WriteResult(
            leg=Leg.LEGACY,
            accepted=False,
            failure=StripeFailure(http_status=400, code="resource_missing", message="gone"),
        )
        assert LegView.of(refused) == LegView(status="refused", error="400 resource_missing: gone")

    def test_an_entry_reads_back_as_it_was_written(self) -> None:
        event = an_event(subscription_item="si_1", action="set")
        fields = divergence_fields(
            event,
            kind="translated",
            stage=Stage.PRIMARY,
            legacy=LegView(status="accepted", stripe_id="ur_1"),
            meter=LegView(status="pending"),
            note="set as 5",
            at=1234.56789,
        )
        assert fields["at"] == "1234.568"
        assert fields["subscription_item"] == "si_1"
        record = DivergenceRecord.from_stream("1-0", fields)
        assert record == DivergenceRecord(
            id="1-0",
            at=1234.568,
            kind="translated",
            identifier=event.identifier,
            customer="cus_a",
            event_name="api",
            period="2026-11-25",
            stage="primary",
            quantity=5,
            action="set",
            subscription_item="si_1",
            legacy=LegView(status="accepted", stripe_id="ur_1"),
            meter=LegView(status="pending"),
            note="set as 5",
        )

    def test_no_subscription_item_is_written_empty_and_read_as_none(self) -> None:
        fields = divergence_fields(
            an_event(),
            kind="shadow_refused",
            stage=Stage.SHADOW,
            legacy=LegView(status="accepted"),
            meter=LegView(status="refused", error="e"),
        )
        assert fields["subscription_item"] == ""
        assert fields["note"] == ""
        assert DivergenceRecord.from_stream("1-0", fields).subscription_item is None

    def test_an_entry_missing_fields_reads_with_empty_ones(self) -> None:
        legs = {"legacy": '{"status": "accepted"}', "meter": '{"status": "expired"}'}
        record = DivergenceRecord.from_stream("2-0", legs)
        assert (record.at, record.quantity, record.subscription_item) == (0.0, 0, None)
        assert {record.kind, record.identifier, record.customer, record.event_name} == {""}
        assert {record.period, record.stage, record.action, record.note} == {""}
        assert record.meter == LegView(status="expired")


async def _write(redis: aioredis.Redis, update: LedgerUpdate) -> None:
    pipe = redis.pipeline(transaction=False)
    update.queue(pipe)
    await pipe.execute()


@pytest.mark.anyio
async def test_one_customer_s_rows_are_those_whose_period_overlaps_the_days_asked(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A billing period that started up to 62 days before ``since`` and ends after it is read; one
    that ended on ``since``'s first second is not; another customer's rows never are."""
    keys = KeySpace(key_prefix)
    shard = keys.for_customer("cus_a")
    ledger = Ledger(redis_client, keys)
    overlapping = Period(start=(NOV_25 - 40) * DAY, end=(NOV_25 + 1) * DAY, kind="billing").id
    ended = Period(start=(NOV_25 - 30) * DAY, end=NOV_25 * DAY, kind="billing").id
    for period, quantity in ((overlapping, 1), (ended, 2), ("2026-11-25", 3), ("2026-11-26", 4)):
        await _write(
            redis_client, LedgerUpdate(shard, an_event(), period).add("quantity", quantity)
        )
    other = keys.for_customer("cus_b")
    await _write(redis_client, LedgerUpdate(other, an_event("cus_b"), "2026-11-25").add("quantity"))

    def quantities(rows: list[LedgerRow]) -> dict[str, int]:
        return {row.period: row["quantity"] for row in rows}

    every = await ledger.rows(customer="cus_a")
    assert quantities(every) == {overlapping: 1, ended: 2, "2026-11-25": 3, "2026-11-26": 4}
    assert {(row.customer, row.event_name) for row in every} == {("cus_a", "api")}
    since = await ledger.rows(customer="cus_a", since="2026-11-25")
    assert quantities(since) == {overlapping: 1, "2026-11-25": 3, "2026-11-26": 4}
    until = await ledger.rows(customer="cus_a", since="2026-11-25", until="2026-11-25")
    assert quantities(until) == {overlapping: 1, "2026-11-25": 3}
    assert every[0]["no_such_counter"] == 0
    # The rollups give every customer's rows, the same counts.
    rolled = await ledger.rows(since="2026-11-25", until="2026-11-25")
    assert {(row.customer, row.period, row.event_name): row["quantity"] for row in rolled} == {
        ("cus_a", overlapping, "api"): 1,
        ("cus_a", "2026-11-25", "api"): 3,
        ("cus_b", "2026-11-25", "api"): 1,
    }
    # The same rows as read, unparsed: their index members.
    members = {member for member, _ in await ledger.rolled(since="2026-11-25", until="2026-11-25")}
    assert members == {f"{overlapping}|cus_a|api", "2026-11-25|cus_a|api", "2026-11-25|cus_b|api"}
    assert len(await ledger.rolled()) == 5


@pytest.mark.anyio
async def test_divergences_are_the_newest_first_up_to_the_limit_and_counted(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    keys = KeySpace(key_prefix, shards=2)
    ledger = Ledger(redis_client, keys)
    customers = ["cus_a", "cus_b", "cus_c", "cus_d"]
    for at, customer in enumerate(customers, start=1):
        event = an_event(customer)
        fields = divergence_fields(
            event,
            kind="shadow_refused",
            stage=Stage.SHADOW,
            legacy=LegView(status="accepted"),
            meter=LegView(status="refused"),
            at=float(at),
        )
        update = LedgerUpdate(keys.for_customer(customer), event).add("divergent_events")
        block_keys, args = update.block(divergence=fields, divergence_maxlen=100)
        await redis_client.eval(
            ledger_script("ledger_update()\nreturn 1\n"), len(block_keys), *block_keys, *args
        )
    assert len({keys.shard_of(customer) for customer in customers}) == 2  # both shards hold some
    assert [r.customer for r in await ledger.divergences()] == customers[::-1]
    assert [r.customer for r in await ledger.divergences(limit=2)] == ["cus_d", "cus_c"]
    assert [r.customer for r in await ledger.divergences(customer="cus_b")] == ["cus_b"]
    assert await ledger.divergences(limit=0) == []
    assert await ledger.divergence_count() == 4
    assert len(await ledger.rolled()) == 4  # every shard's rows


@pytest.mark.anyio
async def test_a_redis_error_names_what_was_being_read(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A key of the wrong type (Redis refuses the command) surfaces as ``StoreUnavailableError``
    naming the read: the ledger's rows (one customer's, or every one's from the rollups), or the
    divergence log."""
    keys = KeySpace(key_prefix)
    shard = keys.shard(0)
    ledger = Ledger(redis_client, keys)
    await redis_client.set(shard.ledger_index, "not a sorted set")
    await redis_client.set(shard.rollup_ready, "1")  # the rollups are read, not built
    await redis_client.set(shard.rollup_index, "not a sorted set")
    await redis_client.set(shard.divergence, "not a stream")
    refused = "Redis refused a command while reading the"
    with pytest.raises(StoreUnavailableError, match=f"^{refused} ledger: WRONGTYPE"):
        await ledger.rows(customer="cus_a")
    with pytest.raises(StoreUnavailableError, match=f"^{refused} ledger: WRONGTYPE"):
        await ledger.rows()
    with pytest.raises(StoreUnavailableError, match=f"^{refused} ledger: WRONGTYPE"):
        await ledger.rolled()
    with pytest.raises(StoreUnavailableError, match=f"^{refused} divergence log: WRONGTYPE"):
        await ledger.divergence_count()
    with pytest.raises(StoreUnavailableError, match=f"^{refused} divergence log: WRONGTYPE"):
        await ledger.divergences()
