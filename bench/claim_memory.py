"""Redis bytes each recorded event leaves behind once delivered: idempotency records and claims.

Records ``--events`` usage events with a caller's identifier and as many without (dualwrite mints
one) at ``shadow`` through the engine, against the stand-in (in this process, on a real socket),
delivers every shadow write, then reads ``MEMORY USAGE`` of every key under the run's prefix and
groups them by kind. What a claim costs is the per-event figure of the ``idem`` (records kept for
caller retries), ``spooled`` (in-doubt commit markers), ``claims`` (the recovery index) and
``set`` kinds; the ledger, rollups and streams are shared by every event of a customer and period.

    python bench/claim_memory.py               # 2,000 + 2,000 events
    python bench/claim_memory.py --events 500

Needs Redis (``REDIS_URL``); its keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from _load import REDIS_URL
from _scenario import EVENT_NAME, KEY, Catalog
from pydantic import SecretStr

from dualwrite.config import MeterMapping, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore
from dualwrite.models import Stage, UsageEvent
from dualwrite.testing import StripeStandin, serve_standin

#: The kinds a claim leaves per event (the rest is shared per customer and period).
PER_EVENT_KINDS = ("idem", "spooled", "claims", "set")


def _kind(key: str, prefix: str) -> str:
    """``P:{s0}:idem:…`` → ``idem``; ``P:{items}:period:…`` → ``period``."""
    rest = key.removeprefix(prefix + ":")
    parts = rest.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


async def _memory_by_kind(redis: aioredis.Redis, prefix: str) -> tuple[Counter[str], Counter[str]]:
    """Bytes and key counts under ``prefix``, by kind."""
    sizes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    async for raw in redis.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        kind = _kind(key, prefix)
        sizes[kind] += int(await redis.memory_usage(key, samples=0) or 0)
        counts[kind] += 1
    return sizes, counts


async def run(events: int) -> dict[str, Any]:
    """Record and deliver the events, then measure what stays in Redis."""
    prefix = f"dwbench-mem-{uuid.uuid4().hex[:8]}"
    standin = StripeStandin(api_keys=[KEY])
    with serve_standin(standin) as running:
        catalog = Catalog(running.url)
        customers = [catalog.customer(f"mem {n}") for n in range(10)]
        settings = Settings(
            redis={"url": REDIS_URL, "key_prefix": prefix},
            stripe={"api_base": running.url},
            outbox={"spool": False, "block_ms": 20},
            meters=(MeterMapping(event_name=EVENT_NAME),),
            STRIPE_API_KEY=SecretStr(KEY),
        )
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        redis = aioredis.Redis.from_url(REDIS_URL)
        try:
            await RedisFlagStore(engine.redis, engine.keys).set_default(Stage.SHADOW, actor="bench")
            limit = asyncio.Semaphore(32)

            async def one(n: int, tracked: bool) -> None:
                customer, item = customers[n % len(customers)]
                event = UsageEvent(
                    identifier=f"bench-{n}-{tracked}" if tracked else f"dwev_{uuid.uuid4().hex}",
                    identifier_source="idempotency_key" if tracked else "minted",
                    customer=customer,
                    subscription_item=item,
                    event_name=EVENT_NAME,
                    quantity=1 + n % 5,
                    timestamp=int(time.time()),
                )
                async with limit:
                    outcome = await engine.record(event)
                assert outcome.accepted, outcome

            await asyncio.gather(*(one(n, True) for n in range(events)))
            after_tracked, _ = await _memory_by_kind(redis, prefix)
            await asyncio.gather(*(one(n, False) for n in range(events)))
            worker = engine.new_worker()
            await worker.start()
            await asyncio.wait_for(worker.drain(), 300)
            await worker.aclose()
            sizes, counts = await _memory_by_kind(redis, prefix)
        finally:
            async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
                await redis.unlink(key)
            await redis.aclose()
            await engine.aclose()
    tracked_bytes = sum(after_tracked[kind] for kind in PER_EVENT_KINDS)
    all_bytes = sum(sizes[kind] for kind in PER_EVENT_KINDS)
    return {
        "events_each": events,
        "bytes_per_caller_keyed_event": round(tracked_bytes / events, 1),
        "bytes_per_minted_event": round((all_bytes - tracked_bytes) / events, 1),
        "by_kind_bytes": dict(sorted(sizes.items())),
        "by_kind_keys": dict(sorted(counts.items())),
    }


def main() -> None:
    """Parse the arguments, run, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.events)), indent=2))


if __name__ == "__main__":
    main()
