"""How Redis memory grows: bytes per customer and bytes per event, by kind of key.

Records usage through the engine (at ``shadow``, against the stand-in in this process on a real
socket) in two phases under a fresh key prefix, delivering every shadow write after each:

1. one caller-keyed event for each of ``--customers`` customers;
2. ``--events`` more caller-keyed events for each of the same customers (same period).

``MEMORY USAGE`` of every key, grouped by kind, after each phase gives the two growths apart:
what phase 2 added, divided by its events, is the cost of one more event (the idempotency record
kept for the caller's retries; the ledger row only changes its counters); what phase 1 left, less
one event's worth per customer, is the cost of one more customer (its ledger row and the row's copy
in the rollup, its index entries, its period).

    python bench/memory.py                               # 500 customers, 4 more events each
    python bench/memory.py --customers 2000 --events 10 --own-redis

Needs Redis (``REDIS_URL``) unless ``--own-redis`` starts one for the run; keys are deleted at the
end. Each figure is also printed as a ratio to the same run's baseline, the customer's ledger row
(what the rollup copy, the index entries and one more event cost next to the row itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from _load import REDIS_URL
from _scenario import EVENT_NAME, KEY, Catalog
from claim_memory import _memory_by_kind
from pydantic import SecretStr

from dualwrite.config import MeterMapping, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore
from dualwrite.models import Stage, UsageEvent
from dualwrite.testing import RedisServerProcess, StripeStandin, serve_standin

#: Kinds that grow with events (the rest grow with customers, or are shared).
PER_EVENT = ("idem", "spooled", "claims", "set", "outbox")


async def run(customers: int, events: int, redis_url: str) -> dict[str, Any]:
    """Record the two phases and measure what each leaves in Redis."""
    prefix = f"dwbench-grow-{uuid.uuid4().hex[:8]}"
    standin = StripeStandin(api_keys=[KEY])
    with serve_standin(standin) as running:
        catalog = Catalog(running.url)
        people = [catalog.customer(f"grow {n}") for n in range(customers)]
        settings = Settings(
            redis={"url": redis_url, "key_prefix": prefix},
            stripe={"api_base": running.url},
            outbox={"spool": False, "block_ms": 20},
            meters=(MeterMapping(event_name=EVENT_NAME),),
            STRIPE_API_KEY=SecretStr(KEY),
        )
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        redis = aioredis.Redis.from_url(redis_url)
        now = int(time.time())
        try:
            await RedisFlagStore(engine.redis, engine.keys).set_default(Stage.SHADOW, actor="bench")
            worker = engine.new_worker()
            await worker.start()
            limit = asyncio.Semaphore(32)

            async def one(index: int, nth: int) -> None:
                customer, item = people[index]
                event = UsageEvent(
                    identifier=f"grow-{index}-{nth}",
                    identifier_source="idempotency_key",
                    customer=customer,
                    subscription_item=item,
                    event_name=EVENT_NAME,
                    quantity=1 + nth % 5,
                    timestamp=now,
                )
                async with limit:
                    outcome = await engine.record(event)
                assert outcome.accepted, outcome

            await asyncio.gather(*(one(index, 0) for index in range(customers)))
            await asyncio.wait_for(worker.drain(), 600)
            first, first_keys = await _memory_by_kind(redis, prefix)
            await asyncio.gather(
                *(one(index, nth) for index in range(customers) for nth in range(1, events + 1))
            )
            await asyncio.wait_for(worker.drain(), 600)
            second, second_keys = await _memory_by_kind(redis, prefix)
            await worker.aclose()
        finally:
            async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
                await redis.unlink(key)
            await redis.aclose()
            await engine.aclose()
    return _figures(customers, events, first, second, first_keys, second_keys)


def _figures(
    customers: int,
    events: int,
    first: Counter[str],
    second: Counter[str],
    first_keys: Counter[str],
    second_keys: Counter[str],
) -> dict[str, Any]:
    added_events = customers * events
    per_event = {
        kind: round((second[kind] - first[kind]) / added_events, 1)
        for kind in sorted(set(first) | set(second))
        if second[kind] != first[kind]
    }
    event_bytes = sum(second[kind] - first[kind] for kind in second) / added_events
    per_customer = {
        kind: round(first[kind] / customers - per_event.get(kind, 0.0), 1)
        for kind in sorted(first)
        if first[kind] / customers - per_event.get(kind, 0.0) >= 1
    }
    customer_bytes = sum(first.values()) / customers - event_bytes
    row = per_customer.get("ledger", 0.0)
    return {
        "ratios (baseline: the ledger row, same run)": {
            kind: round(value / row, 2) for kind, value in per_customer.items() if row
        }
        | {"one event's growth": round(event_bytes / row, 2) if row else None},
        "customers": customers,
        "events_per_customer": 1 + events,
        "bytes_per_customer": round(customer_bytes, 1),
        "bytes_per_customer_by_kind": per_customer,
        "bytes_per_event": round(event_bytes, 1),
        "bytes_per_event_by_kind": per_event,
        "total_bytes_per_customer_after_phase_1 (baseline)": round(sum(first.values()) / customers),
        "total_bytes_per_event_after_phase_2": round(
            sum(second.values()) / (customers * (1 + events))
        ),
        "keys_after_phase_1": dict(sorted(first_keys.items())),
        "keys_after_phase_2": dict(sorted(second_keys.items())),
    }


def main() -> None:
    """Parse the arguments, run, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=500)
    parser.add_argument("--events", type=int, default=4, help="more events per customer")
    parser.add_argument("--own-redis", action="store_true", help="a redis-server of the run's own")
    args = parser.parse_args()
    if not args.own_redis:
        print(json.dumps(asyncio.run(run(args.customers, args.events, REDIS_URL)), indent=2))
        return
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServerProcess(Path(directory))
        server.start()
        try:
            result = asyncio.run(run(args.customers, args.events, server.url))
        finally:
            server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
