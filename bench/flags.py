"""Stage flags: cached resolutions per second on one core, and how soon a change reaches another
process's cache.

Needs a Redis (``REDIS_URL``, default ``redis://127.0.0.1:6379/0``); works under its own key prefix
and deletes it afterwards. The baseline for the resolution rate is a bare ``dict`` lookup in the same
loop, same run.

    python bench/flags.py [--resolutions 1000000] [--changes 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import redis.asyncio as aioredis

from dualwrite.config import FlagSettings
from dualwrite.flags import RedisFlagStore, StageResolver
from dualwrite.keys import KeySpace
from dualwrite.models import Stage

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


async def resolution_rate(resolver: StageResolver, customers: list[str], count: int) -> float:
    for customer in customers:
        await resolver.resolve(customer)
    started = time.perf_counter()
    for index in range(count):
        await resolver.resolve(customers[index % len(customers)])
    return count / (time.perf_counter() - started)


async def dict_rate(customers: list[str], count: int) -> float:
    table = dict.fromkeys(customers, Stage.SHADOW)

    async def lookup(customer: str) -> Stage:
        return table[customer]

    started = time.perf_counter()
    for index in range(count):
        await lookup(customers[index % len(customers)])
    return count / (time.perf_counter() - started)


async def invalidation_ms(
    store: RedisFlagStore, watcher: StageResolver, changes: int
) -> list[float]:
    delays = []
    for index in range(changes):
        customer = f"cus_bench{index}"
        await watcher.resolve(customer)
        started = time.perf_counter()
        await store.set_override(customer, Stage.SHADOW, actor="bench")
        while True:  # polls the other connection's cache until the pub/sub message drops the entry
            if customer not in watcher._cache:
                break
            await asyncio.sleep(0)
        delays.append((time.perf_counter() - started) * 1000)
    return delays


async def main(resolutions: int, changes: int, runs: int) -> None:
    prefix = f"dwbench-{uuid.uuid4().hex[:8]}"
    keys = KeySpace(prefix)
    writer = aioredis.Redis.from_url(URL, decode_responses=True)
    reader = aioredis.Redis.from_url(URL, decode_responses=True)
    settings = FlagSettings(cache_ttl=600)
    try:
        async with StageResolver(reader, keys, settings) as resolver:
            customers = [f"cus_{index}" for index in range(10_000)]
            rates, ratios = [], []
            for run in range(runs):
                rate = await resolution_rate(resolver, customers, resolutions)
                base = await dict_rate(customers, resolutions)
                rates.append(rate)
                ratios.append(rate / base)
                print(
                    f"run {run + 1}: {rate:,.0f} cached resolutions/s; "
                    f"dict lookup {base:,.0f}/s; ratio {rate / base:.2f}"
                )
            print(
                f"cached resolutions/s: median {statistics.median(rates):,.0f} "
                f"[{min(rates):,.0f}..{max(rates):,.0f}], vs a dict lookup {statistics.median(ratios):.2f}"
            )
            delays = sorted(await invalidation_ms(RedisFlagStore(writer, keys), resolver, changes))
            p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
            print(
                f"change seen by the other connection's cache: median {statistics.median(delays):.2f} ms, "
                f"p99 {p99:.2f} ms, max {delays[-1]:.2f} ms "
                f"(from the start of the change, {changes} changes)"
            )
    finally:
        async for key in writer.scan_iter(match=f"{prefix}:*"):
            await writer.unlink(key)
        await writer.aclose()
        await reader.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.resolutions, args.changes, args.runs))
