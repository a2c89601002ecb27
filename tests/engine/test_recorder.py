"""``Recorder`` and ``SyncRecorder``: usage recorded from Python code, against the stand-in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import anyio
import pytest

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import (
    ConflictError,
    DualwriteError,
    IdempotencyError,
    UsageInputError,
)
from dualwrite.models import Stage
from dualwrite.outbox import OutboxWorker
from dualwrite.recorder import Recorder, SyncRecorder
from tests.apps_support import make_scenario
from tests.conftest import SettingsFactory
from tests.support import (
    EVENT_NAME,
    Scenario,
    ScenarioBuilder,
    cli_environment,
    refuse_usage_record_once,
    set_stage,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def scenario(builder: ScenarioBuilder) -> Scenario:
    """A customer on a legacy metered price."""
    return await builder.customer()


@pytest.fixture
def sync_scenario(standin_url: str, standin) -> Scenario:
    """A customer on a legacy metered price, for the synchronous tests."""
    return make_scenario(standin_url)


@pytest.fixture
def recorder(engine: DualWriteEngine) -> Recorder:
    """A Recorder sharing the test's engine (no background worker: tests drain explicitly)."""
    return Recorder(engine=engine)


@pytest.fixture
def sync_recorder(settings: Settings) -> Iterator[SyncRecorder]:
    """A SyncRecorder on the test's settings (its own loop thread and in-process worker)."""
    with SyncRecorder(config=settings) as made:
        yield made


async def drain(engine: DualWriteEngine) -> None:
    """Deliver every shadow write waiting in the outbox."""
    with anyio.fail_after(15):
        await OutboxWorker(engine.outbox, engine.writer).drain()


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def recorder_threads() -> list[str]:
    """The names of the SyncRecorder loop threads alive in this process (the record path's and
    the outbox worker's), sorted."""
    names = ("dualwrite-recorder", "dualwrite-outbox")
    return sorted(t.name for t in threading.enumerate() if t.name in names)


class TestRecorder:
    """The async direct API writes at the customer's stage and reports the outcome."""

    @pytest.mark.parametrize("stage", list(Stage))
    async def test_each_stage_writes_its_legs(self, recorder, engine, scenario, standin, stage):
        """legacy and shadow write a usage record; shadow, primary and meter a meter event."""
        await set_stage(engine, scenario.customer, stage)
        outcome = await recorder.record(
            customer=scenario.customer,
            subscription_item=scenario.item,
            quantity=7,
            event_name=EVENT_NAME,
            identifier=f"rec-{stage.value}",
        )
        await drain(engine)
        assert outcome.accepted and outcome.stage is stage
        legacy = 7 if stage in (Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY) else 0
        meter = 7 if stage in (Stage.SHADOW, Stage.PRIMARY, Stage.METER) else 0
        assert standin.legacy_total(scenario.item) == legacy
        assert standin.meter_total(scenario.customer, EVENT_NAME) == meter

    async def test_same_identifier_records_once(self, recorder, scenario, standin):
        """A retry with the same identifier gets the first outcome back and writes nothing."""
        fields = {
            "customer": scenario.customer,
            "subscription_item": scenario.item,
            "quantity": 4,
            "event_name": EVENT_NAME,
            "identifier": "job-42",
        }
        first = await recorder.record(**fields)
        again = await recorder.record(**fields)
        assert not first.replayed and again.replayed
        assert again.authoritative.stripe_id == first.authoritative.stripe_id
        assert standin.legacy_total(scenario.item) == 4

    async def test_identifier_reused_for_other_usage(self, recorder, scenario):
        """The same identifier with another quantity is an IdempotencyError."""
        await recorder.record(
            customer=scenario.customer,
            subscription_item=scenario.item,
            quantity=4,
            event_name=EVENT_NAME,
            identifier="job-43",
        )
        with pytest.raises(IdempotencyError):
            await recorder.record(
                customer=scenario.customer,
                subscription_item=scenario.item,
                quantity=5,
                event_name=EVENT_NAME,
                identifier="job-43",
            )

    @pytest.mark.parametrize(
        ("override", "param"),
        [
            ({"quantity": -1}, "quantity"),
            ({"quantity": 2.5}, "quantity"),
            ({"quantity": True}, "quantity"),
            ({"quantity": "five"}, "quantity"),
            ({"quantity": 10**15}, "quantity"),
            ({"customer": None}, "customer"),
            ({"customer": "cus with spaces"}, "customer"),
            ({"event_name": None}, "event_name"),
            ({"action": "add"}, "action"),
            ({"timestamp": int(time.time()) + 3600}, "timestamp"),
            ({"identifier": ["a"]}, "identifier"),
            ({"customr": "cus_typo"}, "customr"),
        ],
    )
    async def test_bad_input_names_the_argument_and_writes_nothing(
        self, recorder, scenario, standin, override, param
    ):
        """Bad arguments raise the middleware's UsageInputError, naming the argument."""
        fields = {
            "customer": scenario.customer,
            "subscription_item": scenario.item,
            "quantity": 3,
            "event_name": EVENT_NAME,
        } | override
        with pytest.raises(UsageInputError) as raised:
            await recorder.record(**fields)
        assert raised.value.param == param
        assert standin.legacy_total(scenario.item) == 0

    async def test_subscription_item_required_where_usage_records_are_written(
        self, recorder, scenario
    ):
        """At legacy, leaving out the subscription item is refused before any write."""
        with pytest.raises(UsageInputError) as raised:
            await recorder.record(customer=scenario.customer, quantity=1, event_name=EVENT_NAME)
        assert raised.value.param == "subscription_item"

    async def test_stripe_refusal_is_an_outcome(self, recorder, scenario, standin):
        """Stripe refusing the authoritative write comes back as outcome.accepted False."""
        refuse_usage_record_once(standin, scenario.item)
        outcome = await recorder.record(
            customer=scenario.customer,
            subscription_item=scenario.item,
            quantity=3,
            event_name=EVENT_NAME,
        )
        assert not outcome.accepted
        assert outcome.authoritative.failure is not None
        assert outcome.authoritative.failure.message == "authoritative refusal"

    async def test_items_mapping_supplies_customer_and_event_name(
        self, standin_settings: SettingsFactory, scenario, standin
    ):
        """With [items] mapping the item, record() needs only the item and the quantity."""
        mapped = {scenario.item: {"customer": scenario.customer, "event_name": EVENT_NAME}}
        async with Recorder(config=standin_settings(items=mapped)) as recorder:
            outcome = await recorder.record(subscription_item=scenario.item, quantity=6)
        assert outcome.accepted and outcome.event.customer == scenario.customer
        assert standin.legacy_total(scenario.item) == 6

    async def test_owned_engine_starts_and_closes(self, settings, scenario):
        """A recorder built from settings starts its engine and worker, and closes them."""
        recorder = Recorder(config=settings)
        async with recorder:
            assert recorder.engine.worker is not None
        assert recorder.engine.worker is None


class TestSyncRecorder:
    """The synchronous direct API: its own loop thread, shared by threads, fork-safe."""

    def test_record_returns_the_outcome(self, sync_recorder, sync_scenario, standin):
        """record() blocks until the authoritative write has answered."""
        outcome = sync_recorder.record(
            customer=sync_scenario.customer,
            subscription_item=sync_scenario.item,
            quantity=9,
            event_name=EVENT_NAME,
        )
        assert outcome.accepted and outcome.authoritative.stripe_id
        assert standin.legacy_total(sync_scenario.item) == 9

    def test_threads_share_one_recorder(self, sync_recorder, sync_scenario, standin):
        """Eight threads recording at once: one loop thread, every unit counted once."""
        errors: list[BaseException] = []

        def work(thread: int) -> None:
            try:
                for index in range(10):
                    sync_recorder.record(
                        customer=sync_scenario.customer,
                        subscription_item=sync_scenario.item,
                        quantity=1 + thread,
                        event_name=EVENT_NAME,
                        identifier=f"t{thread}-{index}",
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert recorder_threads() == ["dualwrite-outbox", "dualwrite-recorder"]  # one of each
        assert standin.legacy_total(sync_scenario.item) == 10 * sum(range(1, 9))

    async def test_shadow_is_delivered_by_its_own_worker(self, settings, engine, scenario, standin):
        """At shadow, the SyncRecorder's in-process worker delivers the meter event."""
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        with SyncRecorder(config=settings) as recorder:
            outcome = await anyio.to_thread.run_sync(
                lambda: recorder.record(
                    customer=scenario.customer,
                    subscription_item=scenario.item,
                    quantity=5,
                    event_name=EVENT_NAME,
                )
            )
            assert outcome.shadow_status == "enqueued"
            await anyio.to_thread.run_sync(
                wait_until, lambda: standin.meter_total(scenario.customer, EVENT_NAME) >= 5
            )
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 5

    def test_errors_are_the_typed_exceptions(self, sync_recorder, sync_scenario):
        """Bad input raises UsageInputError in the calling thread, before any loop hop."""
        with pytest.raises(UsageInputError) as raised:
            sync_recorder.record(
                customer=sync_scenario.customer, quantity=-3, event_name=EVENT_NAME
            )
        assert raised.value.param == "quantity"
        assert recorder_threads() == []  # nothing was started for a refused call

    def test_closed_by_its_context_manager(self, settings, sync_scenario):
        """Leaving ``with`` stops the loop thread; a closed recorder refuses to record."""
        with SyncRecorder(config=settings) as recorder:
            recorder.record(
                customer=sync_scenario.customer,
                subscription_item=sync_scenario.item,
                quantity=1,
                event_name=EVENT_NAME,
            )
            assert recorder_threads() == ["dualwrite-outbox", "dualwrite-recorder"]
        assert recorder_threads() == []
        with pytest.raises(DualwriteError, match="closed"):
            recorder.record(
                customer=sync_scenario.customer,
                subscription_item=sync_scenario.item,
                quantity=1,
                event_name=EVENT_NAME,
            )

    def test_conflict_while_the_same_identifier_is_in_flight(
        self, sync_recorder, sync_scenario, standin
    ):
        """Two threads with one identifier at once: one writes, the other gets ConflictError or the
        replay; the usage is counted once."""
        standin.latency_seconds = 0.3
        results: list[object] = []

        def work() -> None:
            try:
                results.append(
                    sync_recorder.record(
                        customer=sync_scenario.customer,
                        subscription_item=sync_scenario.item,
                        quantity=2,
                        event_name=EVENT_NAME,
                        identifier="same-time",
                    )
                )
            except ConflictError as exc:
                results.append(exc)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        standin.latency_seconds = 0.0
        assert len(results) == 2
        assert standin.legacy_total(sync_scenario.item) == 2

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
    def test_forked_child_starts_its_own_loop(self, sync_recorder, sync_scenario, standin):
        """A child forked after the parent recorded gets a loop and connections of its own; the
        parent's keep working."""
        fields = {
            "customer": sync_scenario.customer,
            "subscription_item": sync_scenario.item,
            "event_name": EVENT_NAME,
        }
        sync_recorder.record(quantity=1, identifier="parent-1", **fields)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: record, report, and leave without running the parent's atexit
            code = 1
            try:
                os.close(read)
                signal.alarm(20)  # a child reusing the parent's dead loop would hang here
                outcome = sync_recorder.record(quantity=10, identifier="child-1", **fields)
                os.write(write, f"{outcome.accepted} {len(recorder_threads())}".encode())  # 2
                sync_recorder.close()
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            report = pipe.read()
        assert os.waitstatus_to_exitcode(status) == 0, report
        assert report == "True 2"  # its own record and delivery threads, started after the fork
        sync_recorder.record(quantity=100, identifier="parent-2", **fields)
        assert standin.legacy_total(sync_scenario.item) == 111

    async def test_closed_at_process_exit(
        self, redis_url, key_prefix, standin_url, engine, scenario, standin
    ):
        """A script that never closes its recorder is closed by the exit: the shadow write its
        worker had in flight is finished and settled, not left pending."""
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        standin.latency_seconds = 0.5
        script = textwrap.dedent(
            f"""
            import time
            from dualwrite import SyncRecorder
            recorder = SyncRecorder()
            outcome = recorder.record(customer={scenario.customer!r},
                subscription_item={scenario.item!r}, quantity=3, event_name={EVENT_NAME!r})
            print(outcome.accepted, outcome.shadow_status)
            time.sleep(0.2)  # the worker has taken the shadow write; the meter call is in flight
            """
        )
        env = os.environ | cli_environment(redis_url, key_prefix, standin_url)
        env["DUALWRITE_METERS"] = f'[{{"event_name": "{EVENT_NAME}"}}]'
        result = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
            )
        )
        standin.latency_seconds = 0.0
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "True enqueued"
        for trouble in ("Traceback", "Exception ignored", "Task was destroyed", "did not close"):
            assert trouble not in result.stderr
        depth = await engine.outbox.depth()
        assert (depth.outstanding, depth.pending) == (0, 0)
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 3
