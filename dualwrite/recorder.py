"""``Recorder`` and ``SyncRecorder``: record usage from Python code, with no route in between.

For code that reports usage itself (a view, a Celery task, a cron script, a worker) rather than
through an HTTP route the middleware can match::

    with SyncRecorder(config=Settings.load("dualwrite.toml")) as recorder:
        outcome = recorder.record(customer="cus_…", subscription_item="si_…", quantity=5,
                                  event_name="api_requests", identifier="job-42")

``Recorder`` is the async form, on the caller's event loop. ``SyncRecorder`` runs one on an event
loop thread of its own: any number of threads may share it, and it is closed by its context
manager, by ``close()``, or when the process exits. A forked child (gunicorn's and Celery's
pre-fork workers) never touches its parent's loop or connections: it starts its own at first use,
so the outbox worker starts once per process, after the fork.

The keyword arguments are read exactly as the middleware reads a JSON body (``build_event``), so
bad input raises the ``UsageInputError`` the middleware turns into a 400, naming the argument;
``IdempotencyError`` and ``ConflictError`` mean what they mean there. Stripe refusing the
authoritative write is not an exception: ``outcome.accepted`` is False and the error is in
``outcome.authoritative.failure``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypedDict, TypeVar, Unpack

from dualwrite.config import Settings, UsageRoute
from dualwrite.durability import DurabilityGuard
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import DualwriteError, UsageInputError
from dualwrite.models import Action, RecordOutcome, UsageEvent
from dualwrite.routes import RouteMatch, build_event

if TYPE_CHECKING:
    from dualwrite.outbox import OutboxWorker

__all__ = ["CLOSE_TIMEOUT", "Recorder", "SyncRecorder", "UsageFields"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds ``SyncRecorder.close()`` waits for the worker to finish its batch (what it leaves
#: unfinished stays pending, and another worker claims it).
CLOSE_TIMEOUT: Final = 10.0

#: ``record()``'s usage arguments; each is read as the middleware reads a JSON body field.
_ARGUMENTS: Final = (
    "customer",
    "subscription_item",
    "event_name",
    "quantity",
    "timestamp",
    "action",
    "identifier",
)
_ARGUMENTS_MATCH = RouteMatch(
    UsageRoute.model_validate(
        {"method": "POST", "path": "/", **{name: f"json:{name}" for name in _ARGUMENTS}}
    ),
    {},
)


class UsageFields(TypedDict, total=False):
    """``record()``'s keyword arguments besides ``quantity`` (see ``Recorder.record``)."""

    customer: str | None
    subscription_item: str | None
    event_name: str | None
    identifier: str | None
    timestamp: int | None
    action: Action


class _EventMaker:
    """``event()``: ``record()``'s arguments, checked and made into a ``UsageEvent``."""

    settings: Settings
    _clock: Callable[[], float]

    def event(self, *, quantity: int, **fields: Unpack[UsageFields]) -> UsageEvent:
        """The ``UsageEvent`` that ``record`` with these arguments writes (checked, not written).

        Raises:
            UsageInputError: an argument is unknown, missing, of the wrong type or out of range
                (``param`` names it).
        """
        given: dict[str, object] = {}
        for name, value in {"quantity": quantity, **fields}.items():
            if name not in _ARGUMENTS:
                msg = f"unknown argument {name}; record() takes {', '.join(_ARGUMENTS)}"
                raise UsageInputError(msg, param=name, code="parameter_unknown")
            if value is None:
                continue
            if not isinstance(value, str | int | float):
                msg = f"{name} must be a string or a number, not {type(value).__name__}"
                raise UsageInputError(msg, param=name, code="parameter_invalid")
            given[name] = value
        return build_event(
            _ARGUMENTS_MATCH,
            query_string=b"",
            headers=(),
            body=json.dumps(given).encode(),
            now=int(self._clock()),
            items=self.settings.items,
        )


class Recorder(_EventMaker):
    """Records usage from async code, on the running event loop.

    Args:
        config: settings (default: ``Settings.load()``, i.e. ``DUALWRITE_CONFIG`` and the
            environment).
        engine: an engine to share; whoever built it starts and closes it. By default the recorder
            builds one from ``config``, starts it (and its outbox worker, unless
            ``[outbox] run_in_process = false``) at the first ``record`` or on entering
            ``async with``, and closes it in ``aclose()``. Starting it checks Redis's durability
            as ``serve`` does (``dualwrite.durability``): an evicting Redis refuses the start.
        clock: where "now" comes from (tests).
    """

    def __init__(
        self,
        *,
        config: Settings | None = None,
        engine: DualWriteEngine | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = config or (engine.settings if engine else Settings.load())
        self.engine = engine or DualWriteEngine.from_settings(self.settings, clock=clock)
        self._owns_engine = engine is None
        self._clock = clock
        self.durability: DurabilityGuard | None = None
        """The durability checks of the engine the recorder built (None: a shared engine, whose
        builder checks its Redis), once started."""

    async def record(self, *, quantity: int, **fields: Unpack[UsageFields]) -> RecordOutcome:
        """Record usage at the customer's stage and return the outcome.

        Args:
            quantity: a whole number of units (at most 15 digits).
            customer: the Stripe customer; may be left out when ``[items]`` maps
                ``subscription_item`` to it.
            subscription_item: the legacy subscription item; required at the stages that write
                usage records (``legacy``, ``shadow``, ``primary``).
            event_name: the meter's event name; may be left out when ``[items]`` maps the item.
            identifier: makes retries safe: the same identifier records once, and gets the first
                outcome back (``replayed=True``). Left out, one is minted, and a retry counts again.
            timestamp: Unix seconds; left out, "now", fixed once for both legs.
            action: ``increment`` (default) or ``set``.

        Raises:
            UsageInputError: an argument is missing or invalid (``param`` names it).
            IdempotencyError: ``identifier`` was used before for different usage.
            ConflictError: ``identifier`` is being recorded by another call right now.
        """
        event = self.event(quantity=quantity, **fields)
        return await self.record_event(event)

    async def record_event(self, event: UsageEvent) -> RecordOutcome:
        """Record an already built ``UsageEvent`` (the WSGI middleware's, or ``event()``'s)."""
        await self.start()
        return await self.engine.record(event)

    async def start(self) -> None:
        """Start the engine (and its outbox worker) if the recorder built it; idempotent.

        Raises:
            RedisEvictionError: Redis may evict dualwrite's keys (``dualwrite.durability``);
                raised again at every call until Redis or ``[redis] allow_eviction`` changes.
        """
        if not self._owns_engine:
            return
        if self.durability is None:
            stores = self.engine.stores
            guard = DurabilityGuard(stores.redis, stores.keys, self.settings.redis)
            await guard.start()
            self.durability = guard
        await self.engine.start_once()

    async def aclose(self) -> None:
        """Stop the worker (its unfinished entries stay pending for another) and close the engine,
        if the recorder built it."""
        if self.durability is not None:
            await self.durability.aclose()
        if self._owns_engine:
            await self.engine.aclose()

    async def __aenter__(self) -> Recorder:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _LoopThread:
    """An event loop running in a daemon thread of its own."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coroutine`` on the loop; its future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def finish(self, coroutine: Coroutine[Any, Any, None], *, timeout: float) -> None:
        """Run ``coroutine`` (a close) for at most ``timeout`` seconds, then stop the loop."""
        try:
            self.submit(coroutine).result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            log.warning("dualwrite recorder did not close within %.0f s; leaving it", timeout)
        except Exception:
            log.exception("closing the dualwrite recorder failed")
        self.stop()

    def stop(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=CLOSE_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass(slots=True)
class _Running:
    """One process's recorder: the ``Recorder`` on its loop thread, and the outbox worker's engine
    on a loop thread of its own (so that deliveries never hold up a ``record`` call)."""

    pid: int
    records: _LoopThread
    recorder: Recorder
    deliveries: _LoopThread | None = None
    worker: DualWriteEngine | None = None


# Every SyncRecorder, so that a forked child forgets its parent's loops and the process's exit
# closes its own.
_LIVE: weakref.WeakSet[SyncRecorder] = weakref.WeakSet()
# A forked child's copies of its parent's loops and connections: kept referenced (never collected,
# never closed) so that nothing in the child writes to sockets its parent still uses.
_INHERITED: list[_Running] = []


class SyncRecorder(_EventMaker):
    """Records usage from synchronous code: threads, Celery workers, scripts, WSGI apps.

    It runs a ``Recorder`` on an event loop thread of its own, started at the first call (in each
    process: a forked child starts its own). Share one per process; close it with ``with``,
    ``close()``, or let the process's exit close it.

    Args:
        config: settings (default: ``Settings.load()``).
        clock: where "now" comes from (tests).
    """

    def __init__(self, *, config: Settings | None = None, clock: Callable[[], float] = time.time):
        self.settings = config or Settings.load()
        self._clock = clock
        self._lock = threading.Lock()
        self._running: _Running | None = None
        self._closed = False
        _LIVE.add(self)

    def record(self, *, quantity: int, **fields: Unpack[UsageFields]) -> RecordOutcome:
        """Record usage at the customer's stage and return the outcome (``Recorder.record``'s
        arguments, errors and outcome); blocks until the authoritative write has answered."""
        event = self.event(quantity=quantity, **fields)
        return self.record_event(event)

    def record_event(self, event: UsageEvent) -> RecordOutcome:
        """Record an already built ``UsageEvent``."""
        return self.run(lambda recorder: recorder.record_event(event))

    def run(self, call: Callable[[Recorder], Awaitable[T]]) -> T:
        """Run ``call(recorder)`` on the recorder's loop and wait for its result (what the WSGI
        middleware and the SDK hook build on)."""
        running = self._ensure_running()
        if threading.current_thread() is running.records.thread:
            msg = "SyncRecorder called from its own event loop: await the Recorder instead"
            raise DualwriteError(msg)
        return running.records.submit(_call(call, running)).result()

    async def run_async(self, call: Callable[[Recorder], Awaitable[T]]) -> T:
        """``run`` for a caller on another event loop: awaits instead of blocking it."""
        running = self._ensure_running()
        return await asyncio.wrap_future(running.records.submit(_call(call, running)))

    def start(self) -> None:
        """Start the loop thread, the engine and its outbox worker now rather than at the first
        call (e.g. in gunicorn's ``post_fork`` hook); idempotent."""
        self._ensure_running()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (``record`` raises from then on)."""
        return self._closed

    @property
    def outbox_worker(self) -> OutboxWorker | None:
        """This process's outbox worker (None: not started, or ``run_in_process = false``)."""
        running = self._running
        return running.worker.worker if running is not None and running.worker else None

    @property
    def durability(self) -> DurabilityGuard | None:
        """This process's durability checks (None until the recorder started)."""
        running = self._running
        return running.recorder.durability if running is not None else None

    def _ensure_running(self) -> _Running:
        running = self._running
        if running is not None:
            return running
        with self._lock:
            if self._closed:
                msg = "this SyncRecorder is closed; make a new one"
                raise DualwriteError(msg)
            if self._running is None:
                self._running = self._start()
            return self._running

    def _start(self) -> _Running:
        # The record path's engine runs no worker; the outbox worker gets its own engine and loop.
        outbox = self.settings.outbox
        quiet = self.settings.model_copy(
            update={"outbox": outbox.model_copy(update={"run_in_process": False})}
        )

        async def open_recorder() -> Recorder:
            recorder = Recorder(config=quiet, clock=self._clock)
            await recorder.start()
            return recorder

        async def open_worker() -> DualWriteEngine:
            engine = DualWriteEngine.from_settings(self.settings, clock=self._clock)
            await engine.start()
            return engine

        records = _LoopThread("dualwrite-recorder")
        running: _Running | None = None
        try:
            running = _Running(os.getpid(), records, records.submit(open_recorder()).result())
            if outbox.run_in_process:
                running.deliveries = _LoopThread("dualwrite-outbox")
                running.worker = running.deliveries.submit(open_worker()).result()
        except BaseException:
            if running is not None:
                self._stop(running, timeout=CLOSE_TIMEOUT)
            else:
                records.stop()
            raise
        return running

    def close(self, *, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the outbox worker (its unfinished entries stay pending for another), close the
        engine and stop the loop threads. Idempotent; ``record`` raises afterwards."""
        with self._lock:
            self._closed = True
            running, self._running = self._running, None
        if running is not None:
            self._stop(running, timeout=timeout)

    @staticmethod
    def _stop(running: _Running, *, timeout: float) -> None:
        if running.deliveries is not None:
            worker = running.worker
            if worker is not None:
                running.deliveries.finish(worker.aclose(), timeout=timeout)
            else:
                running.deliveries.stop()
        running.records.finish(running.recorder.aclose(), timeout=timeout)

    def __enter__(self) -> SyncRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's loop (never closing it) and any held lock."""
        self._lock = threading.Lock()
        if self._running is not None:
            _INHERITED.append(self._running)
            self._running = None


async def _call(call: Callable[[Recorder], Awaitable[T]], running: _Running) -> T:
    return await call(running.recorder)


def _after_fork_in_child() -> None:
    for recorder in list(_LIVE):
        recorder._forget_after_fork()


def _close_at_exit() -> None:
    for recorder in list(_LIVE):
        recorder.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)
