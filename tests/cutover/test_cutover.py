"""Cutover operations: percentage and cohort rollouts, cutovers at the period end (with the Stripe
subscription schedule), rollbacks, dry runs and refusals of bad input."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner, Result

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.cutover import (
    CutoverInputError,
    CutoverOps,
    CutoverStripeError,
    parse_customers,
    read_cohort_file,
)
from dualwrite.flags import StageResolver
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import ScenarioBuilder, anchored_on, cli_environment, utc

SAMPLE = [f"cus_sample{index:04d}" for index in range(400)]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """Starts at a fixed instant."""
    return FakeClock(1_790_000_000.0)


@pytest.fixture
async def ops(
    redis_client: aioredis.Redis, settings: Settings, clock: FakeClock
) -> AsyncIterator[CutoverOps]:
    """Cutover operations on this test's prefix, the stand-in and the fake clock."""
    yield CutoverOps(redis_client, KeySpace(settings.redis.key_prefix), settings, clock=clock)


async def stages(ops: CutoverOps, customers: list[str]) -> dict[str, Stage]:
    """Each customer's stage now."""
    return {customer: (await ops.stage_of(customer))[0] for customer in customers}


@pytest.mark.anyio
class TestRollout:
    """Percentage rollouts and named cohorts."""

    async def test_percentage_rollout_only_adds(self, ops: CutoverOps) -> None:
        """Raising shadow from 10 % to 25 % keeps every customer already in; lowering is refused."""
        await ops.rollout(Stage.SHADOW, percent=10, actor="ann", reason="pilot")
        first = {c for c, s in (await stages(ops, SAMPLE)).items() if s is Stage.SHADOW}
        await ops.rollout(Stage.SHADOW, percent=25, actor="ann")
        second = {c for c, s in (await stages(ops, SAMPLE)).items() if s is Stage.SHADOW}
        assert first < second
        assert 0.05 * len(SAMPLE) < len(first) < 0.15 * len(SAMPLE)
        assert 0.18 * len(SAMPLE) < len(second) < 0.32 * len(SAMPLE)
        with pytest.raises(CutoverInputError, match="only adds customers"):
            await ops.rollout(Stage.SHADOW, percent=5, actor="ann")
        assert (await ops.store.get_rollout())[Stage.SHADOW] == 25
        history = await ops.store.history(customer="*")
        assert [entry.actor for entry in history] == ["ann", "ann"]
        assert history[-1].reason == "rollout shadow 10%: pilot"

    async def test_primary_percentage_needs_shadow_first(self, ops: CutoverOps) -> None:
        """A primary percentage above shadow's would jump customers two stages: refused."""
        await ops.rollout(Stage.SHADOW, percent=20, actor="ann")
        with pytest.raises(CutoverInputError, match="straight from legacy"):
            await ops.rollout(Stage.PRIMARY, percent=30, actor="ann")
        result = await ops.rollout(Stage.PRIMARY, percent=20, actor="ann")
        assert [c.new for c in result.changes] == ["primary 20%"]

    async def test_cohort_moves_one_stage_forward(self, ops: CutoverOps) -> None:
        """A named cohort is pinned one stage forward; a customer two stages behind stops it all."""
        await ops.store.set_override("cus_far", Stage.LEGACY, actor="t")
        result = await ops.rollout(Stage.SHADOW, customers=["cus_a", "cus_b"], actor="bob")
        assert [c.customer for c in result.changes] == ["cus_a", "cus_b"]
        assert await stages(ops, ["cus_a", "cus_b"]) == {
            "cus_a": Stage.SHADOW,
            "cus_b": Stage.SHADOW,
        }
        with pytest.raises(CutoverInputError, match="one stage at a time"):
            await ops.rollout(Stage.PRIMARY, customers=["cus_a", "cus_far"], actor="bob")
        assert (await ops.stage_of("cus_a"))[0] is Stage.SHADOW
        again = await ops.rollout(Stage.SHADOW, customers=["cus_a"], actor="bob")
        assert again.changes == [] and again.unchanged == ["cus_a is already shadow"]


class TestCohortInput:
    """Cohorts read from the command line and from files."""

    def test_file_cohort(self, tmp_path: Path) -> None:
        """Comments, blank lines, CSV columns and duplicates are handled."""
        path = tmp_path / "wave1.txt"
        path.write_text("# wave 1\ncus_a\n\ncus_b, Acme Corp\ncus_a  # again\n", encoding="utf-8")
        assert read_cohort_file(path) == ["cus_a", "cus_b"]

    def test_malformed_file_names_the_line(self, tmp_path: Path) -> None:
        """A line that is not a customer id is refused with its file and line number."""
        path = tmp_path / "bad.txt"
        path.write_text("cus_a\ncus b!\n", encoding="utf-8")
        with pytest.raises(CutoverInputError, match=r"bad.txt line 2: 'cus b!' is not a customer"):
            read_cohort_file(path)
        (tmp_path / "empty.txt").write_text("# nobody\n", encoding="utf-8")
        with pytest.raises(CutoverInputError, match="names no customer"):
            read_cohort_file(tmp_path / "empty.txt")
        with pytest.raises(CutoverInputError, match="cannot be read"):
            read_cohort_file(tmp_path / "missing.txt")
        with pytest.raises(CutoverInputError, match="not a customer id"):
            parse_customers("cus_a,cus;b")


@pytest.mark.anyio
class TestCutover:
    """Cutovers at the billing period's end, with and without the Stripe schedule."""

    async def test_scheduled_move_happens_at_the_boundary(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        clock: FakeClock,
        redis_client: aioredis.Redis,
        settings: Settings,
    ) -> None:
        """The stage and the item's price change at current_period_end, not a second before."""
        scenario = await builder.customer()
        clock.now = standin.clock.now()
        await ops.rollout(Stage.SHADOW, customers=[scenario.customer], actor="ann")
        result = await ops.cutover(
            scenario.customer,
            Stage.PRIMARY,
            at="period-end",
            with_schedule=True,
            price=scenario.meter_price,
            actor="ann",
            reason="wave 1",
        )
        item = await builder.client.v1.subscription_items.retrieve_async(scenario.item)
        end = item["current_period_end"]
        (schedule,) = [c.at for c in result.changes if c.new == "primary"]
        assert schedule == end
        created = [c for c in result.stripe_calls if c.method == "POST"]
        assert created[0].path == "/v1/subscription_schedules"
        sched_id = created[0].result_id
        assert sched_id and sched_id.startswith("sub_sched_")

        resolver = StageResolver(
            redis_client, KeySpace(settings.redis.key_prefix), settings.flags, clock=clock
        )
        clock.now = end - 1
        assert await resolver.resolve(scenario.customer) is Stage.SHADOW
        standin.clock.set(end - 1)
        item = await builder.client.v1.subscription_items.retrieve_async(scenario.item)
        assert item["price"]["id"] == scenario.legacy_price
        clock.now = end
        assert await resolver.resolve(scenario.customer) is Stage.PRIMARY
        standin.clock.set(end)
        item = await builder.client.v1.subscription_items.retrieve_async(scenario.item)
        assert item["price"]["id"] == scenario.meter_price
        audit = await ops.store.history(customer=scenario.customer)
        assert {entry.action for entry in audit} >= {"schedule", "remove_override"}
        assert all(entry.actor == "ann" for entry in audit)

    async def test_cutover_at_a_given_time(self, ops: CutoverOps, clock: FakeClock) -> None:
        """--at <time> schedules that instant; a time in the past is refused."""
        await ops.store.set_override("cus_t", Stage.SHADOW, actor="t")
        at = int(clock.now) + 3600
        await ops.cutover("cus_t", Stage.PRIMARY, at=at, actor="ann")
        assert (await ops.stage_of("cus_t"))[0] is Stage.SHADOW
        clock.now = at
        assert (await ops.stage_of("cus_t"))[0] is Stage.PRIMARY
        with pytest.raises(CutoverInputError, match="in the past"):
            await ops.cutover("cus_t", Stage.METER, at=at - 10, actor="ann")

    async def test_backwards_move_needs_force(self, ops: CutoverOps) -> None:
        """A cutover to an earlier stage is refused without --force, made with it."""
        await ops.store.set_override("cus_p", Stage.PRIMARY, actor="t")
        with pytest.raises(CutoverInputError, match="is a rollback"):
            await ops.cutover("cus_p", Stage.SHADOW, at="now", actor="ann")
        assert (await ops.stage_of("cus_p"))[0] is Stage.PRIMARY
        await ops.cutover("cus_p", Stage.SHADOW, at="now", actor="ann", force=True)
        assert (await ops.stage_of("cus_p"))[0] is Stage.SHADOW

    async def test_dry_run_changes_nothing(
        self, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """A dry run lists the flag changes and both schedule calls, and makes none of them."""
        scenario = await builder.customer()
        await ops.store.set_override(scenario.customer, Stage.SHADOW, actor="t")
        before = await ops.store.snapshot(scenario.customer)
        audit_before = await ops.store.history(limit=100)
        standin.reset_requests()
        result = await ops.cutover(
            scenario.customer,
            Stage.PRIMARY,
            at="period-end",
            with_schedule=True,
            price=scenario.meter_price,
            actor="ann",
            dry_run=True,
        )
        assert result.dry_run
        posts = [c for c in result.stripe_calls if c.method == "POST"]
        assert posts[0].params == {"from_subscription": scenario.subscription}
        phases = posts[1].params["phases"]
        assert phases[0]["items"] == [{"price": scenario.legacy_price}]
        assert phases[1]["items"] == [{"price": scenario.meter_price}]
        assert phases[0]["end_date"] == phases[1]["start_date"]
        assert {c.kind for c in result.changes} == {"schedule", "remove_override"}
        assert await ops.store.snapshot(scenario.customer) == before
        assert await ops.store.history(limit=100) == audit_before
        assert all(r.method == "GET" for r in standin.requests)
        rolled = await ops.rollback_all(actor="ann", dry_run=True)
        assert rolled.changes and await ops.store.snapshot(scenario.customer) == before

    async def test_schedule_for_month_end_anchor_ends_on_the_right_day(
        self, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """Anchored on Jan 31, a cutover at the Feb 28 period end gets a next phase ending on
        Mar 31 (Stripe's next period end), not on Mar 28 (issue 21, item 4)."""
        scenario = await anchored_on(builder, standin, utc("2027-01-31"))
        standin.clock.set(utc("2027-02-10"))
        await ops.store.set_override(scenario.customer, Stage.SHADOW, actor="t")
        result = await ops.cutover(
            scenario.customer,
            Stage.PRIMARY,
            at="period-end",
            with_schedule=True,
            price=scenario.meter_price,
            actor="ann",
            dry_run=True,
        )
        phases = [c for c in result.stripe_calls if c.method == "POST"][1].params["phases"]
        assert phases[0]["end_date"] == phases[1]["start_date"] == utc("2027-02-28")
        assert phases[1]["end_date"] == utc("2027-03-31")

    async def test_stripe_refusals_change_no_flag(
        self, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """No subscription, a schedule already there, or a refused phase update: clear errors,
        and the customer's flags stay as they were."""
        with pytest.raises(CutoverStripeError, match="no active subscription"):
            await ops.cutover("cus_nosub", Stage.SHADOW, at="period-end", actor="ann")
        scenario = await builder.customer()
        await ops.store.set_override(scenario.customer, Stage.SHADOW, actor="t")
        before = await ops.store.snapshot(scenario.customer)

        async def cut(price: str) -> None:
            await ops.cutover(
                scenario.customer,
                Stage.PRIMARY,
                at="period-end",
                with_schedule=True,
                price=price,
                actor="ann",
            )

        with pytest.raises(CutoverInputError, match="not a meter-backed"):
            await cut(scenario.legacy_price)
        standin.faults.refuse(path=r"/v1/subscription_schedules/sub_sched_\w+", count=1)
        with pytest.raises(CutoverStripeError, match=r"schedule sub_sched_\w+ was created"):
            await cut(scenario.meter_price)
        assert await ops.store.snapshot(scenario.customer) == before
        with pytest.raises(CutoverInputError, match="already has schedule sub_sched_"):
            await cut(scenario.meter_price)
        assert await ops.store.snapshot(scenario.customer) == before


@pytest.mark.anyio
class TestRollback:
    """Rollbacks of one customer and of everyone."""

    async def test_rollback_one_customer(self, ops: CutoverOps, clock: FakeClock) -> None:
        """A rollback pins the previous stage and clears the schedule, audited."""
        await ops.store.set_override("cus_r", Stage.SHADOW, actor="t")
        await ops.cutover("cus_r", Stage.PRIMARY, at="now", actor="ann")
        assert (await ops.stage_of("cus_r"))[0] is Stage.PRIMARY
        result = await ops.rollback(["cus_r"], actor="oncall", reason="invoices look wrong")
        assert (await ops.stage_of("cus_r"))[0] is Stage.SHADOW
        assert (await ops.store.snapshot("cus_r")).schedule == ()
        assert result.reason == "rollback to the previous stage: invoices look wrong"
        with pytest.raises(CutoverInputError, match="forward, not back"):
            await ops.rollback(["cus_r"], to=Stage.METER, actor="oncall")

    async def test_rollback_all(self, ops: CutoverOps, clock: FakeClock) -> None:
        """--all --force brings rollouts, the default, overrides and schedules back to legacy;
        without --force, moving anyone more than one stage is refused, nothing changed."""
        await ops.rollout(Stage.SHADOW, percent=60, actor="ann")
        await ops.rollout(Stage.PRIMARY, percent=30, actor="ann")
        await ops.store.set_default(Stage.SHADOW, actor="ann")
        await ops.store.set_override("cus_o", Stage.METER, actor="ann")
        await ops.store.schedule("cus_s", Stage.PRIMARY, int(clock.now) - 10, actor="ann")
        await ops.store.schedule("cus_s", Stage.METER, int(clock.now) + 99, actor="ann")
        before = await ops.store.history(limit=100)
        with pytest.raises(CutoverInputError, match=r"rollout primary 30%, cus_o \(meter\)"):
            await ops.rollback_all(actor="oncall", reason="incident 42")
        assert await ops.store.history(limit=100) == before
        result = await ops.rollback_all(actor="oncall", reason="incident 42", force=True)
        everyone = await stages(ops, [*SAMPLE[:100], "cus_o", "cus_s"])
        assert set(everyone.values()) == {Stage.LEGACY}
        clock.now += 100
        assert (await ops.stage_of("cus_s"))[0] is Stage.LEGACY
        history = await ops.store.history(limit=100)
        mine = [entry for entry in history if entry.actor == "oncall"]
        assert len(mine) == len(result.changes) >= 5
        assert all(entry.reason == "rollback --all to legacy: incident 42" for entry in mine)

    async def test_rollback_all_to_shadow_keeps_shadow(self, ops: CutoverOps) -> None:
        """--all --to shadow moves primary customers to shadow, not further."""
        await ops.rollout(Stage.SHADOW, percent=10, actor="ann")
        await ops.rollout(Stage.PRIMARY, percent=10, actor="ann", force=True)
        before = await stages(ops, SAMPLE)
        await ops.rollback_all(to=Stage.SHADOW, actor="oncall")
        after = await stages(ops, SAMPLE)
        for customer, stage in before.items():
            expected = Stage.SHADOW if stage is Stage.PRIMARY else stage
            assert after[customer] is expected


# ----------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(
    redis_url: str, key_prefix: str, standin_url: str, clean_environment: None
) -> Iterator[Callable[..., Result]]:
    """Runs ``dualwrite ARGS`` on the test Redis, prefix and stand-in."""
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        env = cli_environment(redis_url, key_prefix, standin_url)
        return runner.invoke(app, list(args), env=env)

    yield invoke


def flat(result: Result) -> str:
    """The output on one line."""
    return " ".join(result.output.split())


class TestCommands:
    """`dualwrite rollout|cutover|rollback` from the command line."""

    def test_file_cohort_from_the_cli(self, cli, tmp_path: Path, key_prefix: str) -> None:
        """`rollout shadow --file` pins the file's customers, audited with actor and reason."""
        path = tmp_path / "cohort.txt"
        path.write_text("cus_f1\ncus_f2\n", encoding="utf-8")
        result = cli("rollout", "shadow", "--file", str(path), "--actor", "ann", "--reason", "w1")
        assert result.exit_code == 0, result.output
        assert "changed: set_override cus_f1" in flat(result)
        result = cli("flags", "history", "--customer", "cus_f2")
        assert "ann" in result.output and "w1" in result.output

    def test_bad_input_is_refused_clearly(self, cli, tmp_path: Path) -> None:
        """Unknown stage, backwards move, malformed file: exit 2, a message, nothing changed."""
        result = cli("rollout", "sideways", "10%")
        assert result.exit_code == 2
        assert "unknown stage 'sideways'; use one of legacy, shadow, primary, meter" in flat(result)
        bad = tmp_path / "bad.txt"
        bad.write_text("cus_ok\nnot a customer\n", encoding="utf-8")
        result = cli("rollout", "shadow", "--file", str(bad))
        assert result.exit_code == 2 and "bad.txt line 2" in flat(result)
        assert cli("flags", "set", "cus_b1", "primary", "--force").exit_code == 0
        result = cli("cutover", "cus_b1", "--to", "shadow", "--at", "now")
        assert result.exit_code == 2
        assert "moving it back to shadow is a rollback" in flat(result)
        result = cli("rollout", "shadow", "12.345%")
        assert result.exit_code == 2 and "at most two decimals" in flat(result)
        result = cli("cutover", "cus_b1", "--to", "meter", "--at", "tomorrow")
        assert result.exit_code == 2 and "is not a time" in flat(result)
        listing = cli("flags", "list")
        assert "cus_ok" not in listing.output and "rollout: shadow 0 %" in flat(listing)

    def test_dry_run_prints_the_stripe_calls(
        self, cli, standin: StripeStandin, standin_url: str
    ) -> None:
        """`cutover --dry-run --with-schedule` prints both schedule calls and writes nothing."""
        import anyio

        async def make() -> tuple[str, str]:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                scenario = await builder.customer()
            return scenario.customer, scenario.meter_price

        customer, price = anyio.run(make)
        standin.reset_requests()
        assert cli("flags", "set", customer, "shadow").exit_code == 0
        args = ["cutover", customer, "--to", "primary", "--with-schedule", "--price", price]
        result = cli(*args, "--dry-run")
        assert result.exit_code == 0, result.output
        out = flat(result)
        assert "stripe: POST /v1/subscription_schedules from_subscription=sub_" in out
        assert f"phases[1][items][0][price]={price}" in out
        assert "dry run: nothing was changed" in out
        as_json = json.loads(cli(*args, "--dry-run", "--json").output)
        assert as_json["dry_run"] is True and len(as_json["stripe_calls"]) == 3
        assert not [r for r in standin.requests if "schedule" in r.path]
        assert "override" in cli("flags", "get", customer).output

    def test_rollback_all_from_the_cli(self, cli) -> None:
        """`rollback --all` sends everyone back (--force: primary to legacy at once); `--dry-run`
        first changes nothing."""
        assert cli("flags", "rollout", "shadow", "50").exit_code == 0
        assert cli("flags", "set", "cus_x", "primary", "--force").exit_code == 0
        refused = cli("rollback", "--all", "--dry-run")
        assert refused.exit_code == 2 and "more than one stage at once" in flat(refused)
        dry = cli("rollback", "--all", "--force", "--dry-run")
        assert dry.exit_code == 0 and "would change: rollout *: shadow 50% -> shadow 0%" in flat(
            dry
        )
        assert "primary" in cli("flags", "get", "cus_x").output
        done = cli("rollback", "--all", "--force", "--reason", "incident")
        assert done.exit_code == 0, done.output
        assert "legacy" in cli("flags", "get", "cus_x").output
        assert "rollout: shadow 0 %" in flat(cli("flags", "list"))
        assert cli("rollback").exit_code == 2
