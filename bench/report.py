"""The report over many customers: 100,000 customers x 31 days, built, dumped to JSON and CSV.

Writes a synthetic ledger (one billing period per customer overlapping the 31 days, a second one for a
third of them, each row also copied into its rollup as the writers do), flags and a divergence log
under a fresh key prefix of the Redis on ``REDIS_URL``, then times, several runs:

* the baseline: reading the same ledger hashes raw (pipelined HGETALL, no processing);
* ``build_report`` over the 31 days (wall and this process's CPU time: the machine may be shared);
  its JSON and its CSV, each streamed (``write_json``, ``write_csv``) to a sink that only counts
  characters; the terminal table (top 50).

Prints each figure, its median and spread, and the ratio to the baseline in the same run, the
process's peak RSS, and the Redis bytes per customer of the ledger rows and of their rollup copies.

With ``--guard``, also the guard's passes (thresholds no customer crosses, so only the reading
and judging is timed): a full pass (every customer, what every pass cost before issue 20), then
passes over the customers changed since (``--changed``, default 1 %, rewritten through the
ledger's own script, and none), each as a ratio to the full pass of the same run.
The key prefix is deleted afterwards, unless ``--keep``: then the next run given the same
``--prefix`` (a ``dwbench-`` name) reuses the seeded data instead of writing it again (at a
million customers, the seeding takes longer than the runs).

    python bench/report.py [--customers 100000] [--runs 3] [--reconciled] [--guard] [--changed N]
                           [--prefix dwbench-NAME --keep]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import resource
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT
from rich.console import Console

from dualwrite.config import FlagSettings, Settings
from dualwrite.cutover import CutoverOps, Guard
from dualwrite.flags import RedisFlagStore, StageResolver
from dualwrite.keys import KeySpace
from dualwrite.ledger import Ledger, LedgerUpdate
from dualwrite.models import Leg, Stage, UsageEvent
from dualwrite.periods import Period
from dualwrite.reconcile import (
    LegCheck,
    ReconciliationRecord,
    read_reconciliation_fields,
    save_records,
)
from dualwrite.redis_client import as_str, as_str_list
from dualwrite.report import build_report, render_table, write_csv, write_json
from dualwrite.rollups import backfill

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DAY = 86_400
WINDOW_START = 1_793_491_200  # 2026-11-01
SINCE, UNTIL = "2026-11-01", "2026-12-01"


async def populate(redis: aioredis.Redis, keys: KeySpace, customers: int) -> int:
    """Write the synthetic ledger; returns how many ledger hashes."""
    rng = random.Random(customers)
    shard = keys.shard(0)
    pipe = redis.pipeline(transaction=False)
    written = 0
    for index in range(customers):
        customer = f"cus_{index:08d}"
        anchor = WINDOW_START - rng.randint(0, 30) * DAY
        periods = [Period(start=anchor, end=anchor + 30 * DAY, kind="billing")]
        if index % 3 == 0:
            periods.append(Period(start=anchor + 30 * DAY, end=anchor + 60 * DAY, kind="billing"))
        for period in periods:
            quantity = rng.randint(1, 10_000)
            diverged = index % 97 == 0
            counters: dict[FieldT, EncodableT] = {
                "events": 40,
                "quantity": quantity,
                "stage_shadow_events": 40,
                "legacy_expected_events": 40,
                "legacy_expected_qty": quantity,
                "legacy_accepted_events": 40,
                "legacy_accepted_qty": quantity,
                "meter_expected_events": 40,
                "meter_expected_qty": quantity,
                "meter_accepted_events": 39 if diverged else 40,
                "meter_accepted_qty": quantity - 1 if diverged else quantity,
                "meter_failed_events": 1 if diverged else 0,
                "meter_failed_qty": 1 if diverged else 0,
                "divergent_events": 1 if diverged else 0,
            }
            key = shard.ledger(period.id, customer, "api_requests")
            pipe.hset(key, mapping=counters)
            pipe.zadd(
                shard.ledger_index, {f"{period.id}|{customer}|api_requests": period.start // DAY}
            )
            written += 1
        if len(pipe) >= 5000:
            await pipe.execute()
    await pipe.execute()
    # The writers copy every row into its rollup as they write it; rows written with HSET here
    # are copied the way an upgrade copies rows older than the rollups.
    await backfill(redis, shard)
    store = RedisFlagStore(redis, keys)
    await store.set_default(Stage.SHADOW, actor="bench")
    await store.set_rollout(Stage.PRIMARY, 10, actor="bench")
    for index in range(0, customers, 100):
        await store.set_override(f"cus_{index:08d}", Stage.METER, actor="bench")
    return written


async def raw_read(redis: aioredis.Redis, keys: KeySpace) -> int:
    """The baseline: every ledger hash read, nothing else."""
    shard = keys.shard(0)
    members = as_str_list(await redis.zrangebyscore(shard.ledger_index, "-inf", "+inf"))
    read = 0
    for start in range(0, len(members), 1000):
        pipe = redis.pipeline(transaction=False)
        for member in members[start : start + 1000]:
            period, customer, event_name = member.split("|", 2)
            pipe.hgetall(shard.ledger(period, customer, event_name))
        read += len(await pipe.execute())
    return read


async def redis_bytes(redis: aioredis.Redis, keys: KeySpace, customers: int) -> str:
    """Redis bytes per customer of the ledger rows (MEMORY USAGE of 2,000 sampled) and of the
    rollups holding their copies (every rollup hash, counted in full)."""
    shard = keys.shard(0)
    members = as_str_list(await redis.zrangebyscore(shard.ledger_index, "-inf", "+inf"))
    sample = members[:: max(1, len(members) // 2000)]
    pipe = redis.pipeline(transaction=False)
    for member in sample:
        period, customer, event_name = member.split("|", 2)
        pipe.memory_usage(shard.ledger(period, customer, event_name), samples=0)
    rows = sum(int(size or 0) for size in await pipe.execute()) / len(sample) * len(members)
    rollups = as_str_list(await redis.zrange(shard.rollup_index, 0, -1))
    pipe = redis.pipeline(transaction=False)
    for rollup in rollups:
        pipe.memory_usage(rollup, samples=0)
    copies = sum(int(size or 0) for size in await pipe.execute())
    index = int(await redis.memory_usage(shard.ledger_index, samples=0) or 0)
    listed = int(await redis.memory_usage(shard.customer_rows, samples=0) or 0)
    changed = int(await redis.memory_usage(shard.guard_changed, samples=0) or 0)
    return (
        f"Redis per customer: ledger rows {rows / customers:.0f} B, their rollup copies "
        f"{copies / customers:.0f} B ({copies / rows:.2f}x the rows), ledger index "
        f"{index / customers:.0f} B, rows by customer (guard) {listed / customers:.0f} B "
        f"({listed / rows:.2f}x the rows); the guard's changed set while every customer "
        f"is in it {changed / customers:.0f} B"
    )


class Counted(io.StringIO):
    """A text sink that keeps only how many characters were written to it."""

    size = 0

    def write(self, text: str) -> int:
        self.size += len(text)
        return len(text)


async def timed(action: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    started = time.perf_counter()
    result = await action()
    return time.perf_counter() - started, result


async def reconcile_all(redis: aioredis.Redis, keys: KeySpace, customers: int) -> int:
    """A reconciliation record for every ledger row (Stripe's totals; every 50th drifted)."""
    shard = keys.shard(0)
    members = as_str_list(await redis.zrangebyscore(shard.ledger_index, "-inf", "+inf"))
    records = []
    for index, member in enumerate(members):
        period, customer, event_name = member.split("|", 2)
        drift = 3 if index % 50 == 0 else 0
        records.append(
            ReconciliationRecord(
                customer=customer,
                event_name=event_name,
                period=period,
                checked_at=time.time(),
                intended_qty=1000,
                legacy=LegCheck(
                    expected_qty=1000, accepted_qty=1000, stripe_qty=1000 + drift, drift=drift
                ),
                meter=LegCheck(expected_qty=1000, accepted_qty=1000, stripe_qty=1000, drift=0),
            )
        )
    await save_records(redis, keys, records)
    # save_records copies each record into its rollup; records saved before rollups existed are
    # copied once, by the first read: do that here, so that the runs time the steady state.
    await read_reconciliation_fields(redis, keys)
    return len(records)


async def guard_passes(redis: aioredis.Redis, keys: KeySpace, customers: int, changed: int) -> None:
    """A full guard pass, then passes over ``changed`` customers and over none (see above)."""
    settings = Settings.load(
        redis={"url": URL, "key_prefix": keys.prefix},
        guardrails={"max_divergent_events": 10**9, "max_difference_pct": 100},
    )
    ops = CutoverOps(redis, keys, settings)
    ledger, resolver = Ledger(redis, keys), StageResolver(redis, keys, FlagSettings())

    def guard(full_every: float) -> Guard:
        return Guard(ops, ledger, resolver, settings.guardrails, full_every=full_every)

    async def one(label: str, every: float, base: float | None) -> float:
        cpu = time.process_time()
        took, result = await timed(lambda: guard(every).check())
        cpu = time.process_time() - cpu
        ratio = f", {took / base:.3f}x the full pass" if base else ""
        print(
            f"guard {label}: {took:.3f} s (CPU {cpu:.3f} s), "
            f"{result.checked:,} customers judged{ratio}"  # type: ignore[attr-defined]
        )
        return took

    await guard(0).check()  # once per shard: the rows listed by customer (an upgrade does it once)
    full = await one("full pass", 0, None)
    pipe = redis.pipeline(transaction=False)
    step = max(1, customers // max(changed, 1))
    for index in range(0, customers, step)[:changed]:
        name = f"cus_{index:08d}"
        event = UsageEvent(
            identifier=f"bench-{index}",
            customer=name,
            event_name="api_requests",
            quantity=3,
            timestamp=WINDOW_START + 5 * DAY,
        )
        update = LedgerUpdate(keys.for_customer(name), event)
        update.recorded(Stage.SHADOW, Leg.LEGACY, Leg.METER, 3, translated=False)
        update.shadow_accepted(Leg.METER, 3).queue(pipe)
    await pipe.execute()
    await one(f"pass over {changed:,} changed", 3_600, full)
    await one("pass over none changed", 3_600, full)


async def main(
    customers: int,
    runs: int,
    *,
    reconciled: bool,
    guard: int | None,
    prefix: str | None = None,
    keep: bool = False,
) -> None:
    redis = aioredis.Redis.from_url(URL, decode_responses=True)
    keys = KeySpace(prefix or f"dwbench-{uuid.uuid4().hex[:8]}")
    seeded = as_str(await redis.get(f"{keys.prefix}:bench-seeded"))
    try:
        if seeded is not None:
            if seeded != f"{customers}:{int(reconciled)}":
                msg = f"{keys.prefix} holds another seeding ({seeded}): use another --prefix"
                raise SystemExit(msg)
            print(f"reusing the {customers:,} customers seeded under {keys.prefix}")
        else:
            started = time.perf_counter()
            rows = await populate(redis, keys, customers)
            if reconciled:
                saved = await reconcile_all(redis, keys, customers)
                print(f"saved {saved:,} reconciliation records")
            print(
                f"wrote {rows:,} ledger hashes for {customers:,} customers "
                f"in {time.perf_counter() - started:.1f} s"
            )
            if keep:
                await redis.set(f"{keys.prefix}:bench-seeded", f"{customers}:{int(reconciled)}")
        print(await redis_bytes(redis, keys, customers))
        if runs == 0:
            return  # --runs 0 --keep: seed only
        ledger = Ledger(redis, keys)
        resolver = StageResolver(redis, keys, FlagSettings())
        figures: dict[str, list[float]] = {}
        for run in range(runs):
            base, _ = await timed(lambda: raw_read(redis, keys))
            cpu_started = time.process_time()
            built, report = await timed(
                lambda: build_report(ledger, resolver, since=SINCE, until=UNTIL)
            )
            built_cpu = time.process_time() - cpu_started
            if run == 0:
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"peak RSS after the first build_report: {rss:,.0f} MiB")
            started = time.perf_counter()
            text = Counted()
            write_json(report, text)  # type: ignore[arg-type]
            as_json = time.perf_counter() - started
            started = time.perf_counter()
            csv_text = Counted()
            write_csv(report, csv_text)  # type: ignore[arg-type]
            as_csv = time.perf_counter() - started
            started = time.perf_counter()
            Console(file=io.StringIO(), width=200).print(render_table(report, limit=50))  # type: ignore[arg-type]
            as_table = time.perf_counter() - started
            for name, value in (
                ("raw read (baseline)", base),
                ("build_report", built),
                ("build_report CPU", built_cpu),
                ("JSON", as_json),
                ("CSV", as_csv),
                ("table (top 50)", as_table),
                ("report + JSON", built + as_json),
            ):
                figures.setdefault(name, []).append(value)
            print(
                f"run {run + 1}: baseline {base:.2f} s, report {built:.2f} s "
                f"({built / base:.2f}x, CPU {built_cpu:.2f} s), "
                f"JSON {as_json:.2f} s ({text.size / 1e6:.0f} MB), "
                f"CSV {as_csv:.2f} s ({csv_text.size / 1e6:.0f} MB), table {as_table:.2f} s, "
                f"{len(report.customers):,} customers"  # type: ignore[attr-defined]
            )
            del report, text, csv_text  # the next run's peak is its own, not two reports'
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(f"peak RSS of this process: {peak:,.0f} MiB")
        if guard is not None:
            await guard_passes(redis, keys, customers, guard)
        base = statistics.median(figures["raw read (baseline)"])
        for name, values in figures.items():
            print(
                f"{name:>20}: median {statistics.median(values):.2f} s "
                f"[{min(values):.2f}..{max(values):.2f}], {statistics.median(values) / base:.2f}x baseline"
            )
    finally:
        if not keep:
            async for key in redis.scan_iter(match=f"{keys.prefix}:*", count=10_000):
                await redis.unlink(key)
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--reconciled", action="store_true", help="also a reconciliation record per ledger row"
    )
    parser.add_argument("--guard", action="store_true", help="also time the guard's passes")
    parser.add_argument(
        "--changed", type=int, default=None, help="customers changed before a guard pass (1 %%)"
    )
    parser.add_argument(
        "--prefix", default=None, help="key prefix (dwbench-…): reuse what --keep left there"
    )
    parser.add_argument("--keep", action="store_true", help="leave the seeded keys for a next run")
    args = parser.parse_args()
    if args.prefix is not None and not args.prefix.startswith("dwbench-"):
        parser.error("--prefix must start with dwbench-")
    changed = args.changed if args.changed is not None else max(1, args.customers // 100)
    asyncio.run(
        main(
            args.customers,
            args.runs,
            reconciled=args.reconciled,
            guard=changed if args.guard else None,
            prefix=args.prefix,
            keep=args.keep,
        )
    )
