"""Redis bytes each recorded event leaves behind once delivered: idempotency records and claims.

Records ``--events`` usage events with a caller's identifier and as many without (dualwrite mints
one) at ``shadow`` through the engine, against the stand-in (in this process, on a real socket),
delivers every shadow write, then reads ``MEMORY USAGE`` of every key under the run's prefix and
groups them by kind. What a claim costs is the per-event figure of the ``idem`` (records kept for
caller retries), ``spooled`` (in-doubt commit markers), ``claims`` (the recovery index) and
``set`` kinds; the ledger, rollups and streams are shared by every event of a customer and period.

    python bench/claim_memory.py                  # 2,000 + 2,000 events
    python bench/claim_memory.py --events 100000 --minted 2000  # the issue's figure (~15 min)

Beside ``MEMORY USAGE`` by kind it prints ``INFO memory``'s ``used_memory`` growth per event (the
whole server's: other clients writing meanwhile blur it) and, as the same-run baseline, what
the record of the format before issue 20 (a hash holding the outcome as JSON) takes.

Needs Redis (``REDIS_URL``); its keys live under a fresh prefix, deleted at the end. With
``--own-redis`` it starts a redis-server of its own instead (``INFO memory`` is then this run's).
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
from pydantic import SecretStr

from dualwrite.config import MeterMapping, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore
from dualwrite.models import Stage, UsageEvent
from dualwrite.testing import RedisServerProcess, StripeStandin, serve_standin

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


async def _used_memory(redis: aioredis.Redis) -> int:
    """``used_memory`` of ``INFO memory`` (the whole server: other clients' writes count too)."""
    return int((await redis.info("memory"))["used_memory"])


async def _old_format_bytes(
    engine: DualWriteEngine, redis: aioredis.Redis, events: list[UsageEvent]
) -> float:
    """The baseline, measured in the same run: MEMORY USAGE per record of the format before
    issue 20 (a hash: the full fingerprint, the state, the outcome as JSON) for ``events``'
    outcomes, written beside their compact records, then deleted."""
    from dualwrite import _remembered as remembered

    total = 0
    keys: list[str] = []
    for event in events:
        key = engine.keys.for_customer(event.customer).idempotency(event.identifier)
        record = await engine.redis.get(key)
        if not isinstance(record, str):
            continue
        outcome = remembered.decode(record, event)
        old_key = key.replace(":idem:", ":idem-old:")
        await engine.redis.hset(
            old_key,
            mapping={
                "fp": event.fingerprint(),
                "state": "done",
                "outcome": outcome.model_dump_json(),
            },
        )
        await engine.redis.expire(old_key, 600)
        total += int(await redis.memory_usage(old_key, samples=0) or 0)
        keys.append(old_key)
    for start in range(0, len(keys), 500):
        await redis.unlink(*keys[start : start + 500])
    return total / max(len(keys), 1)


async def run(events: int, minted: int, redis_url: str = REDIS_URL) -> dict[str, Any]:
    """Record and deliver the events, then measure what stays in Redis."""
    prefix = f"dwbench-mem-{uuid.uuid4().hex[:8]}"
    standin = StripeStandin(api_keys=[KEY])
    with serve_standin(standin) as running:
        catalog = Catalog(running.url)
        customers = [catalog.customer(f"mem {n}") for n in range(10)]
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
        try:
            await RedisFlagStore(engine.redis, engine.keys).set_default(Stage.SHADOW, actor="bench")
            limit = asyncio.Semaphore(32)

            def event_of(n: int, tracked: bool) -> UsageEvent:
                customer, item = customers[n % len(customers)]
                return UsageEvent(
                    identifier=f"bench-{n}-{tracked}" if tracked else f"dwev_{uuid.uuid4().hex}",
                    identifier_source="idempotency_key" if tracked else "minted",
                    customer=customer,
                    subscription_item=item,
                    event_name=EVENT_NAME,
                    quantity=1 + n % 5,
                    timestamp=int(time.time()),
                )

            async def one(n: int, tracked: bool) -> None:
                event = event_of(n, tracked)
                async with limit:
                    outcome = await engine.record(event)
                assert outcome.accepted, outcome

            worker = engine.new_worker()
            await worker.start()
            # Each phase is measured once its shadow writes are delivered: the outbox holds an
            # entry only until then, the idempotency record for the caller's retries.
            before_tracked = await _used_memory(redis)
            await asyncio.gather(*(one(n, True) for n in range(events)))
            await asyncio.wait_for(worker.drain(), 600)
            used_tracked = await _used_memory(redis) - before_tracked
            after_tracked, _ = await _memory_by_kind(redis, prefix)
            sample = [event_of(n, True) for n in range(min(events, 2000))]
            old_format = await _old_format_bytes(engine, redis, sample)
            before_minted = await _used_memory(redis)
            await asyncio.gather(*(one(n, False) for n in range(minted)))
            await asyncio.wait_for(worker.drain(), 600)
            used_minted = await _used_memory(redis) - before_minted
            await worker.aclose()
            sizes, counts = await _memory_by_kind(redis, prefix)
        finally:
            async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
                await redis.unlink(key)
            await redis.aclose()
            await engine.aclose()
    tracked_bytes = sum(after_tracked[kind] for kind in PER_EVENT_KINDS)
    all_bytes = sum(sizes[kind] for kind in PER_EVENT_KINDS)
    per_tracked = tracked_bytes / events
    return {
        "events_each": events,
        "bytes_per_caller_keyed_event": round(per_tracked, 1),
        "bytes_per_caller_keyed_event_old_format": round(old_format, 1),
        "ratio_to_old_format": round(per_tracked / old_format, 3),
        "info_used_memory_per_caller_keyed_event": round(used_tracked / events, 1),
        "minted_events": minted,
        "bytes_per_minted_event": round((all_bytes - tracked_bytes) / max(minted, 1), 1),
        "info_used_memory_per_minted_event": round(used_minted / max(minted, 1), 1),
        "by_kind_bytes": dict(sorted(sizes.items())),
        "by_kind_keys": dict(sorted(counts.items())),
    }


def main() -> None:
    """Parse the arguments, run, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="caller-keyed events")
    parser.add_argument(
        "--minted", type=int, help="events without an identifier (default: --events)"
    )
    parser.add_argument(
        "--own-redis",
        action="store_true",
        help="start a redis-server of this run's own, so INFO memory sees no other client",
    )
    args = parser.parse_args()
    minted = args.events if args.minted is None else args.minted
    if not args.own_redis:
        print(json.dumps(asyncio.run(run(args.events, minted)), indent=2))
        return
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServerProcess(Path(directory))
        server.start()
        try:
            result = asyncio.run(run(args.events, minted, server.url))
        finally:
            server.stop()
    print(json.dumps({"own_redis": True, **result}, indent=2))


if __name__ == "__main__":
    main()
